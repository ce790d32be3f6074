"""The PyTorch side: the authors' setup, as ``tests/torch_reference.py``.

The model is the reference CIFS ResNet-18 (relevance by
``torch.autograd.grad(..., create_graph=True)`` in training, as the
authors'), or its vanilla variant; the attack is a plain L-inf PGD loop like
advertorch's ``LinfPGDAttack`` (model in eval mode, sign steps, projection
onto the eps-ball and [0, 1]) on the same joint loss as the JAX side.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from tests import torch_reference

EPS = 8 / 255


def device() -> torch.device:
  """CUDA where PyTorch sees a GPU, else the CPU."""
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
  """Waits for queued GPU work (nothing to wait for on the CPU)."""
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def model(defense: str, width: int) -> torch.nn.Module:
  """The reference ResNet-18 ("cifs" or "none") on ``device()``."""
  net = torch_reference.ResNet18CIFS(width=width, cifs=defense == "cifs")
  return net.to(device())


def joint_loss(logits, probe_logits, y, beta, scale=1.0):
  """Eq. 3 per example, as ``cifs_jax.losses.joint_loss_per_example``."""
  final = F.cross_entropy(logits, y, reduction="none")
  if not probe_logits:
    return final
  probes = sum(F.cross_entropy(p, y, reduction="none") for p in probe_logits)
  return scale * (final + beta * probes / len(probe_logits)) / (1 + beta)


def pgd(net, x, y, *, steps, step_size, random_start, beta):
  """L-inf PGD maximising the joint loss; ``net`` in eval mode."""
  net.eval()
  x_adv = x
  if random_start:
    x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
  for _ in range(steps):
    x_adv = x_adv.detach().requires_grad_(True)
    logits, probes = net(x_adv)
    loss = joint_loss(logits, probes, y, beta).sum()
    (grad,) = torch.autograd.grad(loss, x_adv)
    x_adv = x_adv.detach() + step_size * grad.sign()
    x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
  return x_adv.detach()


def random_batch(batch_size: int, seed: int = 0):
  """Random images in [0, 1] (N, 3, 32, 32) and labels (N,)."""
  generator = torch.Generator().manual_seed(seed)
  x = torch.rand(batch_size, 3, 32, 32, generator=generator)
  y = torch.randint(0, 10, (batch_size,), generator=generator)
  return x.to(device()), y.to(device())


def train_step(defense, width, batch_size, attack_steps, loss_beta, scale):
  """A no-argument PGD-AT (``attack_steps`` 0: natural) training step."""
  net = model(defense, width)
  optimizer = torch.optim.SGD(
    net.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4
  )
  x, y = random_batch(batch_size)

  def run():
    x_train = x
    if attack_steps:
      x_train = pgd(
        net,
        x,
        y,
        steps=attack_steps,
        step_size=2 / 255,
        random_start=True,
        beta=loss_beta,
      )
    net.train()
    logits, probes = net(x_train, y)
    loss = joint_loss(logits, probes, y, loss_beta, scale).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    synchronize()

  return run


def pgd20_eval(defense, width, batch_size, num_images, beta):
  """PGD-20 (step eps / 10, no random start) over ``num_images``."""
  net = model(defense, width)
  batches = [
    random_batch(min(batch_size, num_images - start), seed=start)
    for start in range(0, num_images, batch_size)
  ]

  def run():
    for x, y in batches:
      x_adv = pgd(
        net, x, y, steps=20, step_size=EPS / 10, random_start=False, beta=beta
      )
      with torch.no_grad():
        (net(x)[0].argmax(1) == y).sum().item()
        (net(x_adv)[0].argmax(1) == y).sum().item()
    synchronize()

  return run
