"""On-device augmentation: shapes, true shifts of the padded image, flips."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifs_jax import data


def _images(n, size=8, channels=3, seed=0):
  # Pixels in [1, 255]: the zero padding cannot be mistaken for the image.
  rng = np.random.default_rng(seed)
  return rng.integers(1, 256, (n, size, size, channels), dtype=np.uint8)


def _match(out, images, pad):
  """Per image: the (top, left, flipped) placement it equals, or None."""
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  height, width = images.shape[1:3]
  found = [None] * len(images)
  for top in range(2 * pad + 1):
    for left in range(2 * pad + 1):
      crop = padded[:, top : top + height, left : left + width]
      for flipped, candidate in ((False, crop), (True, crop[:, :, ::-1])):
        equal = np.all(candidate == out, axis=(1, 2, 3))
        for i in np.flatnonzero(equal):
          found[i] = found[i] or (top, left, flipped)
  return found


def test_shapes_dtypes_and_range():
  images = _images(4, size=32)
  augment = jax.jit(functools.partial(data.augment, crop_padding=4, flip=True))
  out = augment(jax.random.key(0), images)
  assert out.shape == (4, 32, 32, 3) and out.dtype == jnp.float32
  assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
  gray = data.augment(jax.random.key(0), _images(3, size=28, channels=1))
  assert gray.shape == (3, 28, 28, 1)


def test_to_float():
  images = np.array([0, 1, 128, 255], np.uint8).reshape(1, 2, 2, 1)
  out = data.to_float(images)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(
    np.asarray(out).ravel(), [0, 1 / 255, 128 / 255, 1], rtol=1e-7
  )


def test_crops_are_true_shifts_covering_every_offset():
  images = _images(2000)
  out = data.augment(jax.random.key(1), images, crop_padding=4, flip=False)
  pixels = np.round(np.asarray(out) * 255).astype(np.uint8)
  found = _match(pixels, images, pad=4)
  assert all(f is not None and not f[2] for f in found)
  offsets = {(top, left) for top, left, _ in found}
  assert offsets == {(top, left) for top in range(9) for left in range(9)}


def test_flips_happen_about_half_the_time():
  images = _images(2000)
  out = data.augment(jax.random.key(2), images, crop_padding=0, flip=True)
  pixels = np.round(np.asarray(out) * 255).astype(np.uint8)
  flipped = np.all(pixels == images[:, :, ::-1], axis=(1, 2, 3))
  unflipped = np.all(pixels == images, axis=(1, 2, 3))
  assert np.all(flipped ^ unflipped)
  assert 0.45 < flipped.mean() < 0.55


def test_crop_and_flip_together():
  images = _images(300)
  out = data.augment(jax.random.key(3), images, crop_padding=4, flip=True)
  pixels = np.round(np.asarray(out) * 255).astype(np.uint8)
  found = _match(pixels, images, pad=4)
  assert all(f is not None for f in found)
  assert 0.35 < np.mean([f[2] for f in found]) < 0.65


def test_no_augmentation_is_to_float():
  images = _images(5)
  out = data.augment(jax.random.key(0), images, crop_padding=0, flip=False)
  # Compiled, as in the steps (XLA may turn / 255 into * (1 / 255)).
  np.testing.assert_array_equal(out, jax.jit(data.to_float)(images))


def test_deterministic_per_key():
  images = _images(64)
  a = data.augment(jax.random.key(7), images)
  np.testing.assert_array_equal(a, data.augment(jax.random.key(7), images))
  assert not np.array_equal(a, data.augment(jax.random.key(8), images))
  # A raw uint32 key is the same key.
  np.testing.assert_array_equal(a, data.augment(jax.random.PRNGKey(7), images))


def test_per_example_keys_do_not_depend_on_the_batch_split():
  images = _images(16)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(
    jnp.arange(16)
  )
  whole = data.augment(keys, images)
  halves = jnp.concatenate(
    [data.augment(keys[:8], images[:8]), data.augment(keys[8:], images[8:])]
  )
  np.testing.assert_array_equal(whole, halves)
  with pytest.raises(ValueError, match="one per image"):
    data.augment(keys[:3], images)
