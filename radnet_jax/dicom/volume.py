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
4. missing slices: a gap > 1.5x the median spacing -> ``DicomError``;
5. gantry tilt (slices shifted in-plane from one to the next, i.e. the stack
   direction is not the slice normal): **resampled** onto the orthogonal grid
   like dcm2niix does: each slice is shifted in-plane (linear interpolation,
   outside filled with the volume minimum) so that the D axis becomes n;
   ``record["GantryTiltCorrected"]`` gives the angle in degrees;
6. non-uniform spacing (some slice deviates from the uniform grid by more than
   1% of the spacing, but no gap > 1.5x): **resampled** along D onto a uniform
   grid at the median spacing (linear interpolation);
   ``record["ResampledSliceSpacing"] = True``;
7. Siemens mosaics are unpacked (NumberOfImagesInMosaic, CSA slice normal);
8. reorients to the canonical orientation (flips and an in-plane transpose
   only; see ``geometry``).

Only one volume is held in memory: slices are decoded straight into one
preallocated float32 array (rescaled in the same pass), in the stack's order,
and the canonical flips / transpose rewrite that array in place, so the peak
is one volume plus a slice for classic series.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from radnet_jax.dicom import fastread, geometry
from radnet_jax.dicom.errors import DicomError
from radnet_jax.dicom.metadata import functional_group
from radnet_jax.dicom.reader import read_dataset
from radnet_jax.dicom.types import Stack, Volume

DUPLICATE_TOL_MM = 1e-2
GAP_FACTOR = 1.5
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
  try:
    arr = ds.pixel_array
  except Exception as e:  # decoder missing, corrupt stream, truncated data
    raise DicomError(where, f"cannot decode pixel data "
                            f"({type(e).__name__}: {e})") from e
  if int(ds.get("SamplesPerPixel", 1)) != 1:
    raise DicomError(where, "colour image (SamplesPerPixel != 1) is not a "
                            "grey-level cross-sectional image")
  return arr


def _rescale(item: Dataset | None) -> tuple[float, float]:
  if item is None:
    return 1.0, 0.0
  slope = item.get("RescaleSlope", None)
  inter = item.get("RescaleIntercept", None)
  try:
    slope = float(slope) if slope not in (None, "") else 1.0
    inter = float(inter) if inter not in (None, "") else 0.0
  except (TypeError, ValueError):
    return 1.0, 0.0
  if not math.isfinite(slope) or slope == 0:
    slope = 1.0
  return slope, (inter if math.isfinite(inter) else 0.0)


def _vec(value: Any, n: int, where: str, what: str) -> np.ndarray:
  try:
    arr = np.asarray([float(v) for v in value], float)
  except (TypeError, ValueError) as e:
    raise DicomError(where, f"invalid {what}") from e
  if arr.shape != (n,):
    raise DicomError(where, f"invalid {what} ({len(arr)} values)")
  return arr


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
    out = self.voxels[i]
    # One pass from the stored integers: cast to float32, then the float32
    # multiply / add (the same float32 operations as cast, *=, +=).
    if slope != 1.0:
      np.multiply(pixels, np.float32(slope), out=out, dtype=np.float32)
      if inter != 0.0:
        out += np.float32(inter)
    elif inter != 0.0:
      np.add(pixels, np.float32(inter), out=out, dtype=np.float32)
    else:
      out[...] = pixels
    self.positions[i] = _vec(ipp, 3, where, "ImagePositionPatient")
    self.iops[i] = _vec(iop, 6, where, "ImageOrientationPatient")
    self.spacings[i] = _vec(spacing, 2, where, "PixelSpacing")
    self.count += 1


def _fast_slice(path: str, staging: dict) -> tuple | None:
  """Native little-endian classic slice via ``fastread``: (stored pixels
  (H, W), header) read straight from the file, or None (use pydicom).

  ``staging`` caches one reusable buffer per (shape, dtype), so a stack's
  pixels are read without a per-file allocation.
  """
  try:
    h = fastread.read_header(path)
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
    _rescale(h)
  except (fastread.Unsupported, AttributeError, TypeError, ValueError,
          OSError):
    return None
  if bits not in (8, 16, 32) or stored > bits or stored <= 0:
    return None
  dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
  if h.pixel_length < rows * cols * dtype.itemsize:
    return None  # truncated: let the general path report it
  buf = staging.get((rows, cols, dtype.str))
  if buf is None:
    buf = staging[(rows, cols, dtype.str)] = np.empty((rows, cols), dtype)
  try:
    with open(path, "rb", buffering=0) as f:
      f.seek(h.pixel_value_offset)
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
  return arr, h


def _read_classic(stack: Stack) -> _Slices:
  slices = None
  staging: dict = {}
  for path in stack.files:
    fast = _fast_slice(path, staging)
    if fast is not None:
      arr, h = fast
      if slices is None:
        slices = _Slices(len(stack.files), arr.shape[0], arr.shape[1])
      slope, inter = _rescale(h)
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
    slope, inter = _rescale(ds)
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
      slope, inter = _rescale(pvt if pvt is not None else ds)
      # Straight into the stack's frame order (no reordering copy).
      slices.add(arr[fr], pos.get("ImagePositionPatient"),
                 ori.get("ImageOrientationPatient"), meas.get("PixelSpacing"),
                 slope, inter, where, index=slot)
    del arr, ds
  return slices


def _read_mosaic(stack: Stack) -> _Slices:
  path = stack.files[0]
  ds = read_dataset(path, stop_before_pixels=False)
  n = int(stack.record.get("NumberOfImagesInMosaic", 0))
  if n <= 0:
    raise DicomError(path, "mosaic without NumberOfImagesInMosaic")
  arr = _pixels(ds, path)
  grid = int(math.ceil(math.sqrt(n)))
  rows, cols = arr.shape[0] // grid, arr.shape[1] // grid
  if rows * grid != arr.shape[0] or cols * grid != arr.shape[1]:
    raise DicomError(path, f"mosaic {arr.shape} does not divide into "
                           f"{grid}x{grid} tiles")
  tiles = arr.reshape(grid, rows, grid, cols).transpose(0, 2, 1, 3)
  tiles = tiles.reshape(grid * grid, rows, cols)[:n]
  iop = _vec(ds.ImageOrientationPatient, 6, path, "ImageOrientationPatient")
  ipp = _vec(ds.ImagePositionPatient, 3, path, "ImagePositionPatient")
  spacing = _vec(ds.PixelSpacing, 2, path, "PixelSpacing")
  r, c = iop[:3], iop[3:]
  # Siemens puts the mosaic's position at the corner of the whole mosaic;
  # move it to the corner of the first tile (as nibabel and dcm2niix do).
  ipp = ipp + c * spacing[0] * (arr.shape[0] - rows) / 2 \
      + r * spacing[1] * (arr.shape[1] - cols) / 2
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
  slope, inter = _rescale(ds)
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


def _assemble(sl: _Slices, where: str, record: dict[str, Any]
              ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """Sorted, deduplicated, tilt-corrected, uniform (D, H, W) + raw affine."""
  info: dict[str, Any] = {}
  iop = sl.iops[0]
  if np.max(np.abs(sl.iops - iop)) > 1e-3:
    raise DicomError(where, "slices have different orientations")
  if np.max(np.abs(sl.spacings - sl.spacings[0])) > 1e-3:
    raise DicomError(where, "slices have different pixel spacings")
  dr, dc = sl.spacings[0]
  if dr <= 0 or dc <= 0:
    raise DicomError(where, f"invalid PixelSpacing {sl.spacings[0].tolist()}")
  r, c = iop[:3], iop[3:]
  n = geometry.stack_direction(iop)
  s = sl.positions @ n
  order = np.argsort(s, kind="stable")
  if np.array_equal(order, np.arange(len(s))):
    # scan already sorted the files: no copy of the voxels.
    vox, pos = sl.voxels, sl.positions
  else:
    vox, pos, s = sl.voxels[order], sl.positions[order], s[order]
  # --- duplicates ---------------------------------------------------------
  if len(s) > 1:
    dup = np.flatnonzero(np.diff(s) < DUPLICATE_TOL_MM) + 1
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
  count = len(s)
  # --- spacing and gaps ---------------------------------------------------
  if count == 1:
    dz = float(record.get("SpacingBetweenSlices") or
               record.get("SliceThickness") or 1.0)
  else:
    diffs = np.diff(s)
    med = float(np.median(diffs))
    big = np.flatnonzero(diffs > GAP_FACTOR * med)
    if len(big):
      i = int(big[0])
      raise DicomError(where, f"missing slice(s): gap of {diffs[i]:.3f} mm "
                              f"after slice {i} (median spacing {med:.3f} mm)")
    dz = float((s[-1] - s[0]) / (count - 1))
  # --- gantry tilt: in-plane drift of the positions ---------------------------
  offsets = (pos - pos[0]) - np.outer(s - s[0], n)
  drift_h, drift_w = offsets @ c / dr, offsets @ r / dc
  if count > 1 and max(np.max(np.abs(drift_h)), np.max(np.abs(drift_w))) > TILT_TOL_PX:
    fill = float(vox.min())
    vox = np.ascontiguousarray(vox)
    for i in range(1, count):
      vox[i] = _shift_rows_cols(vox[i], drift_h[i], drift_w[i], fill)
    along = (pos[-1] - pos[0]) / np.linalg.norm(pos[-1] - pos[0])
    info["GantryTiltCorrected"] = float(
        np.degrees(np.arccos(np.clip(abs(along @ n), 0, 1))))
  # --- non-uniform spacing -> resample along D ------------------------------
  if count > 2:
    resid = np.abs(s - (s[0] + dz * np.arange(count)))
    if np.max(resid) > UNIFORM_TOL * dz:
      dz = float(np.median(np.diff(s)))
      k = int(np.floor((s[-1] - s[0]) / dz + 1e-3)) + 1
      target = s[0] + dz * np.arange(k)
      hi = np.clip(np.searchsorted(s, target, side="right"), 1, count - 1)
      lo = hi - 1
      w = ((target - s[lo]) / (s[hi] - s[lo])).astype(np.float32)
      vox = (vox[lo] * (1 - w)[:, None, None] + vox[hi] * w[:, None, None])
      info["ResampledSliceSpacing"] = True
  affine = np.eye(4)
  affine[:3, 0], affine[:3, 1], affine[:3, 2] = n * dz, c * dr, r * dc
  affine[:3, 3] = pos[0]
  return vox, affine, info


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
  except DicomError:
    raise
  except MemoryError as e:
    raise DicomError(where, "out of memory while reading the stack") from e
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
  spacing = np.linalg.norm(affine[:3, :3], axis=0)
  record.update(info)
  record["NumberOfSlices"] = int(vox.shape[0])
  record["SliceSpacing"] = float(spacing[0])
  record["ExtentMM"] = geometry.extent_mm(spacing, vox.shape)
  record["ExtentSI"] = geometry.extent_si(affine, vox.shape)
  record["StackKey"] = stack.key
  return Volume(voxels=vox, affine=affine, spacing=spacing, record=record)
