"""Slice geometry shared by ``scan`` (headers) and ``load_volume`` (voxels).

DICOM conventions used throughout (all in LPS mm):
  * ``ImageOrientationPatient`` = (r, c): r is the direction in which the
    column index grows (along a row), c the direction in which the row index
    grows (down a column).
  * ``PixelSpacing`` = (spacing between rows, spacing between columns), i.e.
    the step along c, then the step along r.
  * The raw voxel grid of a stack is ``(D, H, W)`` = (slice, row, column) with
    columns of the affine ``(n * dz, c * dr, r * dc)`` where n = r x c.

Canonical orientation (docs/architecture.md): D stays the slice axis; only
flips and an in-plane transpose are applied so that, by plane:

  ===== ======== ======== ========
  plane  D        H        W
  ===== ======== ======== ========
  AX     -Z       +Y       +X
  COR    +Y       -Z       +X
  SAG    +X       -Z       +Y
  ===== ======== ======== ========
"""
from __future__ import annotations

import dataclasses

import numpy as np

# Gaps in a stack, in multiples of its slice spacing: from GAP_FACTOR up to
# GAP_FILL_FACTOR wide (one missing slice) load_volume fills them; scan cuts a
# stack at wider ones.
GAP_FACTOR = 1.5
GAP_FILL_FACTOR = 2.5
# Two slice steps are the same spacing when they differ by at most this much
# (mm, or this fraction of the smaller step): positions are written as decimal
# strings, often rounded to 0.01-0.1 mm.
SPACING_ATOL_MM = 0.05
SPACING_RTOL = 0.05
DUPLICATE_TOL_MM = 1e-2
# dcm2niix calls a stack's spacing variable (and writes _Eq_) when a step
# differs from another by more than this (mm).
DCM2NIIX_VARY_MM = 0.2
PLANES = ("SAG", "COR", "AX")  # indexed by the dominant LPS axis of the normal
_X, _Y, _Z = np.eye(3)
# Target direction of (D, H, W) for each plane.
CANONICAL = {
    "AX": (-_Z, _Y, _X),
    "COR": (_Y, -_Z, _X),
    "SAG": (_X, -_Z, _Y),
}


def plane_of(normal: np.ndarray) -> str:
  """'AX' | 'COR' | 'SAG' from the largest component of the slice normal."""
  return PLANES[int(np.argmax(np.abs(np.asarray(normal, float))))]


def slice_normal(iop: np.ndarray) -> np.ndarray:
  """Unit normal r x c of an ImageOrientationPatient (6,)."""
  iop = np.asarray(iop, float)
  n = np.cross(iop[:3], iop[3:])
  norm = np.linalg.norm(n)
  if norm < 1e-6:
    raise ValueError(f"degenerate ImageOrientationPatient {iop.tolist()}")
  return n / norm


def stack_direction(iop: np.ndarray) -> np.ndarray:
  """The slice normal oriented along the canonical D direction of its plane.

  Sorting slices by position along this vector gives the canonical slice
  order directly (AX: superior first, COR: anterior first, SAG: right first),
  so assembly never has to flip (copy) the slice axis.
  """
  n = slice_normal(iop)
  return n if n @ CANONICAL[plane_of(n)][0] >= 0 else -n


def canonical_transform(axes: np.ndarray, plane: str) -> tuple[bool, tuple[bool, bool, bool]]:
  """How to bring a (D, H, W) grid to the canonical orientation.

  Args:
    axes: (3, 3) direction vectors (rows) of the D, H, W axes, LPS.
    plane: acquisition plane ('AX', 'COR', 'SAG').

  Returns:
    (transpose, flips): transpose H and W first, then flip the (D, H, W) axes
    whose flag is set.
  """
  axes = np.asarray(axes, float)
  t_d, t_h, t_w = CANONICAL[plane]
  keep = abs(axes[1] @ t_h) + abs(axes[2] @ t_w)
  swap = abs(axes[1] @ t_w) + abs(axes[2] @ t_h)
  transpose = bool(swap > keep + 1e-9)
  a_h, a_w = (axes[2], axes[1]) if transpose else (axes[1], axes[2])
  flips = (bool(axes[0] @ t_d < 0), bool(a_h @ t_h < 0), bool(a_w @ t_w < 0))
  return transpose, flips


def _canonical_affine(affine: np.ndarray, shape: tuple[int, int, int],
                      plane: str) -> tuple[bool, tuple[bool, bool, bool], np.ndarray]:
  """(transpose, flips, affine of the canonical grid) for a raw grid."""
  affine = np.array(affine, float)
  axes = affine[:3, :3].T / np.linalg.norm(affine[:3, :3], axis=0)[:, None]
  transpose, flips = canonical_transform(axes, plane)
  shape = list(shape)
  if transpose:
    affine[:, [1, 2]] = affine[:, [2, 1]]
    shape[1], shape[2] = shape[2], shape[1]
  for axis, flip in enumerate(flips):
    if flip:
      affine[:3, 3] += (shape[axis] - 1) * affine[:3, axis]
      affine[:3, axis] = -affine[:3, axis]
  return transpose, flips, affine


def reorient(voxels: np.ndarray, affine: np.ndarray, plane: str
             ) -> tuple[np.ndarray, np.ndarray]:
  """Applies ``canonical_transform`` to voxels (D, H, W) and their affine.

  Returns views where possible (flips are views; a transpose is a view too),
  made contiguous by the caller if needed.
  """
  transpose, flips, affine = _canonical_affine(affine, voxels.shape, plane)
  if transpose:
    voxels = voxels.transpose(0, 2, 1)
  for axis, flip in enumerate(flips):
    if flip:
      voxels = np.flip(voxels, axis=axis)
  return voxels, affine


def reorient_in_place(voxels: np.ndarray, affine: np.ndarray, plane: str
                      ) -> tuple[np.ndarray, np.ndarray]:
  """``reorient`` + ``np.ascontiguousarray`` without a second volume.

  ``voxels`` (D, H, W) must be C-contiguous and writable; its buffer is
  rewritten slice by slice (in-plane flips and transpose through one slice of
  scratch, the D flip by swapping slices), so the peak memory is the volume
  plus one slice. Returns (voxels (D, H', W') sharing that buffer, affine);
  the values equal ``np.ascontiguousarray(reorient(voxels, affine, plane)[0])``.
  """
  if not (voxels.flags.c_contiguous and voxels.flags.writeable):
    raise ValueError("reorient_in_place needs a C-contiguous writable array")
  transpose, flips, affine = _canonical_affine(affine, voxels.shape, plane)
  d, h, w = voxels.shape
  out = voxels
  if transpose or flips[1] or flips[2]:
    flat = voxels.reshape(d, h * w)
    oh, ow = (w, h) if transpose else (h, w)
    tmp = np.empty((oh, ow), voxels.dtype)
    for k in range(d):
      view = voxels[k].T if transpose else voxels[k]
      if flips[1]:
        view = view[::-1]
      if flips[2]:
        view = view[:, ::-1]
      tmp[...] = view
      flat[k] = tmp.reshape(-1)
    out = flat.reshape(d, oh, ow)
  if flips[0]:
    tmp = np.empty(out.shape[1:], out.dtype)
    for k in range(d // 2):
      tmp[...] = out[k]
      out[k] = out[d - 1 - k]
      out[d - 1 - k] = tmp
  return out, affine


def extent_si(affine: np.ndarray, shape: tuple[int, int, int]) -> float:
  """Extent (mm) of the voxel box along the patient superior-inferior axis."""
  affine = np.asarray(affine, float)
  return float(sum(abs(affine[2, k]) * shape[k] for k in range(3)))


def extent_mm(spacing: np.ndarray, shape: tuple[int, int, int]) -> list[float]:
  """[D, H, W] field of view in mm (voxel count x voxel size)."""
  return [float(s * n) for s, n in zip(spacing, shape)]


# ---------------------------------------------------------------------------
# Slice spacing: uniform, missing slices, or variable (several spacings).
# ---------------------------------------------------------------------------


def same_spacing(a: float, b: float) -> bool:
  """True when two slice steps (mm) are the same spacing up to rounding."""
  return abs(a - b) <= max(SPACING_ATOL_MM, SPACING_RTOL * min(a, b))


@dataclasses.dataclass(frozen=True)
class SliceSpacing:
  """How the slice positions of a stack are spaced (``classify_spacing``).

  kind: ``"uniform"`` (one spacing, maybe with rounding jitter), ``"gaps"``
    (one spacing with missing slices: isolated steps of >= ``GAP_FACTOR``
    times the spacing on both sides), or ``"variable"`` (two or more spacings
    that each hold for several consecutive slices, e.g. a head CT at 2.5 mm
    through the posterior fossa and 5 mm above; or steps that differ by more
    than ``DCM2NIIX_VARY_MM`` without being gaps, which dcm2niix also
    resamples).
  step: mm; the regular spacing (median of the steps) for uniform / gaps,
    the smallest step for variable (dcm2niix's ``_Eq_`` spacing).
  spacings: the distinct spacings of the runs of equal steps (mm, ascending;
    gaps and cuts excluded).
  gaps: indices i of the steps (slice i to i + 1) that are missing slices.
  cuts: indices i of the steps wider than ``GAP_FILL_FACTOR`` times the
    spacing next to them (missing files, separate slabs): ``scan`` cuts the
    stack there.
  """
  kind: str
  step: float
  spacings: tuple[float, ...]
  gaps: tuple[int, ...]
  cuts: tuple[int, ...]


def _runs(steps: np.ndarray) -> list[tuple[int, int, float]]:
  """Maximal runs [start, stop) of consecutive equal steps, with the median."""
  runs: list[tuple[int, int, float]] = []
  start = 0
  for i in range(1, len(steps) + 1):
    if i == len(steps) or not same_spacing(steps[i], steps[start]):
      runs.append((start, i, float(np.median(steps[start:i]))))
      start = i
  return runs


def classify_spacing(diffs: np.ndarray) -> SliceSpacing:
  """Classifies the steps between position-sorted slices (mm, (N - 1,)).

  The steps are grouped into runs of equal spacing. A run of one step is a
  *gap* (missing slices) when it is at least ``GAP_FACTOR`` times the spacing
  of the run(s) next to it and those runs agree (an otherwise regular stack,
  or the end of one), and a *cut* when it is wider than ``GAP_FILL_FACTOR``
  times the wider neighbour; any other single step is a transition between
  spacings. The stack is *variable* when two different spacings each hold
  for at least two consecutive steps, or when the steps left (gaps and cuts
  aside) differ by more than ``DCM2NIIX_VARY_MM`` (dcm2niix's threshold); a
  smaller deviation is jitter (``uniform``). Steps below ``DUPLICATE_TOL_MM`` (repeated positions)
  are ignored; indices refer to ``diffs``.
  """
  diffs = np.asarray(diffs, float)
  keep = np.flatnonzero(diffs >= DUPLICATE_TOL_MM)
  steps = diffs[keep]
  if not len(steps):
    return SliceSpacing("uniform", 0.0, (), (), ())
  runs = _runs(steps)
  gaps, cuts = [], []
  for j, (a, b, value) in enumerate(runs):
    near = [runs[k][2] for k in (j - 1, j + 1) if 0 <= k < len(runs)]
    if b - a != 1 or not near:
      continue
    if value > GAP_FILL_FACTOR * max(near):
      cuts.append(a)
    elif value > GAP_FACTOR * max(near) and (
        len(near) == 1 or same_spacing(near[0], near[1])):
      gaps.append(a)
  odd = set(gaps) | set(cuts)
  regular = [(a, b, v) for a, b, v in runs if a not in odd]
  distinct: list[float] = []
  for _, _, v in sorted(regular, key=lambda r: r[2]):
    if not distinct or not same_spacing(v, distinct[-1]):
      distinct.append(v)
  long_spacings = []
  for a, b, v in regular:
    if b - a >= 2 and not any(same_spacing(v, u) for u in long_spacings):
      long_spacings.append(v)
  rest = np.delete(steps, sorted(odd))
  # dcm2niix resamples (_Eq_) whenever a step differs from the first by more
  # than DCM2NIIX_VARY_MM; odd steps that are neither gaps nor a second
  # spacing (e.g. 5 mm slices with one 1.1 mm and one 7 mm step) go the same way.
  uneven = len(rest) > 1 and float(np.ptp(rest)) > DCM2NIIX_VARY_MM
  if len(long_spacings) >= 2 or uneven:
    kind, step = "variable", float(np.min(np.delete(steps, cuts)))
  else:
    kind = "gaps" if gaps else "uniform"
    step = float(np.median(rest if len(rest) else steps))
  return SliceSpacing(kind, step, tuple(round(v, 3) for v in distinct),
                      tuple(int(keep[i]) for i in gaps),
                      tuple(int(keep[i]) for i in cuts))
