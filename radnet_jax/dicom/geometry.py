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

import numpy as np

# Gaps in a stack, in multiples of its median slice spacing: up to this wide
# (one missing slice) load_volume fills them; scan cuts a stack at wider ones.
GAP_FILL_FACTOR = 2.5
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
