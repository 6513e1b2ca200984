"""Pixel decoding shared by ``volume.load_volume`` and ``stream.load_resampled``.

One file (or one frame of it) at a time: plain native little-endian slices
with ``fastread`` (header tags by ``struct``, pixel bytes read straight into
one reused buffer: ``_native_layout``, ``_read_native``, ``_fast_slice``), or
already parsed by pydicom without its generic pixel pipeline
(``_native_pixels``); everything else with pydicom's pixel backends
(native, pylibjpeg, gdcm; so JPEG baseline/lossless, JPEG-LS, JPEG 2000 and
RLE all work; ``_pixels``, run under ``isolation``). ``_rescale`` reads and
checks RescaleSlope/Intercept, ``_rescale_into`` applies them into a float32
slice in one pass, ``_vec`` checks a geometry tag's values.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pydicom is imported only where a file needs it (slow import)
  from pydicom.dataset import Dataset

from radnet_jax.dicom import fastread, isolation
from radnet_jax.dicom.errors import DicomError


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
  return _stored_bits(arr, bits, stored, signed)


def _stored_bits(arr: np.ndarray, bits: int, stored: int, signed: bool) -> np.ndarray:
  """As pydicom: the unused high bits masked (unsigned) or sign-extended."""
  if stored >= bits:
    return arr
  if signed:
    shift = bits - stored
    return (arr << shift) >> shift
  return arr & arr.dtype.type((1 << stored) - 1)


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
  return _stored_bits(buf, bits, stored, signed)


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
