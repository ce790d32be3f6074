"""End-to-end tests of the training loop (issue 6): every config's ``smoke``
variant, exact resume, SIGTERM, corrupt checkpoints, non-finite losses, bad
configs and a short PGD-AT run on real Fashion-MNIST.

Configs are loaded as ``python -m cifs_jax.main`` loads them (absl +
``ml_collections.config_flags``, locked). Training runs in-process on the two
CPU devices of ``conftest.py``, or as ``python -m cifs_jax.main``
subprocesses with ``JAX_NUM_CPU_DEVICES=2``, so both compute the same
programs. A persistent JAX compilation cache, private to this module, lets
runs of an already compiled configuration skip XLA compilation (most of a
smoke run's time); it changes no result.

  python -m pytest tests/test_training_e2e.py            # default, ~3-4 min
  python -m pytest tests/test_training_e2e.py -m slow    # ~6-7 min
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from unittest import mock

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import pytest
import scipy.io
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from cifs_jax.runs import directory as run_directory
from cifs_jax.data import tfds_source as data_tfds_source
from cifs_jax.runs import evaluation as runner
from cifs_jax.runs import checkpoints
from cifs_jax.runs import trainer as trainer_lib
from tests.event_files import read_scalar_events
from tests.idx_files import (
  HAS_FASHION_MNIST,
  NO_FASHION_MNIST,
  needs_fashion_mnist,
)

REPO = pathlib.Path(__file__).resolve().parents[1]

# At least these (the step may add more, e.g. train_grad_norm).
TRAIN_KEYS = {
  "step",
  "train_loss",
  "train_accuracy",
  "images_per_second",
  "learning_rate",
}
EVAL_KEYS = {
  "step",
  "epoch",
  "natural_accuracy",
  "pgd_accuracy",
  "eval_examples",
}
SMOKE_FMNIST_STEPS = 256 // 32  # smoke: train.max_examples / batch_size.
# The final robustness evaluation (smoke: FGSM at every beta_atk, on 32
# examples) adds compilation to the smoke run; tests that are about training
# turn it off.
NO_FINAL_EVAL = "--config.eval.final=False"


# ------------------------------------------------------------------ helpers


def load_config(name: str, variants: str = "smoke", *overrides: str):
  """``--config=configs/<name>.py:<variants> --config.k=v ...`` as main.py
  parses it: a locked ConfigDict."""
  argv = ["test", f"--config={REPO}/configs/{name}.py:{variants}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, flag_values=flag_values, lock_config=True, sys_argv=argv
  )
  flag_values(argv)
  return flag_values.config


def read_jsonl(workdir) -> list[dict]:
  return [
    json.loads(line)
    for line in (pathlib.Path(workdir) / "metrics.jsonl")
    .read_text()
    .splitlines()
  ]


def read_checkpoint(workdir, which="last"):
  """(state as saved, metadata, all steps) of a workdir's checkpoint."""
  with checkpoints.Checkpointer(pathlib.Path(workdir) / "checkpoints") as ckpt:
    state, metadata = ckpt.restore(which, None)
    return state, metadata, ckpt.all_steps()


def best_step(workdir):
  with checkpoints.Checkpointer(pathlib.Path(workdir) / "checkpoints") as ckpt:
    return ckpt.best_step()


def assert_states_equal(actual, expected):
  """Same leaves (paths, dtypes, shapes) and the same bits."""
  actual, expected = (
    jax.tree_util.tree_flatten_with_path(t)[0] for t in (actual, expected)
  )
  assert [p for p, _ in actual] == [p for p, _ in expected]
  for (path, a), (_, e) in zip(actual, expected):
    a, e = np.asarray(a), np.asarray(e)
    assert a.dtype == e.dtype and a.shape == e.shape, path
    np.testing.assert_array_equal(a, e, err_msg=jax.tree_util.keystr(path))


def snapshot(directory: pathlib.Path) -> dict[str, bytes]:
  """Every file under ``directory`` with its contents."""
  return {
    str(p.relative_to(directory)): p.read_bytes()
    for p in sorted(directory.rglob("*"))
    if p.is_file()
  }


def interrupt_after(monkeypatch, steps: int, signum=signal.SIGINT):
  """Makes the next Trainer signal its own process (as a scheduler would)
  right after its ``steps``-th training step."""
  original_init = trainer_lib.Trainer.__init__

  def init(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    train_step, calls = self.train_step, [0]

    def counted(*step_args):
      result = train_step(*step_args)
      calls[0] += 1
      if calls[0] == steps:
        # Without the trainer's handler the default SIGINT handler would
        # raise KeyboardInterrupt and end the whole pytest session.
        assert signal.getsignal(signum) not in (
          signal.default_int_handler,
          signal.SIG_DFL,
        ), f"no handler for {signum!r} during training"
        signal.raise_signal(signum)
      return result

    self.train_step = counted

  monkeypatch.setattr(trainer_lib.Trainer, "__init__", init)


def subprocess_env(cache_dir: str) -> dict[str, str]:
  env = dict(os.environ)
  env.update(
    JAX_NUM_CPU_DEVICES="2",
    JAX_COMPILATION_CACHE_DIR=cache_dir,
    JAX_PLATFORMS="cpu",
    PYTHONUNBUFFERED="1",
  )
  # XLA_FLAGS stay the test process's: the commands' states are compared
  # bit for bit with in-process runs, so both must compile alike.
  return env


def main_command(workdir, *args: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "cifs_jax.main",
    "--config=configs/fmnist_resnet10.py:smoke",
    f"--workdir={workdir}",
    NO_FINAL_EVAL,
    *args,
  ]


# --------------------------------------------------------------- tiny data


def _random_split(n, shape, seed):
  rng = np.random.default_rng(seed)
  return (
    rng.integers(0, 256, (n, *shape), dtype=np.uint8),
    rng.integers(0, 10, n).astype(np.uint8),
  )


def write_tiny_cifar10(directory: pathlib.Path, num_train=64, num_test=80):
  """The extracted binary version: five training batches and a test batch
  of records (label byte, then the R, G, B planes)."""
  folder = directory / "cifar-10-batches-bin"
  folder.mkdir(parents=True)
  train, test = (
    _random_split(n, (32, 32, 3), seed)
    for seed, n in ((0, num_train), (1, num_test))
  )

  def records(images, labels):
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([labels[:, None], planes], axis=1).tobytes()

  bounds = np.linspace(0, num_train, 6).astype(int)
  for i in range(5):
    part = slice(bounds[i], bounds[i + 1])
    (folder / f"data_batch_{i + 1}.bin").write_bytes(
      records(train[0][part], train[1][part])
    )
  (folder / "test_batch.bin").write_bytes(records(*test))


def write_tiny_svhn(directory: pathlib.Path, num_train=64, num_test=80):
  """``{train,test}_32x32.mat``: X (32, 32, 3, N), y (N, 1) with 10 for 0."""
  directory.mkdir(parents=True)
  for split, n, seed in (("train", num_train, 2), ("test", num_test, 3)):
    images, labels = _random_split(n, (32, 32, 3), seed)
    scipy.io.savemat(
      directory / f"{split}_32x32.mat",
      {
        "X": images.transpose(1, 2, 3, 0),
        "y": np.where(labels == 0, 10, labels)[:, None],
      },
    )


# ------------------------------------------------------------ smoke runs


def check_workdir(
  workdir: pathlib.Path, config, results, *, steps_per_epoch: int, num_test: int
):
  """What a finished run leaves in its workdir."""
  epochs = config.train.epochs
  total_steps = epochs * steps_per_epoch
  eval_examples = min(config.eval.num_examples, num_test)

  # The config, as run.
  saved = json.loads((workdir / "config.json").read_text())
  assert saved == json.loads(config.to_json_best_effort())
  assert saved["data"]["name"] == config.data.name
  assert saved["train"]["epochs"] == epochs

  # metrics.jsonl: training lines every log_every_steps, one eval per epoch.
  lines = read_jsonl(workdir)
  train_lines = [l for l in lines if "train_loss" in l]
  eval_lines = [l for l in lines if "pgd_accuracy" in l]
  final_lines = [l for l in lines if "final/natural" in l]
  # The final natural and PGD check, as train_and_evaluate returned it.
  check_lines = [l for l in lines if "final_check/pgd_accuracy" in l]
  assert check_lines == [
    {"step": total_steps, **{f"final_check/{k}": v for k, v in results.items()}}
  ]
  assert len(train_lines) + len(eval_lines) + len(final_lines) + 1 == len(lines)
  every = config.train.log_every_steps
  assert [l["step"] for l in train_lines] == [
    e * steps_per_epoch + s
    for e in range(epochs)
    for s in range(every, steps_per_epoch + 1, every)
  ]
  for line in train_lines:
    assert set(line) >= TRAIN_KEYS
    assert all(math.isfinite(v) for v in line.values())
    assert line["train_loss"] > 0
    assert 0 <= line["train_accuracy"] <= 100  # percent, as evaluation's
    # Smoke configs have no milestones: the constant rate.
    assert line["learning_rate"] == config.train.learning_rate
    assert line["images_per_second"] > 0
  assert [l["step"] for l in eval_lines] == [
    (e + 1) * steps_per_epoch for e in range(epochs)
  ]
  for epoch, line in enumerate(eval_lines, 1):
    assert set(line) == EVAL_KEYS
    assert line["epoch"] == epoch and line["eval_examples"] == eval_examples
    for key in ("natural_accuracy", "pgd_accuracy"):
      # A count of correct examples, in percent.
      count = line[key] * eval_examples / 100
      assert 0 <= count <= eval_examples and count == pytest.approx(
        round(count), abs=1e-6
      )

  # TensorBoard has the same scalars.
  events = sorted(read_scalar_events(workdir / "tensorboard"))
  expected = sorted(
    (l["step"], k, v) for l in lines for k, v in l.items() if k != "step"
  )
  assert [e[:2] for e in events] == [e[:2] for e in expected]
  # Stored as float32.
  assert [e[2] for e in events] == pytest.approx(
    [e[2] for e in expected], rel=1e-6
  )

  # A checkpoint at the end of each epoch (the last ``keep``); the best is
  # one with the highest PGD accuracy.
  state, metadata, steps = read_checkpoint(workdir)
  assert steps == [l["step"] for l in eval_lines][-config.checkpoint.keep :]
  assert int(state["step"]) == total_steps
  assert metadata == {
    "epoch": epochs,
    "step_in_epoch": 0,
    "metrics": {
      k: v for k, v in eval_lines[-1].items() if k not in ("step", "epoch")
    },
  }
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
  pgd = {l["step"]: l["pgd_accuracy"] for l in eval_lines}
  assert pgd[best_step(workdir)] == max(pgd[s] for s in steps)

  # The final evaluation.
  final_examples = min(config.eval.final_num_examples, num_test)
  assert set(results) == {"natural_accuracy", "pgd_accuracy", "eval_examples"}
  assert results["eval_examples"] == final_examples
  assert 0 <= results["pgd_accuracy"] <= 100
  assert 0 <= results["natural_accuracy"] <= 100
  # The final robustness evaluation's report.
  reports = sorted(p.name for p in workdir.glob("eval_*.json"))
  if config.eval.final:
    assert reports == [f"eval_{config.eval.final_protocol}.json"]
    report = json.loads((workdir / reports[0]).read_text())
    # Its headline numbers in metrics.jsonl (and so TensorBoard), at the end.
    assert [l["step"] for l in final_lines] == [total_steps]
    assert final_lines[0]["final/natural"] == report["natural"]["top1"]
    assert final_lines[0]["final/worst_case"] == report["worst_case"]["top1"]
  else:
    assert not reports and not final_lines


@pytest.fixture(scope="module")
def fmnist_smoke(tmp_path_factory):
  """``fmnist_resnet10.py:smoke`` on real Fashion-MNIST, run once; several
  tests start from (copies of) its workdir."""
  if not HAS_FASHION_MNIST:
    pytest.skip(NO_FASHION_MNIST)
  workdir = tmp_path_factory.mktemp("fmnist_smoke")
  config = load_config("fmnist_resnet10")
  start = time.perf_counter()
  results = trainer_lib.train_and_evaluate(config, str(workdir))
  return workdir, config, results, time.perf_counter() - start


def test_smoke_fmnist_resnet10(fmnist_smoke):
  workdir, config, results, seconds = fmnist_smoke
  print(f"fmnist_resnet10:smoke took {seconds:.1f} s")
  check_workdir(
    workdir,
    config,
    results,
    steps_per_epoch=SMOKE_FMNIST_STEPS,
    num_test=10_000,
  )


@pytest.mark.parametrize(
  "final_eval",
  [False, pytest.param(True, marks=pytest.mark.long)],
  ids=["no_final_eval", "final_eval"],
)
@pytest.mark.parametrize(
  "name,data",
  # The Fashion-MNIST smoke run trains by default (test_smoke_fmnist_resnet10);
  # these configs' data readers run by default in test_data_files and
  # test_data_tfds, their validation in test_configs.
  [
    pytest.param("cifar_resnet18", "tfds_mock", marks=pytest.mark.slow),
    pytest.param("cifar_wrn28_10", "files", marks=pytest.mark.long),
    pytest.param("svhn_resnet18", "files", marks=pytest.mark.long),
  ],
)
def test_smoke_config_trains_evaluates_and_checkpoints(
  tmp_path, monkeypatch, name, data, final_eval
):
  config = load_config(name, "smoke", *([] if final_eval else [NO_FINAL_EVAL]))
  num_train, num_test = 64, 80
  source = contextlib.nullcontext()
  if data == "files":
    config.data.source = "files"
    config.data.data_dir = str(tmp_path / "data")
    if config.data.name == "cifar10":
      write_tiny_cifar10(tmp_path / "data", num_train, num_test)
    else:
      write_tiny_svhn(tmp_path / "data", num_train, num_test)
  else:
    # TFDS 4.9.10's mock leaves ``self`` unbound in batched reads.
    monkeypatch.setattr(
      mocking,
      "_getitems",
      lambda keys, generator, serialized=False: [generator[k] for k in keys],
    )
    monkeypatch.setattr(
      data_tfds_source, "server_unreachable", lambda host: None
    )
    num_test = num_train
    source = tfds.testing.mock_data(num_examples=num_train)
  start = time.perf_counter()
  with source:
    results = trainer_lib.train_and_evaluate(config, str(tmp_path / "run"))
  print(f"{name}:smoke took {time.perf_counter() - start:.1f} s")
  check_workdir(
    tmp_path / "run",
    config,
    results,
    steps_per_epoch=num_train // config.train.batch_size,
    num_test=num_test,
  )


# ----------------------------------------------------------- exact resume


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, fmnist_smoke):
  """The fmnist smoke config for 2 epochs (16 steps), uninterrupted."""
  del fmnist_smoke  # Compiles the same programs first.
  workdir = tmp_path_factory.mktemp("two_epochs")
  config = load_config(
    "fmnist_resnet10", "smoke", "--config.train.epochs=2", NO_FINAL_EVAL
  )
  results = trainer_lib.train_and_evaluate(config, str(workdir))
  return workdir, config, results


def test_two_epoch_run(two_epochs):
  workdir, config, results = two_epochs
  check_workdir(
    workdir,
    config,
    results,
    steps_per_epoch=SMOKE_FMNIST_STEPS,
    num_test=10_000,
  )


def test_resume_after_mid_epoch_stop_is_exact(
  tmp_path, monkeypatch, two_epochs
):
  """Stopped 3 steps into the second epoch, then resumed: the same final
  state, bit for bit, as the uninterrupted run (data order, augmentation
  and attack randomness, optimiser state and schedule all resume)."""
  reference, config, reference_results = two_epochs
  workdir = tmp_path / "run"
  stop_at = SMOKE_FMNIST_STEPS + 3
  with monkeypatch.context() as patch:
    interrupt_after(patch, stop_at)
    assert trainer_lib.train_and_evaluate(config, str(workdir)) == {}
  # Saved where it stopped, mid-epoch, without metrics (so never "best").
  state, metadata, steps = read_checkpoint(workdir)
  assert steps == [SMOKE_FMNIST_STEPS, stop_at]
  assert metadata == {"epoch": 1, "step_in_epoch": 3, "metrics": {}}
  assert int(state["step"]) == stop_at
  assert best_step(workdir) == SMOKE_FMNIST_STEPS
  assert max(l["step"] for l in read_jsonl(workdir)) < stop_at

  results = trainer_lib.train_and_evaluate(config, str(workdir))
  assert results == reference_results
  state, metadata, steps = read_checkpoint(workdir)
  expected_state, expected_metadata, _ = read_checkpoint(reference)
  assert steps == [SMOKE_FMNIST_STEPS, stop_at, 2 * SMOKE_FMNIST_STEPS]
  assert metadata == expected_metadata
  assert_states_equal(state, expected_state)
  # The resumed steps logged the same losses as the uninterrupted run.
  last = lambda lines: {
    l["step"]: {k: v for k, v in l.items() if k != "images_per_second"}
    for l in lines
  }
  assert last(read_jsonl(workdir)) == last(read_jsonl(reference))


# A subprocess trains and is stopped; test_resume_after_mid_epoch_stop_is_exact
# checks the resume in process by default.
@pytest.mark.slow
def test_sigterm_mid_epoch_saves_and_rerun_resumes(
  tmp_path, compile_cache, fmnist_smoke
):
  """``python -m cifs_jax.main`` gets SIGTERM while training: it saves the
  mid-epoch position and exits 0; run again, it resumes and finishes with
  the state of the uninterrupted in-process run."""
  reference = fmnist_smoke[0]
  workdir = tmp_path / "run"
  env = subprocess_env(compile_cache)
  log_path = tmp_path / "first.log"
  with open(log_path, "w") as log:
    process = subprocess.Popen(
      main_command(workdir),
      cwd=REPO,
      env=env,
      stdout=log,
      stderr=subprocess.STDOUT,
    )
    try:
      deadline = time.monotonic() + 300
      metrics = workdir / "metrics.jsonl"
      while not (metrics.exists() and metrics.read_text()):
        assert process.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "no training metrics after 300 s"
        time.sleep(0.02)
      process.send_signal(signal.SIGTERM)
      returncode = process.wait(timeout=120)
    finally:
      if process.poll() is None:
        process.kill()
  first_log = log_path.read_text()
  assert returncode == 0, first_log[-3000:]
  state, metadata, steps = read_checkpoint(workdir)
  stopped_at = steps[-1]
  assert steps == [stopped_at] and 0 < stopped_at < SMOKE_FMNIST_STEPS
  assert metadata == {"epoch": 0, "step_in_epoch": stopped_at, "metrics": {}}
  assert int(state["step"]) == stopped_at
  assert (
    f"Stop requested: saved at epoch 1, step {stopped_at} of"
    f" {SMOKE_FMNIST_STEPS}." in first_log
  )
  assert "Final state" not in first_log

  second = subprocess.run(
    main_command(workdir),
    check=False,
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert second.returncode == 0, second.stderr[-3000:]
  # Third-party INFO lines are off by default: Orbax used to log about 30
  # for this run's one checkpoint save (see --library_verbosity).
  orbax_lines = [l for l in second.stderr.splitlines() if "orbax" in l]
  assert len(orbax_lines) <= 2, orbax_lines
  assert (
    f"Resuming {workdir} after checkpoint step {stopped_at} (epoch 1, step"
    f" {stopped_at} of {SMOKE_FMNIST_STEPS})." in second.stderr
  )
  assert "Final state on 32 test images: natural" in second.stderr
  state, metadata, steps = read_checkpoint(workdir)
  expected_state, expected_metadata, _ = read_checkpoint(reference)
  assert steps == [stopped_at, SMOKE_FMNIST_STEPS]
  assert metadata == expected_metadata
  assert_states_equal(state, expected_state)


def test_rerunning_a_complete_run_says_so_and_changes_nothing(
  tmp_path, fmnist_smoke
):
  """The finished smoke run, run again: nothing is trained, evaluated or
  written, and no fresh state is built (compiling the model's init took
  most of the rerun's time); with eval.rerun_final the final evaluation
  runs again (here without the robustness report) and gives the same
  numbers."""
  source, config, results, _ = fmnist_smoke
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  before = snapshot(workdir)
  with contextlib.ExitStack() as stack:
    messages = stack.enter_context(
      mock.patch.object(trainer_lib.logging, "info")
    )
    stack.enter_context(
      mock.patch.object(
        trainer_lib.Trainer,
        "initial_state",
        property(lambda _: pytest.fail("built the fresh state")),
      )
    )
    assert trainer_lib.train_and_evaluate(config, str(workdir)) == {}
  assert any("is complete" in str(c) for c in messages.call_args_list)
  assert snapshot(workdir) == before
  again = load_config(
    "fmnist_resnet10", "smoke", NO_FINAL_EVAL, "--config.eval.rerun_final=True"
  )
  assert trainer_lib.train_and_evaluate(again, str(workdir)) == results
  assert snapshot(workdir / "checkpoints") == snapshot(source / "checkpoints")


def test_relative_workdir_trains_on_and_saves(
  tmp_path, monkeypatch, fmnist_smoke
):
  """A relative --workdir, as every README example writes it, from another
  working directory: training extends the run by an epoch and saves (Orbax
  refuses relative checkpoint paths; they are made absolute at the edge)."""
  shutil.copytree(fmnist_smoke[0], tmp_path / "runs" / "smoke")
  monkeypatch.chdir(tmp_path)
  config = load_config(
    "fmnist_resnet10", "smoke", "--config.train.epochs=2", NO_FINAL_EVAL
  )
  trainer_lib.train_and_evaluate(config, "runs/smoke")
  _, metadata, steps = read_checkpoint(tmp_path / "runs" / "smoke")
  assert steps[-1] == 2 * SMOKE_FMNIST_STEPS and metadata["epoch"] == 2


def test_a_run_whose_final_report_is_missing_finishes_its_evaluation(
  tmp_path, fmnist_smoke
):
  """Killed during its final evaluation, a trained run has no report: the
  same command runs the final evaluation (and only it), not "complete"."""
  source, config, _, _ = fmnist_smoke
  assert config.eval.final
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  report_name = f"eval_{config.eval.final_protocol}"
  expected = json.loads((source / f"{report_name}.json").read_text())
  for suffix in (".json", ".md"):
    (workdir / f"{report_name}{suffix}").unlink()
  before = snapshot(workdir / "checkpoints")
  with mock.patch.object(trainer_lib.logging, "info") as messages:
    trainer_lib.train_and_evaluate(config, str(workdir))
  assert any("finishing its final" in str(c) for c in messages.call_args_list)
  assert not any("is complete" in str(c) for c in messages.call_args_list)
  report = json.loads((workdir / f"{report_name}.json").read_text())
  assert report["worst_case"] == expected["worst_case"]
  assert snapshot(workdir / "checkpoints") == before


def test_a_second_training_on_one_workdir_is_refused(tmp_path, fmnist_smoke):
  """While one process trains in a workdir (it holds the lock), a second
  training there is refused before it loads anything, and writes nothing."""
  source, config, _, _ = fmnist_smoke
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  before = snapshot(workdir)
  with run_directory.RunDirectory(workdir).locked_for_training():
    with (
      mock.patch.object(trainer_lib.data, "load_split") as load_split,
      pytest.raises(
        run_directory.RunInUseError, match="Another process is training"
      ),
    ):
      trainer_lib.train_and_evaluate(config, str(workdir))
    load_split.assert_not_called()
  assert snapshot(workdir) == before


def test_a_workdir_that_is_a_file_is_refused_before_loading_data(tmp_path):
  workdir = tmp_path / "run"
  workdir.write_text("not a directory")
  config = load_config("fmnist_resnet10", "smoke", NO_FINAL_EVAL)
  with (
    mock.patch.object(trainer_lib.data, "load_split") as load_split,
    pytest.raises(NotADirectoryError, match=r"is a file, not a directory"),
  ):
    trainer_lib.train_and_evaluate(config, str(workdir))
  load_split.assert_not_called()


# ------------------------------------------------------ failures and guards


def _largest_file(directory: pathlib.Path) -> pathlib.Path:
  return max(
    (p for p in directory.rglob("*") if p.is_file()),
    key=lambda p: p.stat().st_size,
  )


def _truncate(path: pathlib.Path):
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
  "damage,message",
  [
    (
      lambda step: _truncate(_largest_file(step / "state")),
      r"Cannot restore checkpoint {step}:(?s:.*)Not starting from scratch",
    ),
    (
      lambda step: (step / "metadata" / "metadata").write_text("{garbage"),
      r"Cannot restore checkpoint {step}:(?s:.*)Not starting from scratch",
    ),
    (
      lambda step: _truncate(step / "metrics" / "metrics"),
      r"Cannot open checkpoint directory (?s:.*)Not starting from scratch",
    ),
  ],
  ids=["truncated_array_data", "garbage_metadata", "truncated_metrics"],
)
def test_corrupt_latest_checkpoint_refuses_to_start(
  tmp_path, two_epochs, damage, message
):
  source, config, _ = two_epochs
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  latest = workdir / "checkpoints" / str(2 * SMOKE_FMNIST_STEPS)
  damage(latest)
  before = snapshot(workdir / "checkpoints")
  metrics_before = (workdir / "metrics.jsonl").read_text()
  with pytest.raises(
    checkpoints.CheckpointError, match=message.format(step=latest)
  ):
    trainer_lib.train_and_evaluate(config, str(workdir))
  # Nothing trained, nothing saved or deleted.
  assert snapshot(workdir / "checkpoints") == before
  assert (workdir / "metrics.jsonl").read_text() == metrics_before


def _flip_bytes(path: pathlib.Path, count: int = 64):
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle : middle + count] = bytes(
    b ^ 0xFF for b in data[middle : middle + count]
  )
  path.write_bytes(bytes(data))


def test_bit_flips_in_the_latest_checkpoint_are_detected(tmp_path, two_epochs):
  source, config, _ = two_epochs
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  latest = workdir / "checkpoints" / str(2 * SMOKE_FMNIST_STEPS)
  damaged = _largest_file(latest / "state")
  _flip_bytes(damaged)
  before = snapshot(workdir / "checkpoints")
  with pytest.raises(
    checkpoints.CheckpointError,
    match=rf"(?s){damaged.relative_to(latest)}: sha256 differs"
    rf".*restore one of steps \[{SMOKE_FMNIST_STEPS}\]",
  ):
    trainer_lib.train_and_evaluate(config, str(workdir))
  assert snapshot(workdir / "checkpoints") == before


def test_moving_the_corrupt_checkpoint_out_resumes_from_the_previous(
  tmp_path, two_epochs
):
  """The recovery the error message suggests, and an exact resume from an
  end-of-epoch checkpoint."""
  source, config, expected_results = two_epochs
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  latest = workdir / "checkpoints" / str(2 * SMOKE_FMNIST_STEPS)
  _truncate(_largest_file(latest / "state"))
  with pytest.raises(checkpoints.CheckpointError, match="move"):
    trainer_lib.train_and_evaluate(config, str(workdir))
  latest.rename(tmp_path / "damaged")
  assert trainer_lib.train_and_evaluate(config, str(workdir)) == (
    expected_results
  )
  state, _, steps = read_checkpoint(workdir)
  assert steps == [SMOKE_FMNIST_STEPS, 2 * SMOKE_FMNIST_STEPS]
  assert_states_equal(state, read_checkpoint(source)[0])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
  tmp_path, fmnist_smoke
):
  """One good epoch, then a second with a learning rate of 1e6."""
  source = fmnist_smoke[0]
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  config = load_config(
    "fmnist_resnet10",
    "smoke",
    "--config.train.epochs=2",
    "--config.train.learning_rate=1e6",
    NO_FINAL_EVAL,
  )
  with pytest.raises(
    trainer_lib.NonFiniteLossError,
    match=r"Non-finite training metrics .*(nan|inf).* at "
    r"epoch 2, step \d+.*learning_rate",
  ):
    trainer_lib.train_and_evaluate(config, str(workdir))
  # The good checkpoint is the only one, and it restores to the good state.
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [
    str(SMOKE_FMNIST_STEPS)
  ]
  state, metadata, steps = read_checkpoint(workdir)
  assert steps == [SMOKE_FMNIST_STEPS] and metadata["epoch"] == 1
  assert_states_equal(state, read_checkpoint(source)[0])
  # Training did run into the second epoch before stopping.
  assert max(l["step"] for l in read_jsonl(workdir)) > SMOKE_FMNIST_STEPS


def test_unknown_config_key_is_named(tmp_path):
  config = load_config("fmnist_resnet10")
  config.unlock()
  config.train.epoch = 3
  with pytest.raises(
    KeyError,
    match=r"Unknown config key 'config\.train"
    r"\.epoch'.*'epochs'",
  ):
    trainer_lib.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_unknown_config_key_on_the_command_line_is_named(
  tmp_path, compile_cache
):
  result = subprocess.run(
    main_command(tmp_path / "run", "--config.train.epoch=3"),
    check=False,
    cwd=REPO,
    env=subprocess_env(compile_cache),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0
  assert "config.train.epoch" in result.stderr, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
  "override,key",
  [
    ("--config.model.defense=cas", "model.defense"),
    ("--config.model.width=16", "model.width"),
    # Not the model, but it changes the data order and the epoch's length.
    ("--config.train.batch_size=64", "train.batch_size"),
  ],
)
def test_workdir_of_another_model_is_refused(
  tmp_path, fmnist_smoke, override, key
):
  source = fmnist_smoke[0]
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  before = snapshot(workdir)
  config = load_config("fmnist_resnet10", "smoke", override)
  with pytest.raises(
    ValueError,
    match=rf"(?s)differs from the one saved"
    rf".*\n  {key}: .* \(saved\) -> ",
  ):
    trainer_lib.train_and_evaluate(config, str(workdir))
  assert snapshot(workdir) == before


# test_cli runs the evaluate command (relative paths, tiny data) by default.
@pytest.mark.slow
def test_evaluate_command_on_a_trained_run(
  tmp_path, fmnist_smoke, compile_cache
):
  """``python -m cifs_jax.evaluate`` restores the run's last checkpoint and
  writes JSON and Markdown; its natural accuracy on the first 64 test
  examples is the one the trainer measured on the same state."""
  workdir = tmp_path / "run"
  shutil.copytree(fmnist_smoke[0], workdir)
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "cifs_jax.evaluate",
      f"--workdir={workdir}",
      "--checkpoint=last",
      "--protocol=paper",
      "--attacks=fgsm,pgd20",
      "--num_examples=64",
    ],
    check=False,
    cwd=REPO,
    env=subprocess_env(compile_cache),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Table 1" in result.stdout
  results = json.loads((workdir / "eval_paper_last.json").read_text())
  assert (workdir / "eval_paper_last.md").read_text().startswith("# ")
  assert results["num_examples"] == 64
  assert sorted(results["attacks"]) == ["fgsm", "pgd20"]
  trainer_eval = [r for r in read_jsonl(workdir) if "natural_accuracy" in r]
  assert results["natural"]["top1"] == pytest.approx(
    trainer_eval[-1]["natural_accuracy"]
  )
  assert results["worst_case"]["top1"] <= results["natural"]["top1"]


# test_evaluation checks the resumed evaluation's numbers in process by
# default.
@pytest.mark.slow
def test_ctrl_c_during_evaluation_stops_at_once_and_the_rerun_continues(
  tmp_path, fmnist_smoke, compile_cache
):
  """SIGINT once the first attack run is saved: the command ends within
  seconds with one line naming the partial file (no traceback, status
  130), and the same command then finishes from it."""
  workdir = tmp_path / "run"
  shutil.copytree(fmnist_smoke[0], workdir)
  command = [
    sys.executable,
    "-m",
    "cifs_jax.evaluate",
    f"--workdir={workdir}",
    "--attacks=fgsm,pgd20",
    "--num_examples=64",
  ]
  env = subprocess_env(compile_cache)
  partial = workdir / "eval_paper_last.partial.json"
  process = subprocess.Popen(
    command,
    cwd=REPO,
    env=env,
    stderr=subprocess.PIPE,
    text=True,
    # Ctrl-C's default action in the command, as in a terminal, even when
    # the tests run as a background job (which inherits SIGINT ignored).
    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
  )
  try:
    deadline = time.monotonic() + 300
    while not partial.exists():
      assert process.poll() is None, process.stderr.read()[-3000:]
      assert time.monotonic() < deadline, "no finished attack run in 300 s"
      time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    interrupted = time.monotonic()
    returncode = process.wait(timeout=60)
    seconds = time.monotonic() - interrupted
  finally:
    if process.poll() is None:
      process.kill()
  stderr = process.stderr.read()
  assert returncode == 130, stderr[-3000:]
  assert seconds < 10, seconds
  assert f"The finished attack runs are kept in {partial}" in stderr
  assert "Traceback" not in stderr, stderr[-3000:]
  assert partial.exists() and not (workdir / "eval_paper_last.json").exists()

  second = subprocess.run(
    command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600
  )
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Continuing the evaluation" in second.stderr
  assert (workdir / "eval_paper_last.json").exists() and not partial.exists()


# ------------------------------------------- python -m cifs_jax.evaluate


def per_epoch_natural_accuracy(workdir) -> dict[int, float]:
  """{checkpoint step: natural accuracy (%) of the trainer's per-epoch
  evaluation}."""
  return {
    line["step"]: line["natural_accuracy"]
    for line in read_jsonl(workdir)
    if "natural_accuracy" in line
  }


@pytest.mark.parametrize(
  "checkpoint",
  [pytest.param("best", marks=pytest.mark.slow), str(SMOKE_FMNIST_STEPS)],
  ids=["best", "step"],
)
def test_evaluate_a_chosen_checkpoint_into_another_directory(
  tmp_path, two_epochs, checkpoint
):
  """``--checkpoint=best`` or a step, ``--batch_size``, ``--output``: the
  natural accuracy is the trainer's per-epoch number on the same checkpoint
  (the same 64 examples), the report says which checkpoint it is, and the
  workdir is only read."""
  workdir = two_epochs[0]
  before = snapshot(workdir)
  output = tmp_path / "reports"
  results = runner.evaluate_checkpoint(
    str(workdir),
    checkpoint=checkpoint,
    attacks=("fgsm",),
    num_examples=64,
    batch_size=24,  # 3 batches, the last one padded.
    output=str(output),
  )
  step = best_step(workdir) if checkpoint == "best" else int(checkpoint)
  assert results["natural"]["top1"] == pytest.approx(
    per_epoch_natural_accuracy(workdir)[step]
  )
  label = results["run"]
  assert label["checkpoint"]["which"] == checkpoint_which(checkpoint)
  assert label["checkpoint"]["step"] == step
  assert label["checkpoint"]["epoch"] == step // SMOKE_FMNIST_STEPS
  assert label["checkpoint"]["best_metric"] == "pgd_accuracy"
  assert label["checkpoint"]["per_epoch_eval_examples"] == 64
  assert (label["dataset"], label["model"], label["defense"]) == (
    "fashion_mnist",
    "resnet10",
    "cifs",
  )
  assert label["eps"] == 0.1 and label["num_examples"] == 64
  assert label["jax_version"] == jax.__version__
  assert label["git_commit"] == runner.project_commit()
  name = f"eval_paper_{checkpoint}"
  assert json.loads((output / f"{name}.json").read_text()) == results
  assert f"step {step}, epoch" in (output / f"{name}.md").read_text()
  assert sorted(p.name for p in output.iterdir()) == [
    f"{name}.json",
    f"{name}.md",
  ]  # The partial results are gone.
  assert snapshot(workdir) == before


def checkpoint_which(flag: str) -> str | int:
  return flag if flag in ("best", "last") else int(flag)


def test_evaluate_refuses_bad_input_before_any_attack(tmp_path, two_epochs):
  """A missing config.json, a missing run, ``--checkpoint=²`` and an
  unwritable output are clear errors, and nothing is created."""
  with pytest.raises(FileNotFoundError, match="config.json does not exist"):
    runner.evaluate_checkpoint(str(tmp_path / "typo"))
  config = two_epochs[1]
  with pytest.raises(FileNotFoundError, match=r"typo does not exist"):
    runner.evaluate_checkpoint(str(tmp_path / "typo"), config=config)
  assert not (tmp_path / "typo").exists()
  with pytest.raises(ValueError, match=r"expected 'best', .* got '²'"):
    runner.evaluate_checkpoint(str(two_epochs[0]), checkpoint="²")
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(NotADirectoryError, match=f"{blocker} is a file"):
    runner.evaluate_checkpoint(str(two_epochs[0]), output=str(blocker / "out"))


@pytest.mark.slow
def test_evaluate_command_strong_protocol_and_config_flag(
  tmp_path, two_epochs, compile_cache
):
  """``--config`` (instead of config.json), ``--protocol=strong`` and the
  default ``--checkpoint=last``, as a command; then ``--checkpoint=²`` is a
  usage error without a traceback."""
  workdir = tmp_path / "run"
  shutil.copytree(two_epochs[0], workdir)
  (workdir / "config.json").unlink()
  command = [
    sys.executable,
    "-m",
    "cifs_jax.evaluate",
    f"--workdir={workdir}",
    "--config=configs/fmnist_resnet10.py:smoke",
    "--protocol=strong",
    "--attacks=fgsm",
    "--num_examples=32",
  ]
  run = lambda *extra: subprocess.run(  # noqa: E731
    command + list(extra),
    check=False,
    cwd=REPO,
    env=subprocess_env(compile_cache),
    capture_output=True,
    text=True,
    timeout=600,
  )
  result = run()
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((workdir / "eval_strong_last.json").read_text())
  assert results["protocol"]["gradient_modes"] == ["stop", "full"]
  assert {r["gradient"] for r in results["attacks"]["fgsm"]["runs"]} == {
    "stop",
    "full",
  }
  assert results["run"]["checkpoint"]["step"] == 2 * SMOKE_FMNIST_STEPS
  natural = per_epoch_natural_accuracy(workdir)[2 * SMOKE_FMNIST_STEPS]
  # The trainer measured 64 examples; these are the first 32 of them.
  assert results["natural"]["top1"] * 32 / 100 <= natural * 64 / 100
  assert "min over beta_atk (paper's comparator)" in result.stdout

  bad = run("--checkpoint=²")
  assert bad.returncode != 0
  assert "--checkpoint: expected 'best', 'last' or a step" in bad.stderr
  assert "Traceback" not in bad.stderr


# ------------------------------------------------- learning, real data


@needs_fashion_mnist
@pytest.mark.long  # ~4 min on a 2-core machine
def test_pgd_at_on_fashion_mnist_beats_chance(tmp_path):
  """186 PGD-AT steps (2 epochs of 12,000 examples, batch 128) of the smoke
  ResNet-10 (width 8). Measured on 1,000 test examples under the trainer's
  PGD-10 (step eps / 10, eps 0.1): natural / PGD accuracy 70.3 / 50.9 %
  (seed 0), 71.0 / 40.1 (seed 1), 75.1 / 53.7 (seed 2); chance is 10 %.
  About 85 s on a 2-core CPU."""
  config = load_config(
    "fmnist_resnet10",
    "smoke",
    "--config.train.max_examples=12000",
    "--config.train.batch_size=128",
    "--config.train.epochs=2",
    "--config.train.log_every_steps=16",
    "--config.eval.batch_size=250",
    "--config.eval.num_examples=1000",
    "--config.eval.final_num_examples=1000",
    "--config.eval.pgd_steps=10",
    NO_FINAL_EVAL,
  )
  results = trainer_lib.train_and_evaluate(config, str(tmp_path))
  print("Fashion-MNIST PGD-AT smoke:", results)
  assert results["eval_examples"] == 1000
  assert results["natural_accuracy"] > 60
  assert results["pgd_accuracy"] > 30
  # The attack does something.
  assert results["pgd_accuracy"] < results["natural_accuracy"] - 5
