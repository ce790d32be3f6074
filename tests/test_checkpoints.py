"""cifs_jax.runs.checkpoints (the Orbax Checkpointer) and the config
guard of cifs_jax.runs.directory."""

import contextlib
import hashlib
import json
import os
import pathlib
import signal
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity
import pytest
from flax.training import train_state

from cifs_jax.runs import directory as run_directory
from cifs_jax.runs import checkpoints


class TrainState(train_state.TrainState):
  batch_stats: Any
  key: jax.Array  # Raw uint32 key data.


def make_state(seed: int) -> TrainState:
  """A small train state after one SGD-momentum step, distinct per seed."""
  rng = np.random.default_rng(seed)
  params = {
    "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 3, 8)), jnp.float32)},
    "head": {
      "kernel": jnp.asarray(rng.normal(size=(8, 10)), jnp.float32),
      "bias": jnp.zeros((10,), jnp.float32),
    },
  }
  state = TrainState.create(
    apply_fn=None,
    params=params,
    tx=optax.sgd(0.1, momentum=0.9),
    batch_stats={
      "bn": {
        "mean": jnp.full((8,), seed, jnp.float32),
        "var": jnp.ones((8,), jnp.float32),
      }
    },
    key=jax.random.key_data(jax.random.key(seed)),
  )
  grads = jax.tree.map(jnp.ones_like, params)
  return jax.jit(lambda s: s.apply_gradients(grads=grads))(state)  # Array step.


def assert_trees_equal(actual, expected):
  """Same leaf paths, dtypes, shapes and bits (static fields like tx may
  differ)."""
  actual, expected = (
    jax.tree_util.tree_flatten_with_path(t)[0] for t in (actual, expected)
  )
  assert [path for path, _ in actual] == [path for path, _ in expected]
  for (_, a), (_, e) in zip(actual, expected):
    assert a.dtype == e.dtype and a.shape == e.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def abstract(state):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


@pytest.fixture
def ckpt_dir(tmp_path) -> pathlib.Path:
  return tmp_path / "checkpoints"


def save_all(ckpt, steps_and_accuracies):
  """Saves make_state(step) at each step, with pgd_accuracy unless None."""
  for step, acc in steps_and_accuracies:
    metrics = None if acc is None else {"pgd_accuracy": acc, "loss": 1.0}
    ckpt.save(step, make_state(step), metadata={"epoch": step}, metrics=metrics)
  ckpt.wait_until_finished()


@pytest.mark.parametrize("target_kind", ["concrete", "abstract"])
def test_round_trip_is_bit_exact(ckpt_dir, target_kind):
  state = make_state(1)
  meta = {"epoch": 3, "step_in_epoch": 17, "data_seed": 42, "order": [2, 0, 1]}
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    ckpt.save(100, state, metadata=meta, metrics={"pgd_accuracy": 0.5})
  target = make_state(2) if target_kind == "concrete" else abstract(state)
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    restored, restored_meta = ckpt.restore("last", target)
  assert isinstance(restored, TrainState)
  assert isinstance(restored.opt_state[0], optax.TraceState)
  assert restored.key.dtype == jnp.uint32
  assert_trees_equal(restored, state)
  assert restored_meta == {**meta, "metrics": {"pgd_accuracy": 0.5}}


def test_restore_takes_sharding_from_target(ckpt_dir):
  state = make_state(1)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("batch",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state
  )
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    ckpt.save(1, state)
    restored, _ = ckpt.restore(1, target)
  assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(restored))
  assert_trees_equal(restored, state)


def test_keeps_last_n_and_best(ckpt_dir):
  with checkpoints.Checkpointer(ckpt_dir, max_to_keep=2) as ckpt:
    # Step 2 is the best; 3 and 5 have no metric (e.g. saved on SIGTERM).
    save_all(
      ckpt, [(1, 0.5), (2, 0.9), (3, None), (4, 0.3), (5, None), (6, 0.4)]
    )
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.best_step() == 2
  assert sorted(int(p.name) for p in ckpt_dir.iterdir()) == [2, 5, 6]

  # A new process sees the same, with the metrics read back from disk.
  with checkpoints.Checkpointer(ckpt_dir, max_to_keep=2) as ckpt:
    assert (ckpt.latest_step(), ckpt.best_step()) == (6, 2)
    for which, step in [("best", 2), ("last", 6), (5, 5)]:
      restored, meta = ckpt.restore(which, abstract(make_state(0)))
      assert_trees_equal(restored, make_state(step))
      assert meta["epoch"] == step


def test_checkpoints_without_the_metric_never_become_best(ckpt_dir):
  with checkpoints.Checkpointer(ckpt_dir, max_to_keep=1) as ckpt:
    ckpt.save(1, make_state(1))
    ckpt.save(2, make_state(2), metrics={"loss": 0.1})  # No pgd_accuracy.
    ckpt.save(3, make_state(3), metrics={"pgd_accuracy": float("nan")})
    assert ckpt.best_step() is None
    with pytest.raises(FileNotFoundError, match=r"'pgd_accuracy'.*\[3\]"):
      ckpt.restore("best", make_state(0))
    save_all(ckpt, [(4, 0.2), (5, None), (6, None)])
    assert ckpt.all_steps() == [4, 6]
    assert ckpt.best_step() == 4


def test_missing_step_names_existing_steps(ckpt_dir):
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    with pytest.raises(FileNotFoundError, match="No checkpoints in"):
      ckpt.restore("last", make_state(0))
    save_all(ckpt, [(1, None), (2, None)])
    with pytest.raises(FileNotFoundError, match=r"step 7 .*\[1, 2\]"):
      ckpt.restore(7, make_state(0))
    with pytest.raises(ValueError, match="which must be"):
      ckpt.restore("first", make_state(0))


def test_existing_step_is_not_overwritten(ckpt_dir):
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    save_all(ckpt, [(1, 0.5), (2, 0.6), (4, None)])
    with pytest.raises(ValueError, match="already exists at step 2"):
      ckpt.save(2, make_state(99), metrics={"pgd_accuracy": 1.0})
    with pytest.raises(
      ValueError, match="must increase.*latest checkpoint .* is step 4"
    ):
      ckpt.save(3, make_state(99))
    restored, meta = ckpt.restore(2, make_state(0))
  assert_trees_equal(restored, make_state(2))
  assert meta["metrics"]["pgd_accuracy"] == 0.6


def test_failed_save_keeps_previous_checkpoints(ckpt_dir):
  with checkpoints.Checkpointer(ckpt_dir, max_to_keep=1) as ckpt:
    save_all(ckpt, [(1, 0.5)])
    bad_state = {"params": make_state(2).params, "bad": object()}
    with pytest.raises(
      checkpoints.CheckpointError, match=r"step 2 .*steps \[1\]"
    ):
      ckpt.save(2, bad_state)
    with pytest.raises(ValueError, match="JSON"):
      ckpt.save(2, make_state(2), metadata={"not_json": object()})
    assert ckpt.all_steps() == [1]
    ckpt.save(2, make_state(2))  # The step is free again.
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [1, 2]  # 1 is the best, 2 the last.


def test_failed_async_commit_keeps_previous_checkpoints(ckpt_dir, monkeypatch):
  """A failure in the background commit must not delete the older step."""
  with checkpoints.Checkpointer(ckpt_dir, max_to_keep=1) as ckpt:
    save_all(ckpt, [(1, 0.5)])

    async def fail(*args, **kwargs):
      raise OSError("disk full (simulated)")

    with monkeypatch.context() as patch:
      patch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", fail)
      ckpt.save(2, make_state(2), metrics={"pgd_accuracy": 0.9})
      with pytest.raises(checkpoints.CheckpointError, match="disk full"):
        ckpt.wait_until_finished()
    assert ckpt.all_steps() == [1]
    assert ckpt.best_step() == 1
    restored, _ = ckpt.restore("last", make_state(0))
  assert_trees_equal(restored, make_state(1))


def _largest_file(directory: pathlib.Path) -> pathlib.Path:
  return max(
    (p for p in directory.rglob("*") if p.is_file()),
    key=lambda p: p.stat().st_size,
  )


@pytest.mark.parametrize(
  "damage",
  [
    lambda step_dir: _truncate(_largest_file(step_dir / "state")),
    lambda step_dir: (step_dir / "state" / "manifest.ocdbt").unlink(),
    lambda step_dir: _truncate(step_dir / "metadata" / "metadata"),
  ],
  ids=["truncated_array_data", "deleted_manifest", "truncated_metadata"],
)
def test_corrupt_checkpoint_raises_clear_error(ckpt_dir, damage):
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    save_all(ckpt, [(1, 0.5), (2, 0.6)])
  damage(ckpt_dir / "2")
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    with pytest.raises(checkpoints.CheckpointError) as error:
      ckpt.restore("last", abstract(make_state(0)))
    message = str(error.value)
    assert f"Cannot restore checkpoint {ckpt_dir / '2'}" in message
    assert "corrupt or truncated" in message and "steps [1]" in message
    restored, _ = ckpt.restore(1, abstract(make_state(0)))  # Still fine.
  assert_trees_equal(restored, make_state(1))


def test_corrupt_metrics_file_fails_on_open(ckpt_dir):
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    save_all(ckpt, [(1, 0.5), (2, 0.6)])
  _truncate(ckpt_dir / "2" / "metrics" / "metrics")
  with pytest.raises(
    checkpoints.CheckpointError,
    match=r"(?s)Cannot open checkpoint directory .*\['1', '2'\]",
  ):
    checkpoints.Checkpointer(ckpt_dir)


def _truncate(path: pathlib.Path):
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def make_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(
    {
      "model": {
        "name": "resnet18",
        "cifs": {"topk": 2, "layers": ("b1", "b2")},
      },
      "data": {"name": "cifar10", "batch_size": 128},
      "train": {"epochs": 120},
    }
  )
  for key, value in overrides.items():
    section, name = key.split("__")
    config[section][name] = value
  return config


def test_config_guard_allows_non_model_changes(tmp_path):
  run = run_directory.RunDirectory(tmp_path)
  run.check_compatible(make_config())  # No config yet.
  run.save_config(make_config())
  assert (tmp_path / "config.json").exists()
  run.check_compatible(make_config())
  longer = make_config(train__epochs=200, data__batch_size=64)
  run.check_compatible(longer)
  run.save_config(longer)
  run.check_compatible(longer)
  with pytest.raises(
    ValueError, match="train.epochs: 200 .saved. -> 120 .new."
  ):
    run.check_compatible(make_config(), keys=("train",))


def test_config_guard_refuses_model_changes(tmp_path):
  run = run_directory.RunDirectory(tmp_path)
  run.save_config(make_config())
  config = make_config(data__name="cifar100")
  config.model.cifs.topk = 3
  config.model.cifs.alpha = 1.0
  with pytest.raises(ValueError) as error:
    run.check_compatible(config)
  message = str(error.value)
  assert "data.name: 'cifar10' (saved) -> 'cifar100' (new)" in message
  assert "model.cifs.topk: 2 (saved) -> 3 (new)" in message
  assert "model.cifs.alpha: '<missing>' (saved) -> 1.0 (new)" in message
  assert "batch_size:" not in message


def _flip_bits(path: pathlib.Path, count: int = 16):
  """Inverts ``count`` bytes in the middle of a file (same size)."""
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle : middle + count] = bytes(
    b ^ 0xFF for b in data[middle : middle + count]
  )
  path.write_bytes(bytes(data))


def test_checksums_cover_every_file_of_a_step(ckpt_dir):
  """All but orbax's commit records, which it writes after them."""
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    save_all(ckpt, [(1, 0.5)])
  manifest = json.loads((ckpt_dir / "1" / "checksums.json").read_text())
  files = {
    str(p.relative_to(ckpt_dir / "1")): hashlib.sha256(p.read_bytes())
    for p in (ckpt_dir / "1").rglob("*")
    if p.is_file()
    and str(p.relative_to(ckpt_dir / "1"))
    not in ("checksums.json", "_CHECKPOINT_METADATA", "commit_success.txt")
  }
  assert manifest["algorithm"] == "sha256"
  assert manifest["files"] == {k: v.hexdigest() for k, v in files.items()}
  assert any(name.startswith("state/") for name in manifest["files"])


@pytest.mark.parametrize(
  "damage,problem",
  [
    (lambda step: _flip_bits(_largest_file(step / "state")), "sha256 differs"),
    (lambda step: _largest_file(step / "state").unlink(), "missing"),
    (
      lambda step: (step / "state" / "extra").write_bytes(b"x"),
      "not in the checksums",
    ),
  ],
  ids=["flipped_bits", "deleted_file", "added_file"],
)
def test_damaged_checkpoint_names_the_file(ckpt_dir, damage, problem):
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    save_all(ckpt, [(1, 0.5), (2, 0.6)])
  largest = _largest_file(ckpt_dir / "2" / "state")
  damage(ckpt_dir / "2")
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    with pytest.raises(checkpoints.CheckpointError) as error:
      ckpt.restore("last", abstract(make_state(0)))
    message = str(error.value)
    name = (
      "state/extra"
      if problem.startswith("not")
      else largest.relative_to(ckpt_dir / "2")
    )
    assert f"  {name}: {problem}" in message
    assert f"Cannot restore checkpoint {ckpt_dir / '2'}: the" in message
    assert "Existing steps: [1, 2]" in message and "restore_step" in message
    restored, _ = ckpt.restore(1, abstract(make_state(0)))  # Still fine.
  assert_trees_equal(restored, make_state(1))


def test_step_without_checksums_restores_with_a_warning(ckpt_dir, caplog):
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    save_all(ckpt, [(1, 0.5)])
  (ckpt_dir / "1" / "checksums.json").unlink()  # e.g. an older checkpoint.
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    restored, _ = ckpt.restore(1, abstract(make_state(0)))
  assert_trees_equal(restored, make_state(1))
  assert "cannot verify" in caplog.text


@contextlib.contextmanager
def _deadline(seconds: int):
  """Raises TimeoutError in the block after ``seconds`` (a hashing loop or a
  blocked open is interrupted by SIGALRM), so a hang fails the test."""

  def expire(signum, frame):
    raise TimeoutError(f"still running after {seconds} s")

  previous = signal.signal(signal.SIGALRM, expire)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _link_to_dev_zero(state: pathlib.Path) -> pathlib.Path:
  (state / "zeros").symlink_to("/dev/zero")
  return state / "zeros"


def _fifo(state: pathlib.Path) -> pathlib.Path:
  os.mkfifo(state / "fifo")
  return state / "fifo"


def _link_to_directory(state: pathlib.Path) -> pathlib.Path:
  (state / "loop").symlink_to(state)
  return state / "loop"


def _link_to_copy(state: pathlib.Path) -> pathlib.Path:
  """Replaces a file by a symlink to an identical copy outside the step."""
  path = _largest_file(state)
  copy = state.parent.parent.parent / f"copy-of-{path.name}"
  copy.write_bytes(path.read_bytes())
  path.unlink()
  path.symlink_to(copy)
  return path


@pytest.mark.parametrize(
  "make, kind",
  [
    (_link_to_dev_zero, "symbolic link"),
    (_fifo, "FIFO"),
    (_link_to_directory, "symbolic link"),
    (_link_to_copy, "symbolic link"),
  ],
  ids=["link-to-dev-zero", "fifo", "link-to-directory", "link-to-copy"],
)
def test_step_holding_a_link_or_special_file_is_refused(ckpt_dir, make, kind):
  """Before the fix restore hashed /dev/zero forever, blocked opening the
  FIFO, and followed a link to an identical copy without a word."""
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    save_all(ckpt, [(1, 0.5), (2, 0.6)])
  with checkpoints.Checkpointer(ckpt_dir) as ckpt, _deadline(20):
    path = make(ckpt_dir / "2" / "state")
    with pytest.raises(
      checkpoints.CheckpointError,
      match=f"Cannot restore checkpoint {ckpt_dir / '2'}: {path} is a {kind}",
    ):
      ckpt.restore("last", abstract(make_state(0)))
  with (
    _deadline(20),
    pytest.raises(
      checkpoints.CheckpointError,
      match=f"Cannot open checkpoint directory {ckpt_dir}: {path} is a {kind}",
    ),
  ):
    checkpoints.Checkpointer(ckpt_dir, read_only=True)


@pytest.mark.parametrize(
  "content",
  [
    '{"files": ["a"]}',
    '{"algorithm": "sha256", "files": ["a"]}',
    '{"algorithm": "sha256", "files": {"state/x": 5}}',
    '{"algorithm": "md5", "files": {}}',
    "[]",
    '{"files": ',
  ],
)
def test_malformed_checksums_file_is_named(ckpt_dir, content):
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    save_all(ckpt, [(1, 0.5)])
  checksums = ckpt_dir / "1" / "checksums.json"
  checksums.write_text(content)
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    with pytest.raises(
      checkpoints.CheckpointError,
      match=f"Cannot restore checkpoint .*Cannot read {checksums}",
    ):
      ckpt.restore(1, abstract(make_state(0)))


def test_a_kill_right_after_the_commit_leaves_the_checksums(
  ckpt_dir, monkeypatch, caplog
):
  """Orbax's rename into place, then a failure as a kill would leave it:
  before the fix the step stayed without checksums for good."""
  commit = ocp.path.atomicity.AtomicRenameTemporaryPath.finalize

  async def commit_then_die(self):
    await commit(self)
    if os.fspath(self.get_final().parent) == os.fspath(ckpt_dir):
      raise OSError("killed right after the commit (simulated)")

  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    save_all(ckpt, [(1, 0.5)])
    with monkeypatch.context() as patch:
      patch.setattr(
        ocp.path.atomicity.AtomicRenameTemporaryPath,
        "finalize",
        commit_then_die,
      )
      ckpt.save(2, make_state(2), metrics={"pgd_accuracy": 0.9})
      with pytest.raises(checkpoints.CheckpointError, match="killed"):
        ckpt.wait_until_finished()
  assert (ckpt_dir / "2" / "checksums.json").is_file()
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    restored, _ = ckpt.restore("last", abstract(make_state(0)))
  assert_trees_equal(restored, make_state(2))
  assert "cannot verify" not in caplog.text


def test_the_only_checkpoint_corrupt_says_there_is_no_other(ckpt_dir):
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    save_all(ckpt, [(1, 0.5)])
  _truncate(_largest_file(ckpt_dir / "1" / "state"))
  (ckpt_dir / "1" / "checksums.json").unlink()  # Let orbax find it.
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    with pytest.raises(
      checkpoints.CheckpointError,
      match=r"holds no other checkpoint \(steps \[1\]\)",
    ):
      ckpt.restore("last", abstract(make_state(0)))


def test_read_only_creates_nothing_and_refuses_to_save(tmp_path, ckpt_dir):
  missing = tmp_path / "typo" / "checkpoints"
  with pytest.raises(FileNotFoundError, match=f"{missing} does not exist"):
    checkpoints.Checkpointer(missing, read_only=True)
  assert not (tmp_path / "typo").exists()
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    save_all(ckpt, [(1, 0.5), (2, 0.4)])
  before = sorted(str(p) for p in tmp_path.rglob("*"))
  with checkpoints.Checkpointer(ckpt_dir, read_only=True) as ckpt:
    assert (ckpt.all_steps(), ckpt.best_step()) == ([1, 2], 1)
    restored, _ = ckpt.restore("best", abstract(make_state(0)))
    with pytest.raises(ValueError, match="read-only; cannot save step 3"):
      ckpt.save(3, make_state(3))
  assert_trees_equal(restored, make_state(1))
  assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_set_aside_after_moves_later_steps_and_frees_them(tmp_path, ckpt_dir):
  aside = tmp_path / "superseded"
  with checkpoints.Checkpointer(ckpt_dir, max_to_keep=5) as ckpt:
    save_all(ckpt, [(1, 0.5), (2, 0.6), (3, 0.7)])
    assert ckpt.set_aside_after(1, aside) == [2, 3]
    assert ckpt.all_steps() == [1] and ckpt.best_step() == 1
    save_all(ckpt, [(2, 0.1)])  # Step 2 is free again.
    restored, _ = ckpt.restore(2, abstract(make_state(0)))
  assert_trees_equal(restored, make_state(2))
  assert sorted(p.name for p in aside.iterdir()) == ["2", "3"]
  with checkpoints.Checkpointer(aside, read_only=True) as moved:
    assert moved.all_steps() == [2, 3]  # Intact, still restorable.
    restored, _ = moved.restore(3, abstract(make_state(0)))
  assert_trees_equal(restored, make_state(3))


@pytest.mark.parametrize(
  "which,expected",
  [("best", "best"), ("last", "last"), ("12", 12), (7, 7), ("0", 0)],
)
def test_parse_which_accepts(which, expected):
  assert checkpoints.parse_which(which) == expected


@pytest.mark.parametrize("which", ["²", "-1", "1.5", "", "first", -3, True])
def test_parse_which_refuses(which):
  with pytest.raises(ValueError, match="expected 'best', 'last' or a step"):
    checkpoints.parse_which(which)
