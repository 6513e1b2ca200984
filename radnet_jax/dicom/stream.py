"""Streaming conversion: decode a classic stack straight onto the shard grid.

``load_resampled(stack, shape)`` is the converter's path for classic stacks:
the same checks and geometry as ``volume.load_volume`` (``stackgrid``), but
each slice (decoded by ``pixels``) goes straight into a
``resample.SliceStream`` (only a window of a few slices and the small output
are held), with a result (``ResampledStack``) equal bit for bit to
``load_volume`` then ``resample.resize``; it declines (None) whatever needs
the whole volume (duplicates, tilt, non-uniform spacing) or is not a classic
stack.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from radnet_jax.dicom import fastread, geometry, isolation
from radnet_jax.dicom.pixels import (_native_layout, _pixels, _read_native, _rescale,
                                     _rescale_into, _vec)
from radnet_jax.dicom.reader import read_dataset
from radnet_jax.dicom.stackgrid import _duplicates, _finish_record, _grid, _order
from radnet_jax.dicom.types import Stack


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
