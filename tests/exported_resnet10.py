"""A small Fashion-MNIST ResNet-10 trained here and exported to PyTorch.

Shared by the cross-checks against PyTorch attack code
(tests/test_torchattacks_crosscheck.py, tests/test_official_autoattack.py)
and by ``python -m benchmarks.autoattack --against_official``: a vanilla
ResNet-10 PGD-trained for 2 epochs on 4,000 real Fashion-MNIST images,
exported with ``models.export_torch_state_dict`` into the PyTorch copy of
``tests/torch_resnet10.py``.
"""

from __future__ import annotations

import pathlib
import time

import jax
import numpy as np
import torch

from cifs_jax import data, models
from cifs_jax.runs import evaluation as runner
from cifs_jax.runs import trainer as trainer_lib
from cifs_jax.runs.directory import RunDirectory
from tests.test_training_e2e import NO_FINAL_EVAL, load_config
from tests.torch_resnet10 import ResNet10


def to_torch(x: np.ndarray) -> torch.Tensor:
  """(N, H, W, C) numpy -> (N, C, H, W) tensor."""
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def train_and_export(workdir: pathlib.Path, width: int, num_points: int):
  """(JAX logits_fn, PyTorch model, x (N, 28, 28, 1) in [0, 1], y (N,)
  int64) of the first ``num_points`` test images, the model trained in
  ``workdir``; the two models' logits checked equal to 1e-3."""
  config = load_config(
    "fmnist_resnet10",
    "smoke,vanilla",
    f"--config.model.width={width}",
    "--config.train.max_examples=4000",
    "--config.train.batch_size=128",
    "--config.train.epochs=2",
    "--config.eval.num_examples=500",
    "--config.eval.batch_size=250",
    NO_FINAL_EVAL,
  )
  trainer_lib.train_and_evaluate(config, str(workdir))
  model, variables, _ = runner.restore_checkpoint(
    config, RunDirectory(str(workdir)), "last"
  )
  test = data.load_split(config.data, "test").head(num_points)
  x = np.asarray(test.images, np.float32) / 255.0
  y = np.asarray(test.labels, np.int64)
  torch_model = ResNet10(width=width)
  state = models.export_torch_state_dict(variables, "resnet10")
  torch_model.load_state_dict(
    {k: torch.from_numpy(v) for k, v in state.items()}
  )
  torch_model.eval()
  logits_fn = jax.tree_util.Partial(model.apply, variables)
  np.testing.assert_allclose(
    np.asarray(logits_fn(x[:32])[0]),
    torch_model(to_torch(x[:32])).detach().numpy(),
    atol=1e-3,
  )
  return logits_fn, torch_model, x, y


def official_autoattack(torch_model, x, y, eps: float, seed: int = 0):
  """The official standard AutoAttack (pyautoattack, L-inf) on x, y.

  Returns:
    (robust_after, seconds): dicts by stage ("clean", "apgd-ce", "apgd-t",
    "fab-t", "square"), of the (N,) bool points robust after it and of its
    wall time. Every stage attacks its robust points in one batch, as the
    official loop does with ``batch_size`` >= N.
  """
  from pyautoattack import AutoAttack  # noqa: PLC0415 (optional package)

  adversary = AutoAttack(torch_model, eps=eps, seed=seed, version="standard")
  x_torch, y_torch = to_torch(x), torch.from_numpy(y)
  with torch.no_grad():
    robust = (torch_model(x_torch).argmax(1) == y_torch).numpy()
  robust_after, seconds = {"clean": robust.copy()}, {}
  objects = {
    "apgd-ce": adversary.apgd,
    "apgd-t": adversary.apgd_targeted,
    "fab-t": adversary.fab,
    "square": adversary.square,
  }
  for name, attack in objects.items():
    # The official loop passes the points still robust, in index order,
    # and counts those whose top-1 at the output differs from the label.
    def perturb(x_in, y_in, name=name, original=attack.perturb):
      start = time.perf_counter()
      x_out = original(x_in, y_in)
      with torch.no_grad():
        fooled = (torch_model(x_out).argmax(1) != y_in).numpy()
      flags = robust_after[list(robust_after)[-1]].copy()
      flags[np.flatnonzero(flags)[fooled]] = False
      robust_after[name] = flags
      seconds[name] = time.perf_counter() - start
      return x_out

    attack.perturb = perturb
  adversary.run_standard_evaluation(x_torch, y_torch, batch_size=len(y))
  for name in objects:  # stages skipped once no point is left robust
    robust_after.setdefault(name, robust_after[list(robust_after)[-1]])
    seconds.setdefault(name, 0.0)
  return robust_after, seconds
