"""Comparison with dcm2niix, the reference DICOM -> NIfTI converter.

``run_dcm2niix(src, out)`` converts a folder (``-z n -b n -p n``: plain NIfTI,
no sidecar, the DICOM standard's rescale so both sides use the same one;
``-f %b_%s``: named after the first DICOM file) and
``reference_volumes(out)`` reads back every 3D volume (each volume of a 4D
file separately). Where dcm2niix writes a corrected companion (``_Tilt``:
gantry tilt, ``_Eq``: equidistant slices, ``_Tilt_Eq``: both) that one is
*the* volume and the uncorrected file is dropped, since the uncorrected grid
misplaces slices.

``compare(voxels, affine, ref)`` puts our ``(D, H, W)`` volume (LPS affine)
onto the reference's axes (a permutation and flips chosen from the direction
vectors) and says whether it is the same volume:

* ``equal``: same grid (shape, spacing, origin to ``GRID_TOL_MM``), voxels
  equal to float32;
* ``interpolated``: same grid, voxels within interpolation error: dcm2niix
  rounds its resampled voxels to int16 (0.5 x scl_slope per resampling;
  ``_Tilt_Eq`` is resampled twice), so at least
  ``INTERP_FRACTION`` of the voxels agree to that, plus ``INTERP_TOL`` of
  the value range for our float interpolation;
* ``fence_post``: dcm2niix's ``_Eq_`` volume has one slice fewer at one end
  (its slice count is ceil((span - half the last step) / step), which
  drops the last slice of a stack whose span is a multiple of the step);
  ours covers the whole stack, the common slices are equal / interpolated;
* ``origin``: same shape, axes and voxels but the origin differs (dcm2niix
  1.0.20220720 misplaces the origin of negative-tilt ``_Tilt`` and of some
  ``_Eq`` outputs; see bench/RESULTS.md);
* otherwise a mismatch with the reason (axes, shape, spacing, voxels).

Only numpy and nibabel; used by ``bench/vs_dcm2niix.py`` and the tests.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import subprocess

import numpy as np

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
GRID_TOL_MM = 0.02
INTERP_FRACTION = 0.99
INTERP_TOL = 1e-4
REPRODUCED = ("equal", "interpolated", "fence_post")
_DERIVED = re.compile(r"_(Tilt_Eq|Tilt|Eq)_\d+$")


@dataclasses.dataclass
class Reference:
  """One 3D volume written by dcm2niix.

  name: file name without extension (plus ``[t]`` for volume t of a 4D
  file); variant: "", "Tilt", "Eq" or "Tilt_Eq"; voxels: float32 (I, J, K)
  after scl_slope / scl_inter; affine: (4, 4) voxel -> LPS mm; slope: the
  scl_slope (1 when unset); colour: an RGB file (not a grey volume).
  """
  name: str
  variant: str
  voxels: np.ndarray
  affine: np.ndarray
  slope: float
  colour: bool = False   # an RGB file (voxels are zeros: not compared)


@dataclasses.dataclass
class Match:
  status: str            # one of REPRODUCED, "origin", or "mismatch"
  detail: str
  max_abs: float = float("nan")

  @property
  def reproduced(self) -> bool:
    return self.status in REPRODUCED


def dcm2niix_path() -> str | None:
  return shutil.which("dcm2niix")


def run_dcm2niix(src: str, out: str, exe: str = "dcm2niix",
                 timeout: float = 600) -> subprocess.CompletedProcess:
  """``dcm2niix -z n -b n -p n -f %b_%s -o out src`` (``out`` is created;
  each NIfTI is named after the first DICOM file it holds, so a volume can
  be traced to its source, and the series number)."""
  os.makedirs(out, exist_ok=True)
  return subprocess.run([exe, "-z", "n", "-b", "n", "-p", "n", "-f", "%b_%s", "-o",
                         out, src],
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


def _supersedes(stem: str, base: str, variant: str) -> bool:
  """Is ``stem`` a more corrected companion of ``base`` + ``variant``?"""
  m = _DERIVED.search(stem)
  return bool(m and stem[:m.start()] == base and
              m.group(1).startswith(variant) and len(m.group(1)) > len(variant))


def reference_volumes(out: str) -> list[Reference]:
  """Every 3D volume in ``out`` (sorted by file name), corrected companions
  replacing the files they correct."""
  import nibabel as nib  # pylint: disable=import-outside-toplevel
  files = sorted(glob.glob(os.path.join(out, "**", "*.nii"), recursive=True))
  stems = {f[:-4] for f in files}
  refs = []
  for f in files:
    stem = f[:-4]
    m = _DERIVED.search(stem)
    variant = m.group(1) if m else ""
    # Superseded by a correction: X by X_Tilt_1 / X_Eq_1, X_Tilt_1 by
    # X_Tilt_Eq_1 (dcm2niix writes Tilt_Eq from the Tilt volume).
    base = stem[:m.start()] if m else stem
    if any(_supersedes(other, base, variant) for other in stems):
      continue
    img = nib.load(f)
    data = np.asarray(img.dataobj)
    if data.dtype.names is not None or data.dtype.kind not in "biuf":
      # RGB: a colour image (screenshot, secondary capture), not a grey volume.
      refs.append(Reference(os.path.basename(stem), variant,
                            np.zeros(img.shape[:3], np.float32),
                            RAS_TO_LPS @ img.affine, 1.0, colour=True))
      continue
    slope, inter = img.header.get_slope_inter()
    slope = 1.0 if slope is None or not np.isfinite(slope) else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    data = data.astype(np.float32) * np.float32(slope) + np.float32(inter)
    affine = RAS_TO_LPS @ img.affine
    if data.ndim == 2:
      data = data[..., None]
    if data.ndim == 3:
      refs.append(Reference(os.path.basename(stem), variant, data, affine, slope))
    else:
      data = data.reshape(data.shape[:3] + (-1,))
      for t in range(data.shape[3]):
        refs.append(Reference(f"{os.path.basename(stem)}[{t}]", variant,
                              data[..., t], affine, slope))
  return refs


def to_axes(voxels: np.ndarray, affine: np.ndarray, ref_affine: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray] | None:
  """(voxels, affine) permuted / flipped onto the axes of ``ref_affine``,
  or None when the direction vectors do not pair up (different planes)."""
  dirs = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
  ref_dirs = ref_affine[:3, :3] / np.linalg.norm(ref_affine[:3, :3], axis=0)
  dots = ref_dirs.T @ dirs          # [ref axis, our axis]
  perm = [int(np.argmax(np.abs(dots[i]))) for i in range(3)]
  if sorted(perm) != [0, 1, 2] or min(abs(dots[i, perm[i]]) for i in range(3)) < 0.999:
    return None
  voxels = np.transpose(voxels, perm)
  affine = affine.copy()
  affine[:3, :3] = affine[:3, perm]
  for i in range(3):
    if dots[i, perm[i]] < 0:
      voxels = np.flip(voxels, axis=i)
      affine[:3, 3] += (voxels.shape[i] - 1) * affine[:3, i]
      affine[:3, i] = -affine[:3, i]
  return voxels, affine


def _voxels(ours: np.ndarray, ref: Reference, values: np.ndarray) -> Match:
  diff = np.abs(ours.astype(np.float64) - values.astype(np.float64))
  max_abs = float(diff.max()) if diff.size else 0.0
  if np.array_equal(ours.astype(np.float32), values.astype(np.float32)):
    return Match("equal", "voxels equal", max_abs)
  span = float(np.ptp(values)) if values.size else 0.0
  # dcm2niix rounds to int16 after each resampling (Tilt_Eq: twice).
  rounds = max(1, len(ref.variant.split("_"))) if ref.variant else 1
  tol = 0.5 * rounds * abs(ref.slope) + INTERP_TOL * span + 1e-4
  frac = float(np.mean(diff <= tol))
  if frac >= INTERP_FRACTION:
    return Match("interpolated", f"{100 * frac:.2f}% of voxels within "
                                 f"{tol:.3g} (interpolation)", max_abs)
  return Match("mismatch", f"voxels differ: {100 * frac:.1f}% within {tol:.3g}, "
                           f"max |diff| {max_abs:.4g}", max_abs)


def compare(voxels: np.ndarray, affine: np.ndarray, ref: Reference) -> Match:
  """Is our volume (``voxels`` (D, H, W), LPS ``affine``) dcm2niix's ``ref``?"""
  placed = to_axes(np.asarray(voxels), np.asarray(affine, float), ref.affine)
  if placed is None:
    return Match("mismatch", "different axes (plane or obliquity)")
  ours, aff = placed
  ref_sp = np.linalg.norm(ref.affine[:3, :3], axis=0)
  our_sp = np.linalg.norm(aff[:3, :3], axis=0)
  if not np.allclose(ref_sp, our_sp, atol=1e-3, rtol=1e-4):
    return Match("mismatch", f"spacing {np.round(our_sp, 4).tolist()} vs "
                             f"{np.round(ref_sp, 4).tolist()}")
  # Offset of the reference's first voxel in our voxel indices.
  shift = np.linalg.solve(aff[:3, :3], ref.affine[:3, 3] - aff[:3, 3])
  whole = np.round(shift)
  off_grid = np.abs(shift - whole) * our_sp
  rshape, oshape = np.array(ref.voxels.shape), np.array(ours.shape)
  if ours.shape == ref.voxels.shape and np.all(whole == 0) and np.all(
      off_grid <= GRID_TOL_MM):
    return _voxels(ours, ref, ref.voxels)
  if np.all(off_grid <= GRID_TOL_MM) and ref.variant.endswith("Eq"):
    lo = whole.astype(int)
    hi = lo + rshape
    extra = oshape - rshape
    axes = np.flatnonzero(extra)
    if (np.all(lo >= 0) and np.all(hi <= oshape) and len(axes) == 1 and
        extra[axes[0]] <= max(2, rshape[axes[0]] // 4)):
      m = _voxels(ours[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], ref, ref.voxels)
      if m.status != "mismatch":
        return Match("fence_post", f"dcm2niix's _Eq_ stops {int(extra[axes[0]])} "
                                   f"slice(s) short of the stack's end; "
                                   f"{m.detail}", m.max_abs)
      return m
  if ours.shape == ref.voxels.shape:
    m = _voxels(ours, ref, ref.voxels)
    if m.status != "mismatch":
      d = (ref.affine[:3, 3] - aff[:3, 3])
      return Match("origin", f"same grid shape and voxels, origin differs by "
                             f"{np.round(d, 3).tolist()} mm (LPS)", m.max_abs)
  return Match("mismatch", f"grid differs: shape {list(ours.shape)} vs "
                           f"{list(ref.voxels.shape)}, first voxel at our index "
                           f"{np.round(shift, 2).tolist()}")
