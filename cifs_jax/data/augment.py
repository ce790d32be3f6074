"""On-device image preprocessing: pure, jittable, inside the compiled step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def to_float(images: jax.Array) -> jax.Array:
  """uint8 images (..., H, W, C) -> float32 in [0, 1] (no mean/std scaling)."""
  return images.astype(jnp.float32) / 255.0


def _augment_one(
  key: jax.Array, image: jax.Array, crop_padding: int, flip: bool
) -> jax.Array:
  height, width, channels = image.shape
  crop_key, flip_key = jax.random.split(key)
  if crop_padding:
    pad = crop_padding
    padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    top, left = jax.random.randint(crop_key, (2,), 0, 2 * pad + 1)
    image = jax.lax.dynamic_slice(
      padded, (top, left, 0), (height, width, channels)
    )
  if flip:
    image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
  return image


@functools.partial(jax.jit, static_argnames=("crop_padding", "flip"))
def augment(
  key: jax.Array, images: jax.Array, *, crop_padding: int = 4, flip: bool = True
) -> jax.Array:
  """Random crop with zero padding and random horizontal flip, per image.

  Each image is zero-padded by ``crop_padding`` pixels on every side and an
  (H, W) window is cut at a uniformly random offset in [0, 2 * crop_padding]
  along each axis (a shift of up to ``crop_padding`` pixels; 0 disables it),
  then mirrored left-right with probability 1/2 if ``flip``.

  Args:
    key: a PRNG key (typed or raw), split into one key per image; or one key
      per image (leading dimension B), which makes each image's augmentation
      independent of how a batch is split over devices (e.g. keys from
      ``jax.random.fold_in(key, example_index)``).
    images: uint8 (B, H, W, C), pixels in [0, 255].
    crop_padding: padding in pixels (int, static).
    flip: whether to flip (bool, static).

  Returns:
    float32 (B, H, W, C) in [0, 1].
  """
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  keys = jax.random.split(key, images.shape[0]) if key.ndim == 0 else key
  if keys.shape != images.shape[:1]:
    raise ValueError(
      f"Got {keys.shape} keys for {images.shape[0]} images; "
      "pass one key, or one per image."
    )
  images = jax.vmap(_augment_one, in_axes=(0, 0, None, None))(
    keys, images, crop_padding, flip
  )
  return to_float(images)
