"""Assemble a stack's slices into one canonical 3D volume.

``load_volume(stack)`` reads each file once: plain native little-endian
slices with ``fastread`` (header tags by ``struct``, pixel bytes read straight
into one reused buffer), everything else with pydicom's pixel backends
(native, pylibjpeg, gdcm; so JPEG baseline/lossless, JPEG-LS, JPEG 2000 and
RLE all work; the decoding of one file or frame is in ``pixels``), then:

1. applies RescaleSlope/Intercept per slice (per frame from the Pixel Value
   Transformation functional group in enhanced objects), vectorised;
2. sorts slices by position along the slice normal n = +-(r x c), oriented
   in the canonical slice direction (never by InstanceNumber) and measures the slice spacing from positions (never from
   SliceThickness);
3. duplicates (same position within 0.01 mm): identical pixels -> one is kept
   (the first in the stack's deterministic order); different pixels ->
   ``DicomError`` (the series mixes acquisitions that scan could not split);
4. slice spacing (``geometry.classify_spacing``: runs of equal steps):
   - *missing slices* (an isolated step of 1.5x to 2.5x the spacing on both
     sides; one, or at most 10% of the slices, missing in all) are filled
     by linear interpolation along D onto the uniform grid at the median
     spacing (``record["MissingSlicesInterpolated"]`` counts them); wider
     single steps -> ``DicomError`` (``scan`` already cuts a stack there, so
     that is a stack built by hand), as are too many holes;
   - *variable spacing* (two or more spacings that each hold for several
     slices, e.g. a head CT at 2.5 mm through the posterior fossa and 5 mm
     above) is resampled like dcm2niix's ``_Eq_`` output: the smallest
     spacing, laid from the inferior end of the stack (dcm2niix's first
     slice), linear along the normal, at most twice the slice count (then
     the spacing grows to span the stack); ``record["SliceSpacings"]`` lists
     the spacings found;
   - jitter (one spacing, a slice off the grid by more than 1% of it):
     resampled onto the uniform grid at the median spacing;
   every resampled stack has ``record["ResampledSliceSpacing"] = True``;
5. gantry tilt (slices shifted in-plane from one to the next, i.e. the stack
   direction is not the slice normal), either sign: **resampled** onto the
   orthogonal grid like dcm2niix's ``_Tilt`` output: the plane grows by the
   whole drift so that every slice fits, each slice is shifted in-plane
   (linear, outside filled with the volume minimum) so that the D axis
   becomes n; ``record["GantryTiltCorrected"]`` gives the angle in degrees;
6. (tilt and variable spacing combine: tilt first, then along D);
7. Siemens mosaics are unpacked (NumberOfImagesInMosaic, CSA slice normal),
   and UIH VFRAME images (tiles ceil(sqrt(n)) wide, slice positions from
   the private MR VFrame Sequence);
8. reorients to the canonical orientation (flips and an in-plane transpose
   only; see ``geometry``).

Only one volume is held in memory: slices are decoded straight into one
preallocated float32 array (rescaled in the same pass), in the stack's order,
and the canonical flips / transpose rewrite that array in place, so the peak
is one volume plus a slice for classic series.

Here: the readers of each layout (classic slices, enhanced multi-frame,
Siemens mosaic, UIH VFRAME) into ``_Slices``, the voxel side of the assembly
(dropping duplicates, the in-plane tilt shift ``_shift_axis``, the
interpolation along D) and ``load_volume``. Where the slices go (ordering,
spacing classification, gaps, ``_Eq_`` grid, tilt, affine) is planned in
``stackgrid``, shared with the streaming path ``stream.load_resampled``
(classic stacks decoded straight onto the shard grid).
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from radnet_jax.dicom import geometry, isolation
from radnet_jax.dicom.errors import DicomError
from radnet_jax.dicom.metadata import (functional_group, uih_vframe_items,
                                       vendor_geometry)
from radnet_jax.dicom.pixels import _fast_slice, _pixels, _rescale, _rescale_into, _vec
from radnet_jax.dicom.reader import read_dataset
from radnet_jax.dicom.stackgrid import _duplicates, _finish_record, _grid, _order
from radnet_jax.dicom.types import Stack, Volume


class _Slices:
  """Decoded slices with their geometry, before assembly."""

  def __init__(self, n: int, rows: int, cols: int):
    self.voxels = np.empty((n, rows, cols), np.float32)
    self.positions = np.zeros((n, 3))
    self.iops = np.zeros((n, 6))
    self.spacings = np.zeros((n, 2))
    self.count = 0

  def add(self, pixels: np.ndarray, ipp, iop, spacing, slope: float,
          inter: float, where: str, index: int | None = None) -> None:
    """Rescales ``pixels`` (H, W) into slot ``index`` (default: the next)."""
    i = self.count if index is None else index
    if pixels.shape != self.voxels.shape[1:]:
      raise DicomError(where, f"slice size {pixels.shape} differs from the "
                              f"stack's {self.voxels.shape[1:]}")
    _rescale_into(pixels, slope, inter, self.voxels[i])
    self.positions[i] = _vec(ipp, 3, where, "ImagePositionPatient")
    self.iops[i] = _vec(iop, 6, where, "ImageOrientationPatient")
    self.spacings[i] = _vec(spacing, 2, where, "PixelSpacing")
    self.count += 1


def _read_classic(stack: Stack) -> _Slices:
  slices = None
  staging: dict = {}
  for path in stack.files:
    isolation.reading(path)
    fast = _fast_slice(path, staging)
    if fast is not None:
      arr, h = fast
      if slices is None:
        slices = _Slices(len(stack.files), arr.shape[0], arr.shape[1])
      slope, inter = _rescale(h, path)
      slices.add(arr, h.get("ImagePositionPatient"),
                 h.get("ImageOrientationPatient"), h.get("PixelSpacing"),
                 slope, inter, path)
      continue
    ds = read_dataset(path, stop_before_pixels=False)
    if "PixelData" not in ds and "FloatPixelData" not in ds:
      raise DicomError(path, "no pixel data")
    arr = _pixels(ds, path)
    if arr.ndim != 2:
      raise DicomError(path, f"expected one frame, got shape {arr.shape}")
    if slices is None:
      slices = _Slices(len(stack.files), arr.shape[0], arr.shape[1])
    slope, inter = _rescale(ds, path)
    ipp, iop = vendor_geometry(ds)  # the classic tags, else Philips' copy
    slices.add(arr, ipp, iop, ds.get("PixelSpacing"), slope, inter, path)
  return slices


def _read_enhanced(stack: Stack) -> _Slices:
  slices = None
  by_file: dict[int, list[tuple[int, int]]] = {}
  for slot, (fi, fr) in enumerate(stack.frames):
    by_file.setdefault(fi, []).append((slot, fr))
  for fi in sorted(by_file):
    path = stack.files[fi]
    isolation.reading(path)
    ds = read_dataset(path, stop_before_pixels=False)
    arr = _pixels(ds, path)
    if arr.ndim == 2:
      arr = arr[None]
    if slices is None:
      slices = _Slices(len(stack.frames), arr.shape[1], arr.shape[2])
    for slot, fr in by_file[fi]:
      where = f"{path} frame {fr + 1}"
      if fr >= arr.shape[0]:
        raise DicomError(where, f"frame index beyond the {arr.shape[0]} frames")
      pos = functional_group(ds, fr, "PlanePositionSequence")
      ori = functional_group(ds, fr, "PlaneOrientationSequence")
      meas = functional_group(ds, fr, "PixelMeasuresSequence")
      if pos is None or ori is None or meas is None:
        raise DicomError(where, "missing plane position/orientation/measures")
      pvt = functional_group(ds, fr, "PixelValueTransformationSequence")
      slope, inter = _rescale(pvt if pvt is not None else ds, where)
      # Straight into the stack's frame order (no reordering copy).
      slices.add(arr[fr], pos.get("ImagePositionPatient"),
                 ori.get("ImageOrientationPatient"), meas.get("PixelSpacing"),
                 slope, inter, where, index=slot)
    del arr, ds
  return slices


def _read_mosaic(stack: Stack) -> _Slices:
  path = stack.files[0]
  isolation.reading(path)
  ds = read_dataset(path, stop_before_pixels=False)
  n = int(stack.record.get("NumberOfImagesInMosaic", 0))
  if n <= 0:
    raise DicomError(path, "mosaic without NumberOfImagesInMosaic")
  arr = _pixels(ds, path)
  grid = int(math.ceil(math.sqrt(n)))
  # Tiles fill the mosaic from its top-left corner; a remainder of rows or
  # columns (a mosaic not divisible by the grid) is padding, dropped as
  # dcm2niix and nibabel do.
  rows, cols = arr.shape[0] // grid, arr.shape[1] // grid
  if rows < 1 or cols < 1:
    raise DicomError(path, f"mosaic {arr.shape} is smaller than its "
                           f"{grid}x{grid} grid of {n} images")
  tiles = arr[:rows * grid, :cols * grid]
  tiles = tiles.reshape(grid, rows, grid, cols).transpose(0, 2, 1, 3)
  tiles = tiles.reshape(grid * grid, rows, cols)[:n]
  iop = _vec(ds.ImageOrientationPatient, 6, path, "ImageOrientationPatient")
  ipp = _vec(ds.ImagePositionPatient, 3, path, "ImagePositionPatient")
  spacing = _vec(ds.PixelSpacing, 2, path, "PixelSpacing")
  r, c = iop[:3], iop[3:]
  # Siemens puts the mosaic's position at the corner of the whole mosaic;
  # move it to the corner of the first tile (as nibabel and dcm2niix do). The
  # shift counts a tile as 1/grid of the mosaic, like dcm2niix, which matters
  # only for mosaics that do not divide evenly.
  ipp = ipp + c * spacing[0] * arr.shape[0] * (grid - 1) / (2 * grid) \
      + r * spacing[1] * arr.shape[1] * (grid - 1) / (2 * grid)
  normal = geometry.slice_normal(iop)
  try:
    with warnings.catch_warnings():  # nibabel warns that nicom is experimental
      warnings.simplefilter("ignore")
      from nibabel.nicom import csareader  # pylint: disable=import-outside-toplevel
    csa_normal = csareader.get_slice_normal(csareader.get_csa_header(ds))
    if csa_normal is not None and normal @ np.asarray(csa_normal) < 0:
      normal = -normal  # slices stored from the other end
  except Exception:
    pass
  step = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 0)
  if step <= 0:
    raise DicomError(path, "mosaic without SpacingBetweenSlices/SliceThickness")
  slope, inter = _rescale(ds, path)
  slices = _Slices(n, rows, cols)
  for i in range(n):
    slices.add(tiles[i], ipp + i * step * normal, iop, spacing, slope, inter,
               path)
  return slices


def _read_uih_vframe(stack: Stack) -> _Slices:
  """UIH VFRAME: one volume per file, its n slices tiled ceil(sqrt(n)) wide
  and ceil(n / wide) high (or padded to a square grid) from the top-left
  corner, each slice's position in an item of the private MR VFrame
  Sequence (0065,1051)."""
  path = stack.files[0]
  isolation.reading(path)
  ds = read_dataset(path, stop_before_pixels=False)
  items = uih_vframe_items(ds)
  n = len(items)
  if n == 0:
    raise DicomError(path, "UIH VFRAME image without its MR VFrame Sequence "
                           "(0065,1051) (vendor UIH)")
  arr = _pixels(ds, path)
  wide = int(math.ceil(math.sqrt(n)))
  cols = arr.shape[1] // wide
  # UIH documents ceil(n / wide) rows of tiles; an image padded to a square
  # grid has ``wide`` rows: take the count that gives square tiles, else the
  # one that divides the image height.
  high = int(math.ceil(n / wide))
  candidates = [h for h in (high, wide) if arr.ndim == 2 and arr.shape[0] % h == 0]
  square = [h for h in candidates if arr.shape[0] // h == cols]
  high = (square or candidates or [high])[0]
  rows = arr.shape[0] // high
  if rows < 1 or cols < 1 or arr.ndim != 2:
    raise DicomError(path, f"UIH VFRAME image {arr.shape} does not hold a "
                           f"{high}x{wide} grid of {n} slices")
  iop = _vec(ds.get("ImageOrientationPatient") or
             items[0].get("ImageOrientationPatient"), 6, path,
             "ImageOrientationPatient")
  spacing = _vec(ds.get("PixelSpacing"), 2, path, "PixelSpacing")
  slope, inter = _rescale(ds, path)
  slices = _Slices(n, rows, cols)
  for i, item in enumerate(items):
    r0, c0 = (i // wide) * rows, (i % wide) * cols
    ipp = _vec(item.get("ImagePositionPatient"), 3,
               f"{path} (0065,1051) item {i + 1}", "ImagePositionPatient")
    slices.add(arr[r0:r0 + rows, c0:c0 + cols], ipp, iop, spacing, slope,
               inter, path)
  return slices


def _shift_axis(img: np.ndarray, axis: int, start: float, size: int,
                fill: float, hold_first: bool) -> np.ndarray:
  """Resamples ``img`` (H, W) along ``axis`` at coordinates start + 0..size-1
  (linear); outside the pixels it is ``fill``, except that within one pixel
  of the first (``hold_first``) or the last pixel that pixel is held. This
  is the edge rule of dcm2niix's tilt correction (it interpolates rows in
  its bottom-up order, so the held sliver is before DICOM row 0), so edge
  voxels agree with it."""
  n = img.shape[axis]
  x = start + np.arange(size)
  eps = 1e-3
  if hold_first:
    valid = (x > -1 + eps) & (x <= n - 1 + eps)
  else:
    valid = (x >= -eps) & (x < n - eps)
  lo = np.clip(np.floor(x + eps).astype(int), 0, n - 1)
  hi = np.minimum(lo + 1, n - 1)
  frac = np.clip(x - lo, 0.0, 1.0).astype(np.float32)
  a, b = np.take(img, lo, axis=axis), np.take(img, hi, axis=axis)
  shape = [1, 1]
  shape[axis] = size
  frac = frac.reshape(shape)
  out = a * (1 - frac) + b * frac
  if axis == 0:
    out[~valid] = fill
  else:
    out[:, ~valid] = fill
  return out


def _assemble(sl: _Slices, where: str, record: dict[str, Any]
              ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """Sorted, deduplicated, tilt-corrected, uniform (D, H, W) + raw affine."""
  info: dict[str, Any] = {}
  n, s, order = _order(sl.positions, sl.iops, sl.spacings, where)
  if np.array_equal(order, np.arange(len(s))):
    # scan already sorted the files: no copy of the voxels.
    vox, pos = sl.voxels, sl.positions
  else:
    vox, pos, s = sl.voxels[order], sl.positions[order], s[order]
  # --- duplicates ---------------------------------------------------------
  dup = _duplicates(s)
  if len(dup):
    for i in dup:
      j = i - 1
      while j in dup:
        j -= 1
      if not np.array_equal(vox[i], vox[j]):
        tried = record.get("VolumeSplitTried")
        raise DicomError(where, f"two slices at the same position "
                                f"({s[i]:.3f} mm along the normal) with "
                                "different pixels: mixed acquisitions"
                                + (f" ({tried})" if tried else ""))
    keep = np.setdiff1d(np.arange(len(s)), dup)
    vox, pos, s = vox[keep], pos[keep], s[keep]
    info["DuplicateSlicesDropped"] = int(len(dup))
  grid = _grid(s, pos, n, sl.iops[0], sl.spacings[0], vox.shape[1:], record,
               where)
  info.update(grid.info)
  if grid.tilt is not None:
    t = grid.tilt
    fill = float(vox.min())
    out = np.empty((len(s), t.rows, t.cols), np.float32)
    for i in range(len(s)):
      img = vox[i]
      if t.rows != img.shape[0] or t.drift_h[i] != t.h0:
        img = _shift_axis(img, 0, t.h0 - t.drift_h[i], t.rows, fill, True)
      if t.cols != img.shape[1] or t.drift_w[i] != t.w0:
        img = _shift_axis(img, 1, t.w0 - t.drift_w[i], t.cols, fill, False)
      out[i] = img
    vox = out
  if grid.uniform is not None:
    lo, hi, w = grid.uniform
    vox = (vox[lo] * (1 - w)[:, None, None] + vox[hi] * w[:, None, None])
  return vox, grid.affine, info


def load_volume(stack: Stack) -> Volume:
  """Reads and assembles one stack (from ``scan``) into a canonical volume.

  Returns:
    Volume(voxels float32 (D, H, W) in physical units (HU for CT), affine
    (4, 4) voxel -> LPS mm, spacing (3,) mm along (D, H, W), record with the
    geometry keys refined from the assembled volume).

  Raises:
    DicomError: naming the file or stack and the reason (undecodable pixels,
      missing slices, duplicated positions with different pixels, ...).
  """
  where = f"stack {stack.key}"
  record = dict(stack.record)
  try:
    if stack.frames is not None:
      sl = _read_enhanced(stack)
    elif record.get("MosaicLayout") == "UIH VFRAME":
      sl = _read_uih_vframe(stack)
    elif record.get("NumberOfImagesInMosaic"):
      sl = _read_mosaic(stack)
    else:
      sl = _read_classic(stack)
  except (DicomError, MemoryError):   # MemoryError: the machine, not the data
    raise
  except Exception as e:
    raise DicomError(where, f"unreadable stack ({type(e).__name__}: {e})") from e
  if sl is None or sl.count == 0:
    raise DicomError(where, "no slices")
  vox, affine, info = _assemble(sl, where, record)
  del sl
  plane = geometry.plane_of(affine[:3, 0])
  vox = np.asarray(vox, dtype=np.float32)
  if vox.flags.c_contiguous and vox.flags.writeable:
    # Flips / in-plane transpose within the buffer: no second volume.
    vox, affine = geometry.reorient_in_place(vox, affine, plane)
  else:
    vox, affine = geometry.reorient(vox, affine, plane)
    vox = np.ascontiguousarray(vox, dtype=np.float32)
  spacing = _finish_record(record, info, affine, vox.shape, stack.key)
  return Volume(voxels=vox, affine=affine, spacing=spacing, record=record)
