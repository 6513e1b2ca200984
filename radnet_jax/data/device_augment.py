"""The costly part of the training augmentation, inside the jitted step.

On an accelerator the host's decode + augment sets the pace: at the paper's
48x192x192 input one core prepares ~17 volumes/s, most of it the in-plane
rotation (scipy, ~54 ms when it runs) and the Gaussian noise
(`bench/input_pipeline.py`), while one GPU consumes ~250 volumes/s. With
``config.augment.on_device`` the host still draws every random choice (crop,
flip, intensity, the rotation angle and the noise level, from grain's seeded
generator, so the data order and resume are unchanged) but leaves two numbers
per example in the batch, ``rotate_degrees`` and ``noise_std``; `augment`
here applies them on the device, batched:

* the same in-plane rotation as `radnet_jax.data.augment.rotate_in_plane` (about
  the centre of each (H, W) slice, bilinear, edges = the volume's minimum;
  scipy's map, tested), applied to the already-cropped window instead of the
  full shard, so the corners that scipy would fill from outside the crop are
  the minimum here; angle 0 is the identity;
* Gaussian noise with the drawn standard deviation, from the step's key.

Both commute with the host's flip and intensity steps up to the sign of
the (symmetric) angle and the fill value, which follows the volume minimum.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

# Batch fields the host adds when the augmentation runs on the device.
FIELDS = ("rotate_degrees", "noise_std")


_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False,
          "0": False}


def resolve_on_device(setting) -> bool:
  """``config.augment.on_device``: true, false or "auto" (= not on CPU).

  Strings as a command line gives them (``--config.augment.on_device=false``)
  are accepted.
  """
  if isinstance(setting, str):
    word = setting.strip().lower()
    if word == "auto":
      return jax.default_backend() != "cpu"
    if word not in _WORDS:
      raise ValueError(f"augment.on_device must be true, false or 'auto', "
                       f"got {setting!r}")
    return _WORDS[word]
  return bool(setting)


def rotate_in_plane(volume: jax.Array, degrees: jax.Array) -> jax.Array:
  """Rotates each (H, W) slice of ``volume`` (D, H, W, C) by ``degrees``.

  Output voxel o (in the plane) samples the input at
  ``rot @ (o - c) + c``, ``rot = [[cos, sin], [-sin, cos]]``, c the plane
  centre: `scipy.ndimage.rotate(..., axes=(1, 2), reshape=False, order=1)`.
  Samples outside the plane read the volume minimum.
  """
  _, h, w, _ = volume.shape
  a = jnp.deg2rad(degrees.astype(jnp.float32))
  cos, sin = jnp.cos(a), jnp.sin(a)
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  oy, ox = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - cy,
                        jnp.arange(w, dtype=jnp.float32) - cx, indexing="ij")
  sy = cos * oy + sin * ox + cy
  sx = -sin * oy + cos * ox + cx
  y0, x0 = jnp.floor(sy), jnp.floor(sx)
  fy, fx = sy - y0, sx - x0
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
  fill = jnp.min(volume)

  def tap(yi, xi):
    inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
    v = volume[:, jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1), :]
    return jnp.where(inside[None, :, :, None], v, fill)

  wy, wx = fy[None, :, :, None], fx[None, :, :, None]
  top = tap(y0, x0) * (1 - wx) + tap(y0, x0 + 1) * wx
  bottom = tap(y0 + 1, x0) * (1 - wx) + tap(y0 + 1, x0 + 1) * wx
  return (top * (1 - wy) + bottom * wy).astype(volume.dtype)


def augment(batch: Mapping[str, jax.Array], key: jax.Array) -> dict:
  """Applies the batch's ``rotate_degrees`` and ``noise_std`` to "volume".

  ``batch["volume"]`` is (B, D, H, W, C); the two fields are (B,). Returns
  the batch with the augmented volume and without the two fields.
  """
  missing = [f for f in FIELDS if f not in batch]
  if missing:
    raise ValueError(f"augment.on_device is set but the batch has no "
                     f"{missing}: the input pipeline must be built with the "
                     f"same augment config")
  vol = batch["volume"]
  deg = batch["rotate_degrees"].astype(jnp.float32)
  rotated = jax.vmap(rotate_in_plane)(vol, deg)
  vol = jnp.where((deg != 0)[:, None, None, None, None], rotated, vol)
  std = batch["noise_std"].astype(vol.dtype)
  noise = jax.random.normal(key, vol.shape, vol.dtype)
  vol = vol + noise * std[:, None, None, None, None]
  out = {k: v for k, v in batch.items() if k not in FIELDS}
  out["volume"] = vol
  return out
