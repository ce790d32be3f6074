"""An independent PyTorch copy of the authors' ResNet_Gray_10 without CIFS.

The backbone of HanshuYAN/CIFS ``ResNet_Gray_10`` (one BasicBlock per stage,
widths w, 2w, 4w, 8w, a 1-channel stem for Fashion-MNIST) with the defence
left out, i.e. this project's ``resnet10`` with ``model.defense = "none"``.
Parameter names match ``models.export_torch_state_dict(..., "resnet10")``.
Inputs (N, 1, 28, 28) in [0, 1]; returns logits (N, K) only (what
torchattacks expects of a model).
"""

from torch import nn
from torch.nn import functional as F

from tests.torch_reference import BasicBlock


class ResNet10(nn.Module):
  def __init__(self, width=64, num_classes=10, in_channels=1):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    stages = []
    for stage in range(4):
      planes = width * 2**stage
      in_planes = width * 2 ** max(stage - 1, 0)
      stages.append(
        nn.Sequential(BasicBlock(in_planes, planes, 1 if stage == 0 else 2))
      )
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.linear = nn.Linear(8 * width, num_classes)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
      out = layer(out)
    return self.linear(out.mean(dim=(2, 3)))
