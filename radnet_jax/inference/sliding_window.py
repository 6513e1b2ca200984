"""Sliding-window 3D inference with Gaussian or constant blending.

Follows MONAI's ``inferers/utils.py`` (window placement, importance map,
padding of volumes smaller than the ROI) with JAX underneath:

* windows are cut and blended on the device (``lax.dynamic_slice`` /
  ``dynamic_update_slice``), so a GPU never round-trips logits to the host;
* windows go to ``predict_fn`` in batches of exactly ``sw_batch_size`` (the
  last batch is padded with repeats and their outputs are weighted 0), so a
  jitted model call compiles once per ROI shape, whatever the volume size;
* the two small gather/scatter programs compile once per volume shape.

Typical use::

    predict = make_predict_fn(model.apply, variables)       # jit once
    probs = sliding_window_inference(volume, (48, 96, 96), predict)
    labels = np.asarray(probs.argmax(-1))

See also ``predict_case`` (HU volume in, label map on the original grid out).
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PredictFn = Callable[[jax.Array], jax.Array]


def importance_map(roi_size: Sequence[int], mode: str = "gaussian",
                   sigma_scale: float | Sequence[float] = 0.125) -> np.ndarray:
  """Per-voxel blending weight of one window, float32 ``roi_size``.

  ``gaussian``: separable Gaussian centred in the window with sigma =
  ``sigma_scale * roi_size`` per axis, clipped below at
  ``max(min weight, 1e-3)`` (MONAI's ``compute_importance_map``);
  ``constant``: all ones.
  """
  roi_size = tuple(int(r) for r in roi_size)
  if mode == "constant":
    return np.ones(roi_size, np.float32)
  if mode != "gaussian":
    raise ValueError(f"blending mode must be 'gaussian' or 'constant', got {mode!r}")
  scales = (tuple(sigma_scale) if isinstance(sigma_scale, (tuple, list))
            else (float(sigma_scale),) * len(roi_size))
  w = np.ones((), np.float64)
  for n, s in zip(roi_size, scales):
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    g = np.exp(-x ** 2 / (2.0 * (s * n) ** 2))
    w = np.multiply.outer(w, g)
  w = w.astype(np.float32)
  return np.maximum(w, max(float(w.min()), 1e-3)).astype(np.float32)


def window_starts(image_size: Sequence[int], roi_size: Sequence[int],
                  overlap: float | Sequence[float]) -> np.ndarray:
  """Start corners ``(N, 3)`` of the windows tiling ``image_size`` (>= roi).

  Stride per axis ``int(roi * (1 - overlap))`` (at least 1; one window when
  the ROI equals the size); the last window is shifted back to end at the
  border, as in MONAI's ``dense_patch_slices``.
  """
  overlaps = (tuple(overlap) if isinstance(overlap, (tuple, list))
              else (float(overlap),) * len(image_size))
  per_axis = []
  for size, roi, ov in zip(image_size, roi_size, overlaps):
    if not 0.0 <= ov < 1.0:
      raise ValueError(f"overlap must be in [0, 1), got {ov}")
    if roi > size:
      raise ValueError(f"roi {roi} larger than the (padded) size {size}")
    step = roi if roi == size else max(int(roi * (1 - ov)), 1)
    n = 1 if roi == size else int(math.ceil((size - roi) / step)) + 1
    per_axis.append(sorted({min(i * step, size - roi) for i in range(n)}))
  return np.array(list(itertools.product(*per_axis)), np.int32).reshape(-1, len(image_size))


@functools.partial(jax.jit, static_argnums=(2,))
def _gather(volume: jax.Array, starts: jax.Array, roi: tuple) -> jax.Array:
  """volume (D, H, W, C), starts (n, 3) -> windows (n, *roi, C)."""
  c = volume.shape[-1]

  def one(s):
    return jax.lax.dynamic_slice(volume, (s[0], s[1], s[2], 0), roi + (c,))
  return jax.vmap(one)(starts)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _accumulate(acc: jax.Array, wsum: jax.Array, preds: jax.Array,
                starts: jax.Array, valid: jax.Array, weight: jax.Array):
  """Adds weighted window predictions into the (D, H, W, K) accumulator."""
  k = acc.shape[-1]

  def body(i, carry):
    acc, wsum = carry
    s = starts[i]
    w = weight * valid[i]
    cur = jax.lax.dynamic_slice(acc, (s[0], s[1], s[2], 0), preds.shape[1:4] + (k,))
    acc = jax.lax.dynamic_update_slice(acc, cur + preds[i] * w[..., None],
                                       (s[0], s[1], s[2], 0))
    curw = jax.lax.dynamic_slice(wsum, (s[0], s[1], s[2]), preds.shape[1:4])
    wsum = jax.lax.dynamic_update_slice(wsum, curw + w, (s[0], s[1], s[2]))
    return acc, wsum
  return jax.lax.fori_loop(0, preds.shape[0], body, (acc, wsum))


def _one_volume(volume: np.ndarray | jax.Array, roi: tuple, predict_fn: PredictFn,
                overlap, sw_batch_size: int, weight: jax.Array,
                pad_value: float) -> jax.Array:
  """volume (D, H, W, C) -> blended predictions (D, H, W, K) float32."""
  size = volume.shape[:3]
  pads = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2)
          for s, r in zip(size, roi)]
  vol = jnp.asarray(volume)
  if any(p != (0, 0) for p in pads):
    vol = jnp.pad(vol, pads + [(0, 0)], constant_values=pad_value)
  starts = window_starts(vol.shape[:3], roi, overlap)
  n = len(starts)
  nb = int(math.ceil(n / sw_batch_size))
  # Pad to whole batches with copies of the first window (weight 0).
  idx = np.concatenate([np.arange(n), np.zeros(nb * sw_batch_size - n, np.int64)])
  valid = (np.arange(nb * sw_batch_size) < n).astype(np.float32)
  starts_all = jnp.asarray(starts[idx])
  acc = wsum = None
  for b in range(nb):
    sl = slice(b * sw_batch_size, (b + 1) * sw_batch_size)
    windows = _gather(vol, starts_all[sl], roi)
    preds = jnp.asarray(predict_fn(windows), jnp.float32)
    if preds.ndim != 5 or preds.shape[:4] != windows.shape[:4]:
      raise ValueError(f"predict_fn must map windows {windows.shape} to "
                       f"(n, *roi, K); got {preds.shape}")
    if acc is None:
      acc = jnp.zeros(vol.shape[:3] + (preds.shape[-1],), jnp.float32)
      wsum = jnp.zeros(vol.shape[:3], jnp.float32)
    acc, wsum = _accumulate(acc, wsum, preds, starts_all[sl],
                            jnp.asarray(valid[sl]), weight)
  out = acc / wsum[..., None]
  return out[pads[0][0]:pads[0][0] + size[0], pads[1][0]:pads[1][0] + size[1],
             pads[2][0]:pads[2][0] + size[2]]


def sliding_window_inference(volume: np.ndarray | jax.Array,
                             roi_size: Sequence[int], predict_fn: PredictFn,
                             overlap: float | Sequence[float] = 0.25,
                             sw_batch_size: int = 4, mode: str = "gaussian",
                             sigma_scale: float | Sequence[float] = 0.125,
                             pad_value: float = 0.0) -> jax.Array:
  """Blended per-voxel predictions of ``predict_fn`` over a whole volume.

  Args:
    volume: ``(D, H, W)``, ``(D, H, W, C)`` or ``(B, D, H, W, C)`` voxels
      (already normalised the way the model was trained).
    roi_size: window ``(d, h, w)`` in voxels; axes where the volume is smaller
      are padded symmetrically with ``pad_value`` and cropped afterwards.
    predict_fn: windows ``(sw_batch_size, d, h, w, C)`` -> per-voxel outputs
      ``(sw_batch_size, d, h, w, K)`` (probabilities or logits). Pass a jitted
      function: it is always called with the same shape.
    overlap: fraction of the ROI shared by neighbouring windows, per axis or
      one value.
    sw_batch_size: windows per ``predict_fn`` call.
    mode: ``"gaussian"`` (down-weights window borders) or ``"constant"``.
    sigma_scale: Gaussian sigma as a fraction of the ROI size.

  Returns:
    float32 ``(D, H, W, K)`` (or ``(B, D, H, W, K)`` for a batched input): the
    weighted average of the overlapping window outputs.
  """
  roi = tuple(int(r) for r in roi_size)
  if len(roi) != 3:
    raise ValueError(f"roi_size must have 3 entries (d, h, w), got {roi_size}")
  if sw_batch_size < 1:
    raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
  weight = jnp.asarray(importance_map(roi, mode, sigma_scale))
  ndim = volume.ndim
  if ndim == 3:
    volume = volume[..., None]
  if ndim in (3, 4):
    return _one_volume(volume, roi, predict_fn, overlap, sw_batch_size, weight,
                       pad_value)
  if ndim == 5:
    return jnp.stack([_one_volume(v, roi, predict_fn, overlap, sw_batch_size,
                                  weight, pad_value) for v in volume])
  raise ValueError(f"volume must be (D,H,W), (D,H,W,C) or (B,D,H,W,C); got "
                   f"shape {volume.shape}")


def make_predict_fn(apply_fn: Callable, variables, softmax: bool = True,
                    **apply_kwargs) -> PredictFn:
  """Jitted ``windows (n, d, h, w, C) -> (n, d, h, w, K)`` for a Flax model.

  ``apply_fn(variables, x, train=False, **apply_kwargs)`` must return logits
  ``(n, d, h, w, K)`` (or a tuple whose first element is the logits). With
  ``softmax`` the windows are blended as probabilities (recommended: logits
  of different windows are not on a common scale).
  """
  # Variables are an argument, not a closure: closed-over weights become XLA
  # constants (slow constant folding, a recompile per checkpoint).
  @jax.jit
  def predict(variables, x):
    out = apply_fn(variables, x, train=False, **apply_kwargs)
    if isinstance(out, (tuple, list)):
      out = out[0]
    out = out.astype(jnp.float32)
    return jax.nn.softmax(out, axis=-1) if softmax else out
  return functools.partial(predict, variables)
