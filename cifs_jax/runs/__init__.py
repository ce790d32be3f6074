"""A run: the directory of one training run and everything that reads or
writes it (docs/design.md §8).

* ``directory``: ``RunDirectory``, the only code that names a run's files
  (config, checkpoints, metrics, reports, partial results, lock); relative
  and ``~`` paths are made absolute here.
* ``checkpoints``: Orbax checkpoints with checksums.
* ``metric_logging``: metrics.jsonl and TensorBoard.
* ``trainer``: ``train_and_evaluate(config, workdir)``, the training loop
  over a workdir (``python -m cifs_jax.main``).
* ``evaluation``: restore a checkpoint and write its reports
  (``python -m cifs_jax.evaluate``, and the end of training).

``training/`` and ``evaluation/`` below are libraries that know nothing of
workdirs.
"""
