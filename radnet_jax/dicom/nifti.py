"""All NIfTI reading and writing, and the axial canonical layout of the segmentation path.

``read_nifti`` is the one reader of NIfTI files. ``load_nifti_volume`` gives
a ``dicom.Volume`` in the canonical orientation of the DICOM series (the
pretraining inputs, ``dicom.geometry.reorient``); ``load_nifti_canonical`` the
axial canonical layout below (segmentation).

Every segmentation input (a LiTS NIfTI, a DICOM CT stack) is reoriented to one
canonical voxel order, axial ``(D, H, W)`` with D towards inferior, H towards
posterior and W towards the patient's left, and carries a ``geometry`` dict that maps a prediction back to the
file's own grid (``to_original_grid``, ``save_nifti``). Coordinates: the
affines returned here map voxel indices to DICOM LPS mm; NIfTI files are RAS.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np

from radnet_jax.dicom import geometry as dicom_geometry
from radnet_jax.dicom.types import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Axial canonical: D -> inferior, H -> posterior, W -> left (nibabel codes name
# the direction each array axis grows towards, in RAS labels).
_CANONICAL = nib.orientations.axcodes2ornt(("I", "P", "L"))


def is_nifti(path: str) -> bool:
  """Whether ``path`` names a NIfTI file (by its suffix)."""
  return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: str) -> tuple[np.ndarray, np.ndarray]:
  """A 3D NIfTI (or 4D with one frame) -> (float32 voxels in file order,
  ``(4, 4)`` voxel index -> RAS mm affine); ValueError naming the file."""
  try:
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
  except Exception as e:  # nibabel raises many types for corrupt files
    raise ValueError(f"{path}: cannot read NIfTI ({type(e).__name__}: {e})") from e
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim != 3 or min(data.shape) < 1:
    raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
  return data, np.asarray(img.affine, np.float64)


def slice_axis(spacing, rtol: float = 5e-3) -> int:
  """The array axis of a NIfTI volume that its slices were stacked along.

  DICOM pixels are square (one PixelSpacing for rows and columns), so the two
  in-plane axes share a spacing and the slice axis is the odd one out,
  whichever axis a converter put it on (dcm2niix keeps 2D series' slices
  along ``k`` but reorients 3D acquisitions: a sagittal MPRAGE comes out with
  its partitions along ``i``) and whether the slices are thicker or thinner
  than the pixels (thin-slice CT, 2 mm DTI on a 96 matrix). Isotropic voxels
  give ``k``. Spacings that all differ (non-square pixels, resampled data)
  give the axis of the largest spacing, ``k`` on a tie.

  Args:
    spacing: ``(3,)`` voxel sizes along ``i, j, k`` (mm).
    rtol: relative tolerance for two spacings to count as one.
  """
  sp = np.asarray(spacing, np.float64)
  same = lambda a, b: abs(sp[a] - sp[b]) <= rtol * max(sp[a], sp[b])
  odd = [c for a, b, c in ((0, 1, 2), (0, 2, 1), (1, 2, 0)) if same(a, b) and not same(a, c)]
  if len(odd) == 1:
    return odd[0]
  largest = int(np.argmax(sp))
  return 2 if same(2, largest) else largest


def load_nifti_volume(path: str, modality: str | None = None) -> Volume:
  """A NIfTI file -> ``dicom.Volume`` in the canonical orientation of DICOM series.

  The slice axis becomes D: the axis whose spacing differs from the two
  in-plane ones (``slice_axis``; DICOM pixels are square, and dcm2niix writes
  3D sagittal series with their slices along ``i``), the last axis ``k``
  when the voxels are isotropic; the acquisition plane is the one the
  slice normal points along, and the volume is flipped/transposed to that
  plane's canonical orientation (``dicom.geometry.reorient``), as DICOM
  series are. RAS world coordinates are converted to LPS.

  Args:
    path: ``.nii`` or ``.nii.gz`` with a 3D volume (or 4D with one frame).
    modality: "CT" (values are HU) or "MR"/"PT"/...; None guesses CT when the
      1st percentile is below -500 (air in HU), else MR. It selects the
      intensity normalisation, so pass it when known.
  Returns:
    Volume: voxels float32 ``(D, H, W)``, affine ``(4, 4)`` LPS, spacing
    ``(3,)`` mm, record {"Modality", "ModalitySource"}.
  """
  data, affine_ras = read_nifti(path)
  aff = RAS_TO_LPS @ affine_ras
  if not np.isfinite(aff).all() or abs(np.linalg.det(aff[:3, :3])) < 1e-9:
    raise ValueError(f"{path}: degenerate or non-finite affine")
  axis = slice_axis(np.linalg.norm(aff[:3, :3], axis=0))
  order = [axis] + [a for a in (2, 1, 0) if a != axis]   # (slice, in-plane, in-plane)
  vox = np.transpose(data, order)   # e.g. (i, j, k) -> (k, j, i) = (D, H, W)
  aff = aff[:, order + [3]]
  plane = dicom_geometry.plane_of(aff[:3, 0])
  vox, aff = dicom_geometry.reorient(vox, aff, plane)
  vox = np.ascontiguousarray(vox, np.float32)
  spacing = np.linalg.norm(aff[:3, :3], axis=0)
  source = "given"
  if modality is None:
    finite = vox[np.isfinite(vox)]
    modality = "CT" if finite.size and np.percentile(finite, 1) < -500 else "MR"
    source = "guessed from intensities"
  return Volume(vox, aff, spacing, {"Modality": str(modality).upper(),
                                    "ModalitySource": source})


def load_nifti_canonical(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
  """Reads a 3D NIfTI and reorients it to the axial canonical layout.

  Returns:
    voxels: float32 ``(D, H, W)`` in the file's units (HU for LiTS CT, after
      the NIfTI scale/offset).
    affine: float64 ``(4, 4)`` canonical voxel index -> LPS mm.
    geometry: ``orig_shape``, ``orig_affine`` (file grid -> LPS mm),
      ``orig_spacing`` (mm per file axis), ``canonical_shape``, ``ornt``.
  """
  data, affine_ras = read_nifti(path)
  return canonicalise(data, affine_ras, path)


def canonicalise(data: np.ndarray, affine_ras: np.ndarray, where: str
                 ) -> tuple[np.ndarray, np.ndarray, dict]:
  """A 3D array on any grid -> the axial canonical layout (see
  ``load_nifti_canonical``); shared by the NIfTI and DICOM inputs.

  Args:
    data: ``(I, J, K)`` voxels of the source grid (any axis order).
    affine_ras: ``(4, 4)`` source voxel index -> RAS mm (NIfTI convention;
      a DICOM LPS affine becomes RAS by negating its first two rows).
    where: file or series named in errors.
  """
  if not np.isfinite(affine_ras).all() or abs(np.linalg.det(affine_ras[:3, :3])) < 1e-9:
    raise ValueError(f"{where}: degenerate or non-finite affine")
  ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine_ras),
                                         _CANONICAL)
  canon = nib.orientations.apply_orientation(data, ornt)
  canon_ras = affine_ras @ nib.orientations.inv_ornt_aff(ornt, data.shape)
  geometry = {
      "orig_shape": [int(s) for s in data.shape],
      "orig_affine": (RAS_TO_LPS @ affine_ras).tolist(),
      "orig_spacing": [float(s) for s in np.linalg.norm(affine_ras[:3, :3], axis=0)],
      "canonical_shape": [int(s) for s in canon.shape],
      "ornt": ornt.tolist(),
  }
  return (np.ascontiguousarray(canon, np.float32), RAS_TO_LPS @ canon_ras,
          geometry)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
  """Source index of each output voxel (extent-preserving grid), nearest."""
  idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
  return np.clip(idx, 0, n_in - 1)


def resize_labels(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """Nearest-neighbour resize of a label map ``(D, H, W)`` to ``shape``."""
  labels = np.asarray(labels)
  ix = [_nearest_index(n, int(s)) for n, s in zip(labels.shape, shape)]
  return labels[np.ix_(*ix)]


def to_original_grid(labels: np.ndarray, geometry: Mapping[str, Any]) -> np.ndarray:
  """Label map on the record grid ``(D', H', W')`` -> the file's voxel grid.

  Nearest neighbour back to the canonical full-resolution grid, then the
  canonical reorientation is undone, so the result has ``orig_shape`` and
  lines up voxel for voxel with the source NIfTI.
  """
  labels = np.asarray(labels)
  canon_shape = geometry["canonical_shape"]
  ix = [_nearest_index(s, n) for s, n in zip(labels.shape, canon_shape)]
  canon = labels[np.ix_(*ix)]
  # Invert the file -> canonical transform: canonical axis ornt[i, 0] came
  # from file axis i (flipped when ornt[i, 1] == -1).
  ornt = np.asarray(geometry["ornt"], np.float64)
  inv = np.zeros_like(ornt)
  for i, (j, flip) in enumerate(ornt):
    inv[int(j)] = (i, flip)
  back = nib.orientations.apply_orientation(canon, inv)
  if list(back.shape) != list(geometry["orig_shape"]):
    raise ValueError(f"mapping back gave shape {back.shape}, expected "
                     f"{geometry['orig_shape']}")
  return np.ascontiguousarray(back)


def save_nifti(labels: np.ndarray, geometry: Mapping[str, Any], path: str) -> str:
  """Writes a record-grid label map as uint8 NIfTI in the original geometry."""
  data = to_original_grid(labels, geometry).astype(np.uint8)
  affine_ras = RAS_TO_LPS @ np.asarray(geometry["orig_affine"], np.float64)
  img = nib.Nifti1Image(data, affine_ras)
  img.set_qform(affine_ras, code=1)
  img.set_sform(affine_ras, code=1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  nib.save(img, path)
  return path
