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
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pydicom is imported only where a file needs it (slow import)
  from pydicom.dataset import Dataset

from radnet_jax.dicom import fastread, geometry, isolation
from radnet_jax.dicom.errors import DicomError
from radnet_jax.dicom.metadata import (functional_group, uih_vframe_items,
                                       vendor_geometry)
from radnet_jax.dicom.reader import read_dataset
from radnet_jax.dicom.types import Stack, Volume

DUPLICATE_TOL_MM = geometry.DUPLICATE_TOL_MM
GAP_FACTOR = geometry.GAP_FACTOR
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
    if key not in h:
      return None  # geometry elsewhere (vendor tags): pydicom path
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


@dataclasses.dataclass
class _Tilt:
  """In-plane resampling of a gantry-tilted stack onto the orthogonal grid.

  Slice k of the output samples input slice k at rows h0 - drift_h[k] + i and
  columns w0 - drift_w[k] + j (pixels); the output plane (rows, cols) is
  extended by the whole drift so that every slice fits (as dcm2niix's
  ``_Tilt`` output: the first row is where the slice that drifted furthest
  back starts).
  """
  drift_h: np.ndarray
  drift_w: np.ndarray
  h0: float
  w0: float
  rows: int
  cols: int


@dataclasses.dataclass
class _Grid:
  """Where the sorted, deduplicated slices go on the output grid.

  dz: slice spacing (mm); affine: raw (D, H, W) voxel -> LPS (before the
  canonical flips); tilt: in-plane resampling or None; uniform: (lo, hi, w)
  linear interpolation onto a uniform grid or None; info: record keys
  describing the corrections.
  """
  dz: float
  affine: np.ndarray
  tilt: _Tilt | None
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


def _interp_weights(s: np.ndarray, target: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(lo, hi, w): slice target[k] = (1 - w) * slice lo + w * slice hi."""
  count = len(s)
  hi = np.clip(np.searchsorted(s, target, side="right"), 1, count - 1)
  lo = hi - 1
  w = np.clip((target - s[lo]) / (s[hi] - s[lo]), 0.0, 1.0).astype(np.float32)
  return lo, hi, w


def _equidistant(s: np.ndarray, step: float) -> np.ndarray:
  """Target positions of dcm2niix's ``_Eq_`` rule for variable spacing.

  The smallest step, laid from the last slice back (dcm2niix counts from
  the slice that comes first in its NIfTI order, the last in our canonical
  order), covering the whole stack; at most twice the slice count (as
  dcm2niix: then the spacing grows so that the grid spans the stack exactly).
  Returned ascending.
  """
  span = float(s[-1] - s[0])
  k = int(np.floor(span / step + 1e-3)) + 1
  if k > 2 * len(s):
    k = 2 * len(s)
    step = span / (k - 1)
  return s[-1] - step * np.arange(k)[::-1]


def _tilt(pos: np.ndarray, s: np.ndarray, n: np.ndarray, r: np.ndarray,
          c: np.ndarray, dr: float, dc: float, rows: int, cols: int
          ) -> _Tilt | None:
  """The in-plane drift of the slice corners off the stack normal (gantry
  tilt), or None when it stays under TILT_TOL_PX over the whole stack."""
  if len(s) < 2:
    return None
  offsets = (pos - pos[0]) - np.outer(s - s[0], n)
  drift = [offsets @ c / dr, offsets @ r / dc]
  spans = [float(np.ptp(d)) for d in drift]
  if max(spans) <= TILT_TOL_PX:
    return None
  for axis in (0, 1):
    if spans[axis] <= TILT_TOL_PX:
      drift[axis] = np.zeros(len(s))
  extra = [int(math.ceil(float(np.ptp(d)) - 1e-3)) for d in drift]
  # The plane grows by whole pixels; the fraction left over goes before the
  # first row (rows) as in dcm2niix's _Tilt output (it shifts rows in its
  # bottom-up row order), after the last column (columns; dcm2niix does
  # not correct a column drift).
  h0 = float(drift[0].max()) - extra[0]
  w0 = float(drift[1].min())
  return _Tilt(drift[0], drift[1], h0, w0, rows + extra[0], cols + extra[1])


def _grid(s: np.ndarray, pos: np.ndarray, n: np.ndarray, iop: np.ndarray,
          spacing: np.ndarray, size: tuple[int, int], record: dict[str, Any],
          where: str) -> _Grid:
  """Spacing, gaps, tilt and uniformity of sorted, deduplicated slices."""
  info: dict[str, Any] = {}
  r, c = iop[:3], iop[3:]
  dr, dc = spacing
  count = len(s)
  target = None     # positions along n of the output slices, when resampled
  # --- spacing: uniform, missing slices, or variable ----------------------
  if count == 1:
    dz = float(record.get("SpacingBetweenSlices") or
               record.get("SliceThickness") or 1.0)
  else:
    diffs = np.diff(s)
    plan = geometry.classify_spacing(diffs)
    med = plan.step
    if plan.cuts or plan.kind == "gaps":
      big = sorted(plan.cuts + plan.gaps)
      missing = int(np.sum(np.maximum(np.round(diffs[big] / med) - 1, 1)))
      i = int(big[np.argmax(diffs[big])])
      if plan.cuts or missing > max(1, FILL_MAX_FRACTION * (count + missing)):
        raise DicomError(where, f"missing slice(s): gap of {diffs[i]:.3f} mm "
                                f"after slice {i} (median spacing {med:.3f} "
                                f"mm; {missing} slice(s) missing in all)")
      info["MissingSlicesInterpolated"] = missing
    dz = float((s[-1] - s[0]) / (count - 1))
    if plan.kind == "variable":
      # dcm2niix's _Eq_: equidistant at the smallest spacing, linear along n.
      target = _equidistant(s, plan.step)
      info["SliceSpacings"] = list(plan.spacings)
    elif count > 2 and (plan.kind == "gaps" or np.max(
        np.abs(s - (s[0] + dz * np.arange(count)))) > UNIFORM_TOL * dz):
      # Filled gaps / jitter: uniform at the median spacing from slice 0.
      k = int(np.floor((s[-1] - s[0]) / med + 1e-3)) + 1
      target = s[0] + med * np.arange(k)
  # --- gantry tilt: in-plane drift of the positions ---------------------------
  tilt = _tilt(pos, s, n, r, c, dr, dc, *size)
  if tilt is not None:
    along = (pos[-1] - pos[0]) / np.linalg.norm(pos[-1] - pos[0])
    info["GantryTiltCorrected"] = float(
        np.degrees(np.arccos(np.clip(abs(along @ n), 0, 1))))
  uniform = None
  origin = pos[0].astype(float).copy()
  if tilt is not None:
    origin += tilt.h0 * dr * c + tilt.w0 * dc * r
  if target is not None:
    uniform = _interp_weights(s, target)
    dz = float((target[-1] - target[0]) / (len(target) - 1)) if len(target) > 1 else dz
    origin += (target[0] - s[0]) * n
    info["ResampledSliceSpacing"] = True
  affine = np.eye(4)
  affine[:3, 0], affine[:3, 1], affine[:3, 2] = n * dz, c * dr, r * dc
  affine[:3, 3] = origin
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
  grid = _grid(s, positions, n, iops[0], spacings[0], size, stack.record,
               where)
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
