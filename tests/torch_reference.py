"""An independent PyTorch copy of the authors' CIFS ResNet-18 (ResNet18_L4).

Written for the tests from the architecture of HanshuYAN/CIFS
(``models/nets/resnet_CIFS.py``): CIFAR ResNet-18 whose two last blocks end
with a CIFS module (``Probe``) holding a probe ``Probe`` (nn.Sequential), MLP
for block 0 and linear for block 1. Parameter names therefore match the
authors' state dicts. Softmax mask with factor 1 (the paper's setting).
"""

import torch
from torch import nn
from torch.nn import functional as F


class GlobalAverage(nn.Module):
  def forward(self, x):
    return x.mean(dim=(2, 3))


class MLPHidden(nn.Module):
  """nlBlock: pool, Linear, Softplus(beta=5); its Linear is named ``fc``."""

  def __init__(self, channels, hidden):
    super().__init__()
    self.pool = GlobalAverage()
    self.fc = nn.Linear(channels, hidden)

  def forward(self, x):
    return F.softplus(self.fc(self.pool(x)), beta=5)


class CIFSModule(nn.Module):
  def __init__(self, channels, num_classes, mlp):
    super().__init__()
    first = MLPHidden(channels, 128) if mlp else GlobalAverage()
    self.Probe = nn.Sequential(
      first, nn.Linear(128 if mlp else channels, num_classes)
    )

  def forward(self, features, labels):
    detached = features.detach().clone().requires_grad_(True)
    with torch.enable_grad():
      logits = self.Probe(detached)
      top2 = logits.topk(2, dim=1).indices
      first = labels if self.training else top2[:, 0]
      rows = torch.arange(len(features))
      objective = (logits[rows, first] + logits[rows, top2[:, 1]]).sum()
      (grad,) = torch.autograd.grad(
        objective, detached, create_graph=self.training
      )
    mask = F.softmax(grad.sum(dim=(2, 3)), dim=1)
    return features * mask[:, :, None, None], self.Probe(features)


class BasicBlock(nn.Module):
  def __init__(self, in_planes, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(
        nn.Conv2d(in_planes, planes, 1, stride, bias=False),
        nn.BatchNorm2d(planes),
      )

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + self.shortcut(x))


class CIFSBlock(BasicBlock):
  def __init__(self, in_planes, planes, stride, mlp):
    super().__init__(in_planes, planes, stride)
    self.Probe = CIFSModule(planes, 10, mlp)

  def forward(self, x, labels):
    return self.Probe(super().forward(x), labels)


class ResNet18CIFS(nn.Module):
  """``width``: channels of the first stage; ``cifs=False``: the vanilla
  ResNet-18 (no CIFS modules, no probe logits)."""

  def __init__(self, width=64, cifs=True):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    blocks = []
    in_planes = width
    for stage, planes in enumerate((width, 2 * width, 4 * width)):
      stride = 1 if stage == 0 else 2
      blocks.append(
        nn.Sequential(
          BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)
        )
      )
      in_planes = planes
    self.layer1, self.layer2, self.layer3 = blocks
    last = 8 * width
    self.layer4 = nn.ModuleList(
      [CIFSBlock(in_planes, last, 2, mlp=True), CIFSBlock(last, last, 1, False)]
      if cifs
      else [BasicBlock(in_planes, last, 2), BasicBlock(last, last, 1)]
    )
    self.cifs = cifs
    self.linear = nn.Linear(last, 10)

  def forward(self, x, labels=None):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.layer3(self.layer2(self.layer1(out)))
    probe_logits = []
    for block in self.layer4:
      if not self.cifs:
        out = block(out)
        continue
      out, logits = block(out, labels)
      probe_logits.append(logits)
    out = F.avg_pool2d(out, 4).flatten(1)
    return self.linear(out), probe_logits
