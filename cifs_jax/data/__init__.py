"""Input pipeline: whole splits as uint8 arrays on the accelerator.

Typical use (training)::

  data_config = config.data                      # see default_config()
  train = data.load_split(data_config, "train")  # host: uint8 (N, H, W, C)
  parallel = cifs_jax.parallel.Parallel.create("pmap")
  train_dev = parallel.replicate(train)
  aug = functools.partial(data.augment, **data.augment_options(data_config))
  for idx in data.train_index_batches(key, epoch, len(train), 128,
                                      start_step=step):
    state = p_step(state, train_dev, parallel.shard(idx))
  # inside the step: aug(key, split.images[idx]), split.labels[idx]

Evaluation: ``for batch in data.eval_batches(test, batch_size)``, then
``parallel.shard(batch)``; count only ``batch.mask`` rows.
Test-time inputs: ``data.to_float(images)``.
"""

from cifs_jax.data.augment import augment, to_float
from cifs_jax.data.batching import (
  Batch,
  epoch_permutation,
  eval_batches,
  eval_index_batches,
  steps_per_epoch,
  train_index_batches,
)
from cifs_jax.data.config import (
  SOURCES,
  augment_options,
  default_config,
  validate,
)
from cifs_jax.data.info import DATASETS, SPLITS, DatasetInfo, Split, get_info
from cifs_jax.data.loading import load_split

__all__ = [
  "Batch",
  "DATASETS",
  "DatasetInfo",
  "SOURCES",
  "SPLITS",
  "Split",
  "augment",
  "augment_options",
  "default_config",
  "epoch_permutation",
  "eval_batches",
  "eval_index_batches",
  "get_info",
  "load_split",
  "steps_per_epoch",
  "to_float",
  "train_index_batches",
  "validate",
]
