"""Where a stack's sorted slices go: ordering, spacing, gaps, tilt, affine.

Shared by ``volume.load_volume`` (which then moves the voxels) and
``stream.load_resampled`` (which declines whatever needs them moved), so both
check the geometry the same way:

* ``_order``: one orientation and pixel spacing; slices sorted by position
  along the canonical stack direction (never by InstanceNumber);
* ``_duplicates``: slices that repeat the previous position (within
  ``DUPLICATE_TOL_MM``);
* ``_grid``: the slice spacing from positions (never SliceThickness), its
  classification (``geometry.classify_spacing``): missing slices filled at the
  median spacing (at most ``FILL_MAX_FRACTION``), variable spacing laid on
  dcm2niix's ``_Eq_`` grid (``_equidistant``), jitter over ``UNIFORM_TOL``
  made uniform (``_interp_weights``); gantry tilt as the in-plane drift of the
  slices (``_tilt``, over ``TILT_TOL_PX``) for dcm2niix's ``_Tilt`` grid; the
  raw affine and the record keys of the corrections (``_Grid``);
* ``_finish_record``: the assembled geometry written into the record.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from radnet_jax.dicom import geometry
from radnet_jax.dicom.errors import DicomError


DUPLICATE_TOL_MM = geometry.DUPLICATE_TOL_MM
GAP_FACTOR = geometry.GAP_FACTOR
FILL_MAX_FRACTION = 0.1     # more than one filled slice: at most this fraction
UNIFORM_TOL = 1e-2          # relative to the spacing
TILT_TOL_PX = 0.05          # in-plane drift over the whole stack, in pixels


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
