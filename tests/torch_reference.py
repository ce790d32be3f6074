"""Independent PyTorch copies of the authors' CIFS networks, for the tests.

Written from the architectures of HanshuYAN/CIFS (DESIGN.md §2), softmax
mask with factor 1 (the paper's setting):

- ``ResNet18CIFS`` (ResNet18_L4, ``models/nets/resnet_CIFS.py``): CIFAR
  ResNet-18 whose two last blocks end with a CIFS module (``Probe``) holding a
  probe ``Probe`` (nn.Sequential), MLP for block 0 and linear for block 1.
  Parameter names match the authors' state dicts.
- ``ResNet10CIFS`` (ResNet_Gray_10): [1, 1, 1, 1] BasicBlocks, 1-channel
  stem; CIFS after layer3's output (``Probe_0``, MLP) and layer4's output
  (``Probe_1``, linear). Parameter names match the authors' state dicts.
- ``WideResNetCIFS``: the pre-activation WRN of TRADES / CIFS (dropout 0)
  with CIFS in the last unit of group 3 on that unit's pre-activated input
  (after its BN + ReLU, before its first conv; the shortcut adds the
  unmasked, un-normalised input), MLP probe of hidden size 240, and after
  the final BN + ReLU, linear probe; probe biases start at zero. Parameter
  names are this file's own (the tests map them).
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
  def __init__(self, channels, num_classes, mlp, hidden=128, zero_bias=False):
    super().__init__()
    first = MLPHidden(channels, hidden) if mlp else GlobalAverage()
    self.Probe = nn.Sequential(
      first, nn.Linear(hidden if mlp else channels, num_classes)
    )
    if zero_bias:
      for module in self.Probe.modules():
        if isinstance(module, nn.Linear):
          nn.init.zeros_(module.bias)

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


class ResNet10CIFS(nn.Module):
  """ResNet_Gray_10 with stage widths w, 2w, 4w, 8w (the authors': w = 64)."""

  def __init__(self, width=64):
    super().__init__()
    self.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    in_planes = width
    for stage in range(4):
      planes = width * 2**stage
      block = BasicBlock(in_planes, planes, 1 if stage == 0 else 2)
      setattr(self, f"layer{stage + 1}", nn.Sequential(block))
      in_planes = planes
    self.Probe_0 = CIFSModule(4 * width, 10, mlp=True)
    self.Probe_1 = CIFSModule(8 * width, 10, mlp=False)
    self.linear = nn.Linear(8 * width, 10)

  def forward(self, x, labels=None):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.layer3(self.layer2(self.layer1(out)))
    out, probe0 = self.Probe_0(out, labels)
    out, probe1 = self.Probe_1(self.layer4(out), labels)
    out = F.avg_pool2d(out, 4).flatten(1)
    return self.linear(out), [probe0, probe1]


class WideUnit(nn.Module):
  """TRADES' BasicBlock (dropout 0), optionally with CIFS (``Probe``) on its
  pre-activated input."""

  def __init__(self, in_planes, planes, stride, cifs=False):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.equal_in_out = in_planes == planes
    if not self.equal_in_out:
      self.convShortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)
    if cifs:
      self.Probe = CIFSModule(in_planes, 10, True, hidden=240, zero_bias=True)

  def forward(self, x, labels, probe_logits):
    activated = F.relu(self.bn1(x))
    shortcut = x if self.equal_in_out else self.convShortcut(activated)
    if hasattr(self, "Probe"):
      activated, logits = self.Probe(activated, labels)
      probe_logits.append(logits)
    out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
    return shortcut + out


class WideResNetCIFS(nn.Module):
  """WRN-depth-widen: groups ``block1..3`` of (depth - 4) / 6 units."""

  def __init__(self, depth=28, widen=10):
    super().__init__()
    units = (depth - 4) // 6
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    in_planes = 16
    for group, planes in enumerate((16 * widen, 32 * widen, 64 * widen), 1):
      group_units = []
      for unit in range(units):
        stride = 2 if group > 1 and unit == 0 else 1
        cifs = group == 3 and unit == units - 1
        group_units.append(WideUnit(in_planes, planes, stride, cifs))
        in_planes = planes
      setattr(self, f"block{group}", nn.ModuleList(group_units))
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.Probe = CIFSModule(in_planes, 10, mlp=False, zero_bias=True)
    self.fc = nn.Linear(in_planes, 10)
    nn.init.zeros_(self.fc.bias)

  def forward(self, x, labels=None):
    out = self.conv1(x)
    probe_logits = []
    for group in (self.block1, self.block2, self.block3):
      for unit in group:
        out = unit(out, labels, probe_logits)
    out, logits = self.Probe(F.relu(self.bn1(out)), labels)
    probe_logits.append(logits)
    out = F.avg_pool2d(out, 8).flatten(1)
    return self.fc(out), probe_logits
