"""Resampling of canonical volumes to the shard shape, and intensity normalisation.

Resampling is a separable linear resize with anti-aliasing: along each axis the
output is a weighted sum of input voxels with a triangle kernel that is
stretched by the downsampling factor (a box-like low-pass filter when
shrinking, plain linear interpolation when enlarging). It is the same operator
as ``jax.image.resize(..., method="linear", antialias=True)`` (the tests check
the agreement), computed in numpy with banded BLAS products one slice at a
time (no full-size intermediate), so that a 512x512x185 CT shrinks to
48x192x192 in ~0.03 s on one core (about the time it takes to read the volume
from memory once).

Grid convention ("extent preserving", half-pixel centres): output voxel ``i``
along an axis of ``n`` input and ``s`` output voxels sits at input index
``(i + 0.5) * n / s - 0.5``. The resampled volume covers the same physical
field of view; its spacing is ``spacing * n / s`` and its corner voxel centres
lie within half an output voxel of the input's corner voxel centres.

Normalisation (documented in the manifest and in every record):

* CT: HU window ``[-1000, 1000]`` mapped linearly to ``[-1, 1]`` and clipped
  (air -> -1, water -> 0, dense bone and metal -> 1).
* MR, PET and anything else: robust percentiles ``(0.5, 99.5)`` of the
  resampled volume mapped to ``[0, 1]`` and clipped (scanner units differ
  between vendors and sessions; percentiles make volumes comparable).

Non-finite voxels become the low end of the output range.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

CT_WINDOW = (-1000.0, 1000.0)
PERCENTILES = (0.5, 99.5)
# Output rows are grouped into blocks whose input columns are contiguous, so a
# banded weight matrix costs ~band/n of a dense product. A block of B outputs
# at downsampling factor r spans ~(B + 2) r inputs for 2r taps per output: the
# wasted multiplies grow with B, the BLAS call overhead shrinks with it.
# Measured on a 512x512 -> 192 slice, one core: ``rows`` (w @ src, K x 512
# operands) is fastest with 8 output rows per block, ``cols`` (src @ w.T, only
# a few output columns per block) with 16 (52 vs 76 us with 8, 71 with 32).
_BLOCK = 8
_COL_BLOCK = 16
# Input slices per chunk when the in-plane passes run first (strategy "plane").
_CHUNK = 4
# SliceStream's window, in bands of input slices (see SliceStream.slot).
_WINDOW_BANDS = 3


def weight_matrix(n_in: int, n_out: int) -> np.ndarray:
  """Resampling weights ``(n_out, n_in)`` float64 for one axis (rows sum to 1).

  Triangle kernel, widened by ``n_in / n_out`` when downsampling
  (anti-aliasing); weights falling outside the input are dropped and each row
  is renormalised, which amounts to edge clamping at the borders.
  """
  if n_in < 1 or n_out < 1:
    raise ValueError(f"axis sizes must be >= 1, got {n_in} -> {n_out}")
  inv_scale = n_in / n_out
  kernel_scale = max(inv_scale, 1.0)
  centres = (np.arange(n_out, dtype=np.float64) + 0.5) * inv_scale - 0.5
  dist = np.abs(centres[:, None] - np.arange(n_in, dtype=np.float64)[None, :])
  w = np.maximum(0.0, 1.0 - dist / kernel_scale)
  total = w.sum(axis=1, keepdims=True)
  return w / np.where(total > 0, total, 1.0)


def _blocks(w: np.ndarray, block: int = _BLOCK
            ) -> list[tuple[int, int, int, int]]:
  """(out_start, out_stop, in_start, in_stop) blocks covering the band of w."""
  nz = w != 0
  first = nz.argmax(axis=1)
  last = w.shape[1] - nz[:, ::-1].argmax(axis=1)
  out = []
  for o0 in range(0, w.shape[0], block):
    o1 = min(o0 + block, w.shape[0])
    out.append((o0, o1, int(first[o0:o1].min()), int(last[o0:o1].max())))
  return out


class _Axis:
  """Banded weights of one axis for BLAS: ``w`` float32 ``(n_out, n_in)`` and
  its contiguous transpose ``wt``; ``row_blocks`` for ``rows`` and
  ``col_blocks`` for ``cols``; ``row_macs``/``col_macs`` the multiplies per
  element of the other axis (0 for an identity axis, which is copied)."""

  def __init__(self, n_in: int, n_out: int, row_block: int = _BLOCK,
               col_block: int = _COL_BLOCK):
    self.n_in, self.n_out = n_in, n_out
    self.identity = n_in == n_out
    w64 = weight_matrix(n_in, n_out)
    self.w = w64.astype(np.float32)
    self.wt = np.ascontiguousarray(self.w.T)
    self.row_blocks = [] if self.identity else _blocks(w64, row_block)
    self.col_blocks = [] if self.identity else _blocks(w64, col_block)
    self.row_macs = _macs(self.row_blocks)
    self.col_macs = _macs(self.col_blocks)

  def rows(self, src: np.ndarray, dst: np.ndarray) -> None:
    """``dst (n_out, m) = w @ src (n_in, m)``; both 2D, unit last stride."""
    if self.identity:
      dst[...] = src
      return
    for o0, o1, i0, i1 in self.row_blocks:
      np.matmul(self.w[o0:o1, i0:i1], src[i0:i1], out=dst[o0:o1])

  def cols(self, src: np.ndarray, dst: np.ndarray) -> None:
    """``dst (m, n_out) = src (m, n_in) @ w.T``; strided column blocks go to
    BLAS as they are (row stride = leading dimension, no copies)."""
    if self.identity:
      dst[...] = src
      return
    for o0, o1, i0, i1 in self.col_blocks:
      np.matmul(src[:, i0:i1], self.wt[i0:i1, o0:o1], out=dst[:, o0:o1])


def _macs(blocks: list[tuple[int, int, int, int]]) -> int:
  return sum((o1 - o0) * (i1 - i0) for o0, o1, i0, i1 in blocks)


class _Plane:
  """Resizes one ``(H, W)`` slice to ``(h, w)``: H then W or W then H,
  whichever multiplies less, through a reused float32 scratch buffer."""

  def __init__(self, ah: _Axis, aw: _Axis):
    self.ah, self.aw = ah, aw
    h_first = ah.row_macs * aw.n_in + aw.col_macs * ah.n_out
    w_first = aw.col_macs * ah.n_in + ah.row_macs * aw.n_out
    self.h_first = h_first <= w_first
    self.macs = min(h_first, w_first)
    tmp = (ah.n_out, aw.n_in) if self.h_first else (ah.n_in, aw.n_out)
    self.tmp = np.empty(tmp, np.float32)

  def __call__(self, src: np.ndarray, dst: np.ndarray) -> None:
    """``src`` ``(H, W)`` -> ``dst`` ``(h, w)`` (views, unit last stride)."""
    if self.ah.identity and self.aw.identity:
      dst[...] = src
    elif self.ah.identity:
      self.aw.cols(src, dst)
    elif self.aw.identity:
      self.ah.rows(src, dst)
    elif self.h_first:
      self.ah.rows(src, self.tmp)
      self.aw.cols(self.tmp, dst)
    else:
      self.aw.cols(src, self.tmp)
      self.ah.rows(self.tmp, dst)


def _strategy(ad: _Axis, plane: _Plane, hw_in: int, hw_out: int) -> str:
  """Picks "depth" (slice mix first) or "plane" (in-plane first) by cost.

  depth: every output slice is one weighted sum of its input band (a gemv
  over ``H*W``, no wasted taps) and is then resized in plane: ``d`` plane
  passes. plane: every input slice is resized in plane, then the small slices
  are mixed in chunks: ``D`` plane passes. Downsampling along D (CT: 150-600
  slices -> 48) favours depth; few thick slices upsampled favour plane.
  """
  taps = ad.row_macs
  depth = taps * hw_in + ad.n_out * plane.macs
  chunk_rows = sum(
      (r1 - r0) * (z1 - z0) for z0, z1, r0, r1 in _chunks(ad, _CHUNK))
  plane_first = ad.n_in * plane.macs + chunk_rows * hw_out
  return "depth" if depth <= plane_first else "plane"


def _chunks(ad: _Axis, chunk: int) -> list[tuple[int, int, int, int]]:
  """(in_start, in_stop, out_start, out_stop): input slice chunks and the
  output slices they contribute to (contiguous: the band is monotone)."""
  nz = ad.w != 0
  out = []
  for z0 in range(0, ad.n_in, chunk):
    z1 = min(z0 + chunk, ad.n_in)
    rows = np.flatnonzero(nz[:, z0:z1].any(axis=1))
    out.append((z0, z1, int(rows[0]), int(rows[-1]) + 1))
  return out


def resize(voxels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """Anti-aliased linear resize of a 3D volume.

  Streams the volume: only the ``(D', H', W')`` output and slice-sized
  scratch buffers are allocated (no full-size intermediate), and the input is
  read about once. Either each output slice mixes its band of input slices and
  is then resized in plane, or each input slice is resized in plane and then
  mixed into the output slices, whichever multiplies less (see
  ``_strategy``). The result equals the separable W, H, D passes to float32
  rounding.

  Args:
    voxels: ``(D, H, W)`` array (any real dtype), e.g. HU.
    shape: target ``(D', H', W')`` in voxels.
  Returns:
    float32 ``(D', H', W')`` in the input's units.
  """
  x = np.asarray(voxels)
  if x.ndim != 3:
    raise ValueError(f"expected a (D, H, W) volume, got shape {x.shape}")
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"target shape must be 3 positive sizes, got {shape}")
  if min(x.shape) < 1:
    raise ValueError(f"cannot resize an empty volume of shape {x.shape}")

  def slab(z0: int, z1: int) -> np.ndarray:
    # Other dtypes and strided views are converted a band of slices at a time
    # (free for contiguous float32): never a full-size float32 copy.
    return np.ascontiguousarray(x[z0:z1], np.float32)

  (D, H, W), (d, h, w) = x.shape, shape
  ad = _Axis(D, d, row_block=1, col_block=1)
  plane = _Plane(_Axis(H, h), _Axis(W, w))
  out = np.empty(shape, np.float32)
  if ad.identity:
    for z in range(D):
      plane(slab(z, z + 1)[0], out[z])
    return out
  if _strategy(ad, plane, H * W, h * w) == "depth":
    mixed = np.empty(H * W, np.float32)
    for o, _, i0, i1 in ad.row_blocks:
      np.matmul(ad.w[o, i0:i1], slab(i0, i1).reshape(i1 - i0, H * W), out=mixed)
      plane(mixed.reshape(H, W), out[o])
    return out
  out.fill(0.0)
  flat_out = out.reshape(d, h * w)
  small = np.empty((_CHUNK, h, w), np.float32)
  for z0, z1, r0, r1 in _chunks(ad, _CHUNK):
    band = slab(z0, z1)
    for k in range(z1 - z0):
      plane(band[k], small[k])
    c = z1 - z0
    flat_out[r0:r1] += ad.w[r0:r1, z0:z1] @ small[:c].reshape(c, h * w)
  return out


class SliceStream:
  """``resize`` fed one input slice at a time, in order (bit-identical).

  For callers that produce the volume slice by slice (DICOM decoding): the
  full ``(D, H, W)`` input never exists. Each input slice is written by the
  caller into ``slot()`` (a float32 ``(H, W)`` view of a small window of
  slices), then ``push()`` runs whatever output work that slice completes.
  The window holds the band of input slices of the next output slice, so
  every product sees exactly the operands that ``resize`` gives BLAS for a
  contiguous float32 volume (same shapes, same order): ``result()`` equals
  ``resize(volume, shape)`` bit for bit.

  Memory: the ``(D', H', W')`` output plus a window of about two bands of
  input slices (``window_slices``), instead of the whole input volume.
  """

  def __init__(self, in_shape: Sequence[int], shape: Sequence[int]):
    in_shape = tuple(int(s) for s in in_shape)
    shape = tuple(int(s) for s in shape)
    if len(in_shape) != 3 or min(in_shape) < 1:
      raise ValueError(f"cannot resize an empty volume of shape {in_shape}")
    if len(shape) != 3 or min(shape) < 1:
      raise ValueError(f"target shape must be 3 positive sizes, got {shape}")
    (D, H, W), (d, h, w) = in_shape, shape
    self.in_shape, self.shape = in_shape, shape
    self._hw = (H, W)
    self._ad = ad = _Axis(D, d, row_block=1, col_block=1)
    self._plane = _Plane(_Axis(H, h), _Axis(W, w))
    self._out = np.empty(shape, np.float32)
    self._next = 0            # index of the next input slice
    if ad.identity:
      self._mode = "identity"
      rows = 1
    elif _strategy(ad, self._plane, H * W, h * w) == "depth":
      self._mode = "depth"
      # Output o needs input slices [i0, i1); outputs in order.
      self._bands = [(o, i0, i1) for o, _, i0, i1 in ad.row_blocks]
      self._o = 0
      band = max(i1 - i0 for _, i0, i1 in self._bands)
      # The window is shifted (the live part, under one band, copied to its
      # start) once per ~(_WINDOW_BANDS - 1) bands of new slices.
      rows = min(D, _WINDOW_BANDS * band + 1)
      self._mixed = np.empty(H * W, np.float32)
    else:
      self._mode = "plane"
      self._chunks = _chunks(ad, _CHUNK)
      self._c = 0
      self._small = np.empty((_CHUNK, h, w), np.float32)
      self._out.fill(0.0)
      rows = _CHUNK
    self._win = np.empty((rows, H, W), np.float32)
    self._base = 0            # input index held by window row 0

  @property
  def window_slices(self) -> int:
    return int(self._win.shape[0])

  def slot(self) -> np.ndarray:
    """The float32 ``(H, W)`` buffer to fill with the next input slice."""
    i = self._next
    if i >= self.in_shape[0]:
      raise ValueError(f"all {self.in_shape[0]} input slices were pushed")
    if self._mode == "depth":
      row = i - self._base
      if row >= self._win.shape[0]:
        # Keep the slices still needed (from the next output's band start).
        keep = min(self._bands[self._o][1], i) if self._o < len(self._bands) else i
        n = i - keep
        if n:
          self._win[:n] = self._win[keep - self._base:i - self._base]
        self._base = keep
        row = i - keep
      return self._win[row]
    if self._mode == "plane":
      return self._win[i - self._chunks[self._c][0]]
    return self._win[0]

  def push(self) -> None:
    """Marks the slot as filled and computes the outputs it completes."""
    i = self._next
    self._next += 1
    H, W = self._hw
    if self._mode == "identity":
      self._plane(self._win[0], self._out[i])
    elif self._mode == "depth":
      ad, win = self._ad, self._win
      while self._o < len(self._bands) and self._bands[self._o][2] <= i + 1:
        o, i0, i1 = self._bands[self._o]
        a, b = i0 - self._base, i1 - self._base
        np.matmul(ad.w[o, i0:i1], win[a:b].reshape(b - a, H * W), out=self._mixed)
        self._plane(self._mixed.reshape(H, W), self._out[o])
        self._o += 1
    else:
      z0, z1, r0, r1 = self._chunks[self._c]
      if i + 1 == z1:
        c = z1 - z0
        for k in range(c):
          self._plane(self._win[k], self._small[k])
        h, w = self.shape[1:]
        flat_out = self._out.reshape(self.shape[0], h * w)
        flat_out[r0:r1] += self._ad.w[r0:r1, z0:z1] @ self._small[:c].reshape(c, h * w)
        self._c += 1

  def result(self) -> np.ndarray:
    """float32 ``(D', H', W')``, equal to ``resize`` of the pushed volume."""
    if self._next != self.in_shape[0]:
      raise ValueError(f"{self._next} of {self.in_shape[0]} input slices pushed")
    return self._out


def resampled_affine(affine: np.ndarray, in_shape: Sequence[int],
                     out_shape: Sequence[int]) -> np.ndarray:
  """Affine ``(4, 4)`` (voxel index -> LPS mm) of the resampled grid.

  Output index ``i`` maps to input index ``(i + 0.5) * n / s - 0.5`` per axis,
  so ``A_out = A_in @ T`` with ``T`` that scale and half-voxel shift.
  """
  ratio = np.asarray(in_shape, np.float64) / np.asarray(out_shape, np.float64)
  t = np.eye(4)
  t[:3, :3] = np.diag(ratio)
  t[:3, 3] = 0.5 * ratio - 0.5
  return np.asarray(affine, np.float64) @ t


@dataclasses.dataclass(frozen=True)
class Resampled:
  """A volume on the shard grid.

  voxels: float32 ``(D', H', W')`` in the input's physical units.
  affine: float64 ``(4, 4)`` voxel index -> LPS mm of the new grid.
  spacing: float64 ``(3,)`` effective voxel size in mm.
  """
  voxels: np.ndarray
  affine: np.ndarray
  spacing: np.ndarray


def resample(voxels: np.ndarray, affine: np.ndarray, spacing: Sequence[float],
             shape: Sequence[int]) -> Resampled:
  """Resizes a canonical ``(D, H, W)`` volume to ``shape`` with its geometry.

  Args:
    voxels: ``(D, H, W)`` in physical units (HU for CT).
    affine: ``(4, 4)`` voxel index -> LPS mm.
    spacing: ``(3,)`` mm along (D, H, W).
    shape: target ``(D', H', W')``.
  """
  return on_grid(resize(voxels, shape), np.shape(voxels), affine, spacing)


def on_grid(resized: np.ndarray, in_shape: Sequence[int], affine: np.ndarray,
            spacing: Sequence[float]) -> Resampled:
  """``Resampled`` geometry of a volume of ``in_shape`` (with ``affine``,
  ``spacing`` in mm) resized to ``resized.shape`` (by ``resize`` or
  ``SliceStream``)."""
  ratio = np.asarray(in_shape, np.float64) / np.asarray(resized.shape, np.float64)
  return Resampled(resized, resampled_affine(affine, in_shape, resized.shape),
                   np.asarray(spacing, np.float64) * ratio)


def normalisation_for(modality: str | None) -> str:
  """The normalisation spec string used for a modality (stored in records)."""
  if (modality or "").upper() == "CT":
    lo, hi = CT_WINDOW
    return f"ct_window({lo:g},{hi:g})->[-1,1]"
  lo, hi = PERCENTILES
  return f"pct({lo:g},{hi:g})->[0,1]"


def _order_stat_pair(flat: np.ndarray, k: int, sample: np.ndarray,
                     low_tail: bool) -> tuple[float, float] | None:
  """Values of rank ``k`` and ``k + 1`` (0-based, ascending) of ``flat``,
  partitioning only the tail beyond a threshold read off the sorted
  ``sample``; None when the tail turns out too short (the caller falls back).

  All values <= t (low tail) are the first ranks of the sorted array, all
  values >= t (high tail) the last, so the ranks are exact whatever the ties.
  """
  n, m = flat.size, sample.size
  k1 = min(k + 1, n - 1)
  if low_tail:
    # Twice the expected share of the sample, plus a margin for sampling noise.
    j = min(m - 1, 2 * (k1 + 1) * m // n + 16)
    tail = flat[flat <= sample[j]]
    if tail.size <= k1:
      return None
    part = np.partition(tail, (k, k1))
    return float(part[k]), float(part[k1])
  j = max(0, m - 1 - (2 * (n - k) * m // n + 16))
  tail = flat[flat >= sample[j]]
  start = n - tail.size   # rank of tail's smallest value in flat
  if k < start:
    return None
  part = np.partition(tail, (k - start, k1 - start))
  return float(part[k - start]), float(part[k1 - start])


def _percentiles(vals: np.ndarray, qs: Sequence[float]) -> tuple[float, ...]:
  """``np.percentile(vals, qs)`` (linear method, same float64 arithmetic) for
  tail percentiles (q <= 5 or q >= 95) without partitioning the whole array:
  ~4x faster on a 48x192x192 volume. Other q and small arrays use numpy."""
  flat = np.asarray(vals).reshape(-1)
  n = flat.size
  if n < 1 << 16 or any(5 < q < 95 for q in qs):
    return tuple(float(v) for v in np.percentile(flat, qs))
  sample = np.sort(flat[::n // (1 << 15)])
  out = []
  for q in qs:
    pos = q / 100.0 * (n - 1)
    k = int(np.floor(pos))
    pair = _order_stat_pair(flat, k, sample, low_tail=q < 50)
    if pair is None:
      return tuple(float(v) for v in np.percentile(flat, qs))
    a, b = pair
    t = pos - k
    # numpy's _lerp: a + (b - a) t, or b - (b - a)(1 - t) from t = 0.5 on.
    out.append(b - (b - a) * (1.0 - t) if t >= 0.5 else a + (b - a) * t)
  return tuple(out)


def normalise(voxels: np.ndarray, modality: str | None) -> tuple[np.ndarray, str]:
  """Modality-aware intensity normalisation (see the module docstring).

  Args:
    voxels: ``(D, H, W)`` float in physical units (HU for CT).
    modality: DICOM Modality ("CT", "MR", "PT", ...).
  Returns:
    (float32 array of the same shape, normalisation spec string).
  """
  x = np.asarray(voxels, np.float32)
  spec = normalisation_for(modality)
  finite = np.isfinite(x)
  all_finite = bool(finite.all())
  if (modality or "").upper() == "CT":
    lo, hi = CT_WINDOW
    # ((x - lo) * 2 / (hi - lo)) - 1 in place: one output array, no temporaries.
    out = np.subtract(x, np.float32(lo))
    np.multiply(out, np.float32(2.0 / (hi - lo)), out=out)
    np.subtract(out, np.float32(1.0), out=out)
    np.clip(out, -1.0, 1.0, out=out)
    if not all_finite:
      out[~finite] = -1.0
    return out, spec
  vals = x if all_finite else x[finite]
  if vals.size == 0:
    return np.zeros_like(x), spec
  lo, hi = _percentiles(vals, PERCENTILES)
  if not hi > lo:
    # A constant volume carries no contrast: map it to 0 rather than divide by 0.
    return np.zeros_like(x), spec
  out = np.subtract(x, np.float32(lo))
  np.multiply(out, np.float32(1.0 / (hi - lo)), out=out)
  np.clip(out, 0.0, 1.0, out=out)
  if not all_finite:
    out[~finite] = 0.0
  return out, spec
