"""Assemble a stack's slices into one canonical 3D volume.

``load_volume(stack)`` reads each file once: plain native little-endian
slices with ``fastread`` (header tags by ``struct``, pixel bytes read straight
into one reused buffer), everything else with pydicom's pixel backends
(native, pylibjpeg, gdcm; so JPEG baseline/lossless, JPEG-LS, JPEG 2000 and
RLE all work), then:

1. applies RescaleSlope/Intercept per slice (per frame from the Pixel Value
   Transformation functional group in enhanced objects), vectorised;
2. sorts slices by position along the slice normal n = +-(r x c), oriented
   in the canonical slice direction (never by InstanceNumber) and measures the slice spacing from positions (never from
   SliceThickness);
3. duplicates (same position within 0.01 mm): identical pixels -> one is kept
   (the first in the stack's deterministic order); different pixels ->
   ``DicomError`` (the series mixes acquisitions that scan could not split);
4. missing slices: a gap of one missing slice (1.5x to 2.5x the median
   spacing; one, or at most 10% of the slices, missing in all) is filled by linear
   interpolation along D like dcm2niix's equidistant ``_Eq_`` output
   (``record["MissingSlicesInterpolated"]`` counts them); anything larger
   -> ``DicomError`` (``scan`` already splits a stack at gaps wider than
   2.5x, so that is a stack built by hand or too many holes);
5. gantry tilt (slices shifted in-plane from one to the next, i.e. the stack
   direction is not the slice normal): **resampled** onto the orthogonal grid
   like dcm2niix does: each slice is shifted in-plane (linear interpolation,
   outside filled with the volume minimum) so that the D axis becomes n;
   ``record["GantryTiltCorrected"]`` gives the angle in degrees;
6. non-uniform spacing (some slice deviates from the uniform grid by more than
   1% of the spacing, but no gap > 1.5x) and filled gaps: **resampled** along D onto a uniform
   grid at the median spacing (linear interpolation);
   ``record["ResampledSliceSpacing"] = True``;
7. Siemens mosaics are unpacked (NumberOfImagesInMosaic, CSA slice normal);
8. reorients to the canonical orientation (flips and an in-plane transpose
   only; see ``geometry``).

Only one volume is held in memory: slices are decoded straight into one
preallocated float32 array (rescaled in the same pass), in the stack's order,
and the canonical flips / transpose rewrite that array in place, so the peak
is one volume plus a slice for classic series.

``load_resampled(stack, shape)`` is the converter's path for classic stacks:
the same checks and geometry, but each slice goes straight into a
``resample.SliceStream`` (only a window of a few slices and the small output
are held), with a result equal bit for bit to ``load_volume`` then
``resample.resize``; it declines (None) whatever needs the whole volume
(duplicates, tilt, non-uniform spacing) or is not a classic stack.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from radnet_jax.dicom import fastread, geometry, isolation
from radnet_jax.dicom.errors import DicomError
from radnet_jax.dicom.metadata import functional_group
from radnet_jax.dicom.reader import read_dataset
from radnet_jax.dicom.types import Stack, Volume

DUPLICATE_TOL_MM = 1e-2
GAP_FACTOR = 1.5
FILL_MAX_FRACTION = 0.1     # more than one filled slice: at most this fraction
UNIFORM_TOL = 1e-2          # relative to the spacing
TILT_TOL_PX = 0.05          # in-plane drift over the whole stack, in pixels


_NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def _native_pixels(ds: Dataset) -> np.ndarray | None:
  """Uncompressed little-endian grey single-frame pixels without pydicom's
  generic pixel pipeline (about 30x less overhead per slice); None when the
  file needs the general path."""
  meta = getattr(ds, "file_meta", None)
  if meta is None or str(meta.get("TransferSyntaxUID", "")) not in _NATIVE_LE:
    return None
  try:
    if (int(ds.get("SamplesPerPixel", 1)) != 1 or
        int(ds.get("NumberOfFrames", 1) or 1) != 1 or "PixelData" not in ds):
      return None
    bits, stored = int(ds.BitsAllocated), int(ds.BitsStored)
    signed = int(ds.PixelRepresentation) == 1
    rows, cols = int(ds.Rows), int(ds.Columns)
  except (AttributeError, TypeError, ValueError):
    return None
  if bits not in (8, 16, 32) or stored > bits:
    return None
  data = ds.PixelData
  dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
  if len(data) < rows * cols * dtype.itemsize:
    return None  # truncated: let the general path report it
  arr = np.frombuffer(data, dtype, count=rows * cols).reshape(rows, cols)
  if stored < bits:  # as pydicom: mask unused high bits / sign-extend
    if signed:
      shift = bits - stored
      arr = (arr << shift) >> shift
    else:
      arr = arr & dtype.type((1 << stored) - 1)
  return arr


def _pixels(ds: Dataset, where: str) -> np.ndarray:
  arr = _native_pixels(ds)
  if arr is not None:
    return arr
  isolation.before_native_decode(where)   # may hand the job to a worker
  try:
    isolation.injected_fault(where)
    arr = ds.pixel_array
  except MemoryError:
    raise
  except BaseException as e:  # noqa: BLE001 - decoder missing, corrupt stream,
    # truncated data; a Rust decoder's panic is a BaseException
    if isolation.is_fatal(e):
      raise
    raise DicomError(where, f"cannot decode pixel data "
                            f"({type(e).__name__}: {e})") from e
  if int(ds.get("SamplesPerPixel", 1)) != 1:
    raise DicomError(where, "colour image (SamplesPerPixel != 1) is not a "
                            "grey-level cross-sectional image")
  return arr


def _rescale(item: Dataset | None, where: str = "") -> tuple[float, float]:
  """(RescaleSlope, RescaleIntercept); absent values are 1 and 0. A slope of
  0 or a non-finite / unreadable value raises DicomError: the physical values
  are unknown, and guessing 1.0 would store wrong HU."""
  if item is None:
    return 1.0, 0.0
  out = []
  for key, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
    value = item.get(key, None)
    try:
      v = float(value) if value not in (None, "") else default
    except (TypeError, ValueError) as e:
      raise DicomError(where, f"unreadable {key} {value!r}") from e
    if not math.isfinite(v) or (key == "RescaleSlope" and v == 0):
      raise DicomError(where, f"invalid {key} {v!r} (the physical pixel values "
                              "are unknown)")
    out.append(v)
  return out[0], out[1]


def _vec(value: Any, n: int, where: str, what: str) -> np.ndarray:
  try:
    arr = np.asarray([float(v) for v in value], float)
  except (TypeError, ValueError) as e:
    raise DicomError(where, f"invalid {what}") from e
  if arr.shape != (n,):
    raise DicomError(where, f"invalid {what} ({len(arr)} values)")
  return arr


def _rescale_into(pixels: np.ndarray, slope: float, inter: float,
                  out: np.ndarray) -> None:
  """out (H, W) float32 = pixels * slope + inter, in one pass from the stored
  integers: cast to float32, then the float32 multiply / add (the same float32
  operations as cast, *=, +=). ``pixels`` may be a strided view."""
  # Cast first, then in place: the same float32 values as the mixed-type
  # ufunc (which casts to float32 too) in ~0.6x the time (SIMD loops, no
  # buffered casting).
  out[...] = pixels
  if slope != 1.0:
    np.multiply(out, np.float32(slope), out=out)
  if inter != 0.0:
    np.add(out, np.float32(inter), out=out)


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


def _native_layout(h: fastread.Header) -> tuple | None:
  """(rows, cols, dtype, bits, stored, signed) of a native little-endian
  classic grey slice whose header ``fastread`` decoded cleanly, else None
  (the file needs pydicom). Raises fastread.Unsupported / ValueError on
  values it cannot decode."""
  if h is None or h.pixel_value_offset is None:
    return None
  if str(h.file_meta.get("TransferSyntaxUID", "")) not in _NATIVE_LE:
    return None
  if (int(h.get("SamplesPerPixel", 1)) != 1 or
      int(h.get("NumberOfFrames", 1) or 1) != 1 or
      "PerFrameFunctionalGroupsSequence" in h):
    return None
  bits, stored = int(h.BitsAllocated), int(h.BitsStored)
  signed = int(h.PixelRepresentation) == 1
  rows, cols = int(h.Rows), int(h.Columns)
  for key in ("ImagePositionPatient", "ImageOrientationPatient",
              "PixelSpacing"):
    h.get(key)  # decodable here, or Unsupported -> pydicom
  _rescale(h, h.path)
  if bits not in (8, 16, 32) or stored > bits or stored <= 0:
    return None
  dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
  if h.pixel_length < rows * cols * dtype.itemsize:
    return None  # truncated: let the general path report it
  return rows, cols, dtype, bits, stored, signed


def _read_native(path: str, offset: int, layout: tuple, staging: dict
                 ) -> np.ndarray | None:
  """Stored pixels (H, W) read from ``offset`` into a reused buffer (one per
  (shape, dtype) in ``staging``), high bits masked as pydicom does; None if
  the read comes up short."""
  rows, cols, dtype, bits, stored, signed = layout
  buf = staging.get((rows, cols, dtype.str))
  if buf is None:
    buf = staging[(rows, cols, dtype.str)] = np.empty((rows, cols), dtype)
  try:
    with open(path, "rb", buffering=0) as f:
      f.seek(offset)
      if f.readinto(memoryview(buf).cast("B")) != buf.nbytes:
        return None
  except OSError:
    return None
  arr = buf
  if stored < bits:  # as pydicom: mask unused high bits / sign-extend
    if signed:
      shift = bits - stored
      arr = (arr << shift) >> shift
    else:
      arr = arr & dtype.type((1 << stored) - 1)
  return arr


def _fast_slice(path: str, staging: dict) -> tuple | None:
  """Native little-endian classic slice via ``fastread``: (stored pixels
  (H, W), header) read straight from the file, or None (use pydicom).

  ``staging`` caches one reusable buffer per (shape, dtype), so a stack's
  pixels are read without a per-file allocation.
  """
  try:
    h = fastread.read_header(path)
    layout = _native_layout(h)
  except (fastread.Unsupported, AttributeError, TypeError, ValueError,
          OSError):
    return None
  if layout is None:
    return None
  arr = _read_native(path, h.pixel_value_offset, layout, staging)
  return None if arr is None else (arr, h)


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
    slices.add(arr, ds.get("ImagePositionPatient"),
               ds.get("ImageOrientationPatient"), ds.get("PixelSpacing"),
               slope, inter, path)
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


def _shift_rows_cols(img: np.ndarray, dh: float, dw: float, fill: float
                     ) -> np.ndarray:
  """out[h, w] = img[h - dh, w - dw] (bilinear), outside = fill."""
  from scipy import ndimage  # pylint: disable=import-outside-toplevel
  return ndimage.shift(img, (dh, dw), order=1, mode="constant", cval=fill,
                       prefilter=False)


@dataclasses.dataclass
class _Grid:
  """Where the sorted, deduplicated slices go on the output grid.

  dz: slice spacing (mm); affine: raw (D, H, W) voxel -> LPS (before the
  canonical flips); tilt: per-slice in-plane shifts (rows, columns) in pixels
  or None; uniform: (lo, hi, w) linear interpolation onto a uniform grid or
  None; info: record keys describing the corrections.
  """
  dz: float
  affine: np.ndarray
  tilt: tuple[np.ndarray, np.ndarray] | None
  uniform: tuple[np.ndarray, np.ndarray, np.ndarray] | None
  info: dict[str, Any]


def _order(positions: np.ndarray, iops: np.ndarray, spacings: np.ndarray,
           where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Checks one orientation / pixel spacing; returns (stack direction n,
  positions along n, slice order by position)."""
  iop = iops[0]
  if np.max(np.abs(iops - iop)) > 1e-3:
    raise DicomError(where, "slices have different orientations")
  if np.max(np.abs(spacings - spacings[0])) > 1e-3:
    raise DicomError(where, "slices have different pixel spacings")
  dr, dc = spacings[0]
  if dr <= 0 or dc <= 0:
    raise DicomError(where, f"invalid PixelSpacing {spacings[0].tolist()}")
  n = geometry.stack_direction(iop)
  s = positions @ n
  return n, s, np.argsort(s, kind="stable")


def _duplicates(s: np.ndarray) -> np.ndarray:
  """Indices (into the sorted slices) that repeat the previous position."""
  if len(s) < 2:
    return np.zeros(0, int)
  return np.flatnonzero(np.diff(s) < DUPLICATE_TOL_MM) + 1


def _grid(s: np.ndarray, pos: np.ndarray, n: np.ndarray, iop: np.ndarray,
          spacing: np.ndarray, record: dict[str, Any], where: str) -> _Grid:
  """Spacing, gaps, tilt and uniformity of sorted, deduplicated slices."""
  info: dict[str, Any] = {}
  r, c = iop[:3], iop[3:]
  dr, dc = spacing
  count = len(s)
  filled = False    # slices missing in gaps, filled by the uniform resampling
  # --- spacing and gaps ---------------------------------------------------
  if count == 1:
    dz = float(record.get("SpacingBetweenSlices") or
               record.get("SliceThickness") or 1.0)
  else:
    diffs = np.diff(s)
    med = float(np.median(diffs))
    big = np.flatnonzero(diffs > GAP_FACTOR * med)
    if len(big):
      filled = True
      missing = int(np.sum(np.maximum(np.round(diffs[big] / med) - 1, 1)))
      i = int(big[np.argmax(diffs[big])])
      if (diffs[i] > geometry.GAP_FILL_FACTOR * med or
          missing > max(1, FILL_MAX_FRACTION * (count + missing))):
        raise DicomError(where, f"missing slice(s): gap of {diffs[i]:.3f} mm "
                                f"after slice {i} (median spacing {med:.3f} "
                                f"mm; {missing} slice(s) missing in all)")
      info["MissingSlicesInterpolated"] = missing
    dz = float((s[-1] - s[0]) / (count - 1))
  # --- gantry tilt: in-plane drift of the positions ---------------------------
  offsets = (pos - pos[0]) - np.outer(s - s[0], n)
  drift_h, drift_w = offsets @ c / dr, offsets @ r / dc
  tilt = None
  if count > 1 and max(np.max(np.abs(drift_h)), np.max(np.abs(drift_w))) > TILT_TOL_PX:
    tilt = (drift_h, drift_w)
    along = (pos[-1] - pos[0]) / np.linalg.norm(pos[-1] - pos[0])
    info["GantryTiltCorrected"] = float(
        np.degrees(np.arccos(np.clip(abs(along @ n), 0, 1))))
  # --- non-uniform spacing -> resample along D ------------------------------
  uniform = None
  if count > 2:
    resid = np.abs(s - (s[0] + dz * np.arange(count)))
    if filled or np.max(resid) > UNIFORM_TOL * dz:
      dz = float(np.median(np.diff(s)))
      k = int(np.floor((s[-1] - s[0]) / dz + 1e-3)) + 1
      target = s[0] + dz * np.arange(k)
      hi = np.clip(np.searchsorted(s, target, side="right"), 1, count - 1)
      lo = hi - 1
      w = ((target - s[lo]) / (s[hi] - s[lo])).astype(np.float32)
      uniform = (lo, hi, w)
      info["ResampledSliceSpacing"] = True
  affine = np.eye(4)
  affine[:3, 0], affine[:3, 1], affine[:3, 2] = n * dz, c * dr, r * dc
  affine[:3, 3] = pos[0]
  return _Grid(dz, affine, tilt, uniform, info)


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
        raise DicomError(where, f"two slices at the same position "
                                f"({s[i]:.3f} mm along the normal) with "
                                "different pixels: mixed acquisitions")
    keep = np.setdiff1d(np.arange(len(s)), dup)
    vox, pos, s = vox[keep], pos[keep], s[keep]
    info["DuplicateSlicesDropped"] = int(len(dup))
  grid = _grid(s, pos, n, sl.iops[0], sl.spacings[0], record, where)
  info.update(grid.info)
  if grid.tilt is not None:
    drift_h, drift_w = grid.tilt
    fill = float(vox.min())
    vox = np.ascontiguousarray(vox)
    for i in range(1, len(s)):
      vox[i] = _shift_rows_cols(vox[i], drift_h[i], drift_w[i], fill)
  if grid.uniform is not None:
    lo, hi, w = grid.uniform
    vox = (vox[lo] * (1 - w)[:, None, None] + vox[hi] * w[:, None, None])
  return vox, grid.affine, info


def _finish_record(record: dict[str, Any], info: dict[str, Any],
                   affine: np.ndarray, shape: tuple[int, int, int],
                   key: str) -> np.ndarray:
  """Adds the assembled geometry to ``record``; returns the spacing (3,) mm."""
  spacing = np.linalg.norm(affine[:3, :3], axis=0)
  record.update(info)
  record["NumberOfSlices"] = int(shape[0])
  record["SliceSpacing"] = float(spacing[0])
  record["ExtentMM"] = geometry.extent_mm(spacing, shape)
  record["ExtentSI"] = geometry.extent_si(affine, shape)
  record["StackKey"] = key
  return spacing


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


# ---------------------------------------------------------------------------
# Streaming conversion: decode straight onto the shard grid.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class ResampledStack:
  """A stack decoded straight onto a smaller grid (``load_resampled``).

  voxels: float32 ``(D', H', W')`` in physical units (HU for CT), equal bit
    for bit to ``resample.resize(load_volume(stack).voxels, (D', H', W'))``.
  shape: ``(D, H, W)`` of the canonical full-resolution grid (what
    ``load_volume`` would return).
  affine: float64 ``(4, 4)`` voxel -> LPS mm of that full-resolution grid.
  spacing: float64 ``(3,)`` mm along (D, H, W) of that grid.
  record: the stack's record with the assembled geometry, as in ``Volume``.
  """
  voxels: np.ndarray
  shape: tuple[int, int, int]
  affine: np.ndarray
  spacing: np.ndarray
  record: dict[str, Any]


class _Decline(Exception):
  """The stack is outside the streaming path: use load_volume."""


def load_resampled(stack: Stack, shape: tuple[int, int, int]
                   ) -> ResampledStack | None:
  """Reads a classic stack straight onto the ``shape`` grid, or None.

  The same result as ``load_volume`` followed by ``resample.resize`` (same
  voxel values bit for bit, same affine, spacing and record), without the
  full-resolution float32 volume: the headers are read first (``fastread``;
  positions, orientation, spacing, rescale, where the pixels are), the
  geometry is checked exactly as ``load_volume`` checks it, and then each
  slice is read in canonical order, rescaled (and flipped / transposed in
  plane) into a window of a ``resample.SliceStream`` that mixes it into the
  output slices it contributes to. Peak memory is the small output plus a
  window of about two bands of input slices (~17 MB for a 185-slice
  512x512 CT to 48 slices, instead of 185 MB).

  Returns None, having written nothing, for whatever this path does not
  handle, so the caller uses ``load_volume`` (which also reports any error
  with its usual reason): enhanced multi-frame objects, mosaics, headers
  ``fastread`` does not parse (big endian, deflate, gzip, odd values),
  duplicated positions, gaps, gantry tilt, non-uniform spacing, files not in
  slice order, undecodable pixels. Compressed pixel data (JPEG, JPEG-LS,
  JPEG 2000, RLE) is decoded by pydicom slice by slice.
  """
  try:
    return _load_resampled(stack, tuple(int(s) for s in shape))
  except Exception:  # noqa: BLE001 - anything unusual: the general path decides
    return None


def _load_resampled(stack: Stack, shape: tuple[int, int, int]
                    ) -> ResampledStack | None:
  from radnet_jax import resample as rs  # pylint: disable=import-outside-toplevel
  if stack.frames is not None or stack.record.get("NumberOfImagesInMosaic"):
    return None
  count = len(stack.files)
  if count < 2:
    return None
  where = f"stack {stack.key}"
  # --- headers: geometry, rescale, where the pixels are ----------------------
  positions, iops = np.zeros((count, 3)), np.zeros((count, 6))
  spacings, rescale = np.zeros((count, 2)), np.zeros((count, 2))
  layouts: list[tuple | None] = []
  offsets: list[int | None] = []
  size = None
  for i, path in enumerate(stack.files):
    isolation.reading(path)
    h = fastread.read_header(path)
    if h is None:
      return None
    if (int(h.get("SamplesPerPixel", 1)) != 1 or
        int(h.get("NumberOfFrames", 1) or 1) != 1 or
        "PerFrameFunctionalGroupsSequence" in h):
      return None
    if h._radnet_pixel_offset >= h._radnet_file_size:  # pylint: disable=protected-access
      return None  # no pixel data
    layout = _native_layout(h)
    rows_cols = (int(h.Rows), int(h.Columns))
    if size is None:
      size = rows_cols
    elif rows_cols != size:
      return None
    layouts.append(layout)
    offsets.append(h.pixel_value_offset)
    positions[i] = _vec(h.get("ImagePositionPatient"), 3, path,
                        "ImagePositionPatient")
    iops[i] = _vec(h.get("ImageOrientationPatient"), 6, path,
                   "ImageOrientationPatient")
    spacings[i] = _vec(h.get("PixelSpacing"), 2, path, "PixelSpacing")
    rescale[i] = _rescale(h, path)
  # --- geometry, exactly as load_volume ----------------------------------------
  n, s, order = _order(positions, iops, spacings, where)
  if not np.array_equal(order, np.arange(count)) or len(_duplicates(s)):
    return None
  grid = _grid(s, positions, n, iops[0], spacings[0], stack.record, where)
  if grid.tilt is not None or grid.uniform is not None:
    return None
  raw_shape = (count,) + size
  plane = geometry.plane_of(grid.affine[:3, 0])
  transpose, flips, affine = geometry._canonical_affine(  # pylint: disable=protected-access
      grid.affine, raw_shape, plane)
  if flips[0]:
    return None  # never for stack_direction's order; keep load_volume's copy
  canon = (count,) + ((size[1], size[0]) if transpose else size)
  # --- pixels, slice by slice, into the resampler ---------------------------
  stream = rs.SliceStream(canon, shape)
  staging: dict = {}
  for i, path in enumerate(stack.files):
    isolation.reading(path)
    arr = None
    if layouts[i] is not None:
      arr = _read_native(path, offsets[i], layouts[i], staging)
    if arr is None:
      ds = read_dataset(path, stop_before_pixels=False)
      if "PixelData" not in ds:
        return None
      arr = _pixels(ds, path)
    if arr.shape != size:
      return None
    view = arr.T if transpose else arr
    if flips[1]:
      view = view[::-1]
    if flips[2]:
      view = view[:, ::-1]
    _rescale_into(view, float(rescale[i, 0]), float(rescale[i, 1]), stream.slot())
    stream.push()
  record = dict(stack.record)
  spacing = _finish_record(record, grid.info, affine, canon, stack.key)
  return ResampledStack(stream.result(), canon, affine, spacing, record)
