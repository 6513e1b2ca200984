"""Label-safe 3D augmentation (numpy, host side, seeded by grain).

Every transform here keeps all five labels true:

* crop / pad to the model input shape: a random window (training) or the
  centre (evaluation); coverage can shrink a little under a crop, so crops
  are only as large as the shard-to-input size difference (usually 0-10%).
* intensity scale / shift / gamma and Gaussian noise: MR sequence lives in
  relative contrast between tissues, which these keep. Keep them *small* for
  CT: HU are absolute and contrast enhancement is only +50..150 HU (0.05-0.15
  in the ct_window(-1000,1000)->[-1,1] units), so a shift of +-0.1 would
  make enhanced and plain scans overlap (a label-changing augmentation for
  the contrast task). The configs use shift 0 and gamma 0 for that reason.
* small rotations about the slice axis (D) only: in-plane, so the acquisition
  plane (which axis is the slice axis) never changes.
* left-right flips along W: for AX and COR volumes W is right->left, so the
  flip is a mirror image of a plausible patient; for SAG W is anterior->
  posterior, and a flip there changes no label either (the slice axis and the
  body-axis extent are unchanged). No flips along D or H (H is the body axis
  of COR/SAG: flipping it would turn head-up anatomy upside down), and never
  a transpose between D and H/W, which would change the plane.

Volumes are ``(D, H, W)`` float32 in the shard's normalised units (CT window
or MR percentiles mapped to about [-1, 1]).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage


def crop_or_pad(volume: np.ndarray, shape: Sequence[int],
                rng: np.random.Generator | None = None,
                pad_value: float | None = None) -> np.ndarray:
  """Crops or pads ``volume`` (D, H, W) to ``shape`` (D, H, W) voxels.

  With ``rng`` the crop window / pad offset is random (training); without it
  the volume is centred (evaluation). Padding uses ``pad_value`` or, by
  default, the volume minimum (air / background in normalised units).
  """
  volume = np.asarray(volume)
  if volume.ndim != 3:
    raise ValueError(f"expected a (D, H, W) volume, got shape {volume.shape}")
  fill = float(volume.min()) if pad_value is None and volume.size else (pad_value or 0.0)
  out = np.full(tuple(shape), fill, dtype=volume.dtype)
  src, dst = [], []
  for have, want in zip(volume.shape, shape):
    slack = abs(have - want)
    off = int(rng.integers(0, slack + 1)) if rng is not None else slack // 2
    if have >= want:
      src.append(slice(off, off + want))
      dst.append(slice(0, want))
    else:
      src.append(slice(0, have))
      dst.append(slice(off, off + have))
  out[tuple(dst)] = volume[tuple(src)]
  return out


def rotate_in_plane(volume: np.ndarray, degrees: float) -> np.ndarray:
  """Rotates every slice of (D, H, W) by ``degrees`` about the slice axis.

  Linear interpolation, same shape, edges filled with the volume minimum.
  """
  if degrees == 0.0:
    return volume
  return ndimage.rotate(volume, degrees, axes=(1, 2), reshape=False, order=1,
                        mode="constant", cval=float(volume.min()),
                        prefilter=False).astype(volume.dtype, copy=False)


def rotated_crop(volume: np.ndarray, degrees: float, starts: Sequence[int],
                 shape: Sequence[int]) -> np.ndarray:
  """``rotate_in_plane(volume, degrees)`` cropped to ``shape`` at ``starts``,
  interpolating only the voxels kept.

  The rotation is in-plane, so the depth crop comes first, and each kept
  slice is resampled straight into the output window (the same map as
  ``scipy.ndimage.rotate``: about the plane centre, linear, edges = volume
  minimum). For a 52x208x208 shard cropped to 48x192x192 this interpolates
  79% of the voxels. Needs ``volume.shape >= shape`` on every axis.
  """
  volume = np.asarray(volume, np.float32)
  if any(h < w for h, w in zip(volume.shape, shape)):
    raise ValueError(f"rotated_crop needs a volume at least {tuple(shape)}, "
                     f"got {volume.shape}")
  d0, h0, w0 = (int(v) for v in starts)
  cval = float(volume.min())
  a = np.deg2rad(degrees)
  rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
  centre = (np.array(volume.shape[1:], np.float64) - 1) / 2
  # Full-plane output voxel o samples input rot @ o + (centre - rot @ centre);
  # the window's voxel w is o = w + (h0, w0).
  offset = rot @ np.array([h0, w0], np.float64) + centre - rot @ centre
  out = np.empty(tuple(shape), np.float32)
  for i in range(shape[0]):
    ndimage.affine_transform(volume[d0 + i], rot, offset=offset,
                             output_shape=tuple(shape[1:]), output=out[i],
                             order=1, mode="constant", cval=cval,
                             prefilter=False)
  return out


def intensity(volume: np.ndarray, rng: np.random.Generator, *,
              scale: float = 0.1, shift: float = 0.1, gamma: float = 0.2,
              noise_std: float = 0.02) -> np.ndarray:
  """Random gamma, affine intensity change and Gaussian noise.

  ``volume`` values ~[-1, 1]. Gamma acts on the volume rescaled to [0, 1] and
  is mapped back, so the intensity range is kept; then ``v * (1 + U(-scale,
  scale)) + U(-shift, shift)`` and noise with std ``U(0, noise_std)``.
  """
  v = volume.astype(np.float32, copy=True)
  if gamma > 0:
    lo, hi = float(v.min()), float(v.max())
    if hi > lo:
      g = float(np.exp(rng.uniform(-gamma, gamma)))
      v = ((v - lo) / (hi - lo)) ** g * (hi - lo) + lo
  if scale > 0:
    v *= 1.0 + rng.uniform(-scale, scale)
  if shift > 0:
    v += rng.uniform(-shift, shift)
  if noise_std > 0:
    v += rng.standard_normal(v.shape, dtype=np.float32) * np.float32(
        rng.uniform(0.0, noise_std))
  return v


def augment(volume: np.ndarray, shape: Sequence[int], rng: np.random.Generator,
            cfg: Mapping, deferred: dict | None = None) -> np.ndarray:
  """Training augmentation: random crop/pad, rotation, flip, intensity.

  Args:
    volume: (D, H, W) float volume from a shard.
    shape: (D, H, W) model input shape.
    rng: numpy generator (grain seeds it per element and epoch).
    cfg: mapping with ``rotate_degrees``, ``rotate_prob``, ``flip_lr_prob``,
      ``scale``, ``shift``, ``gamma``, ``noise_std`` (see experiments/).
    deferred: None to apply everything here. A dict: the rotation and the
      noise are drawn but not applied; their parameters go into it as
      ``rotate_degrees`` (0 = none) and ``noise_std``, for
      `radnet_jax.data.device_augment.augment` inside the train step.
  Returns:
    float32 (D, H, W) = ``shape``.
  """
  v = np.asarray(volume, dtype=np.float32)
  angle = 0.0
  if cfg.get("rotate_degrees", 0.0) > 0 and rng.uniform() < cfg.get("rotate_prob", 0.5):
    deg = float(cfg["rotate_degrees"])
    angle = float(rng.uniform(-deg, deg))
  if angle and deferred is None:
    if all(h >= w for h, w in zip(v.shape, shape)):
      # Crop offsets drawn as crop_or_pad draws them; interpolate only the crop.
      starts = [int(rng.integers(0, h - w + 1)) for h, w in zip(v.shape, shape)]
      v = rotated_crop(v, angle, starts, shape)
    else:
      v = crop_or_pad(rotate_in_plane(v, angle), shape, rng)
  else:
    v = crop_or_pad(v, shape, rng)
  if rng.uniform() < cfg.get("flip_lr_prob", 0.0):
    v = v[:, :, ::-1]
  noise_std = cfg.get("noise_std", 0.0)
  v = intensity(v, rng, scale=cfg.get("scale", 0.0), shift=cfg.get("shift", 0.0),
                gamma=cfg.get("gamma", 0.0),
                noise_std=0.0 if deferred is not None else noise_std)
  if deferred is not None:
    deferred["rotate_degrees"] = np.float32(angle)
    deferred["noise_std"] = np.float32(
        rng.uniform(0.0, noise_std) if noise_std > 0 else 0.0)
  return np.ascontiguousarray(v, dtype=np.float32)
