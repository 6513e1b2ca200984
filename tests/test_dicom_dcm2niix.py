"""Geometry and voxel agreement with dcm2niix (the reference converter).

Both results are compared in world coordinates: dcm2niix writes a RAS NIfTI
affine, we carry LPS, and the two grids may differ by axis order and flips.
We map our (D, H, W) volume onto the NIfTI grid through the permutation and
flips that make the direction vectors agree, then require the same affine
(to 1e-3 mm), the same spacing (1e-3 mm) and identical voxel values (the
NIfTI values after scl_slope/scl_inter).
"""
import glob
import os
import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from radnet_jax import dicom
from tests.data import synth_dicom as sd

nib = pytest.importorskip("nibabel")
pytestmark = pytest.mark.skipif(shutil.which("dcm2niix") is None,
                                reason="dcm2niix is not on PATH")
SALT = "test-salt"
PYDICOM_FILES = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _dcm2niix(src: str, out: str) -> nib.Nifti1Image:
  os.makedirs(out, exist_ok=True)
  proc = subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-o", out, src],
                        capture_output=True, text=True, timeout=120, check=False)
  files = sorted(glob.glob(os.path.join(out, "*.nii")))
  if proc.returncode != 0 or len(files) != 1:
    pytest.fail(f"dcm2niix gave {files} (rc {proc.returncode}): {proc.stdout[-800:]}")
  return nib.load(files[0])


def _to_grid(voxels, affine, ref_affine, ref_shape):
  """Permutes/flips (voxels, affine) onto the grid axes of ref_affine."""
  dirs = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
  ref_dirs = ref_affine[:3, :3] / np.linalg.norm(ref_affine[:3, :3], axis=0)
  dots = ref_dirs.T @ dirs          # [ref axis, our axis]
  perm = [int(np.argmax(np.abs(dots[i]))) for i in range(3)]
  assert sorted(perm) == [0, 1, 2], dots
  voxels = np.transpose(voxels, perm)
  affine = affine.copy()
  affine[:3, :3] = affine[:3, perm]
  for i in range(3):
    if dots[i, perm[i]] < 0:
      voxels = np.flip(voxels, axis=i)
      affine[:3, 3] += (voxels.shape[i] - 1) * affine[:3, i]
      affine[:3, i] = -affine[:3, i]
  assert voxels.shape == tuple(ref_shape)
  return voxels, affine


def _compare(src_dir, tmp_path):
  (stack,) = dicom.scan(str(src_dir), salt=SALT).stacks
  vol = dicom.load_volume(stack)
  img = _dcm2niix(str(src_dir), str(tmp_path / "nii"))
  ref = np.asarray(img.get_fdata(dtype=np.float64))
  if ref.ndim == 4:
    ref = ref[..., 0]
  ref_affine = RAS_TO_LPS @ img.affine
  ours, affine = _to_grid(vol.voxels, vol.affine, ref_affine, ref.shape)
  np.testing.assert_allclose(affine, ref_affine, atol=1e-3)
  np.testing.assert_allclose(sorted(vol.spacing), sorted(img.header.get_zooms()[:3]),
                             atol=1e-3)
  np.testing.assert_array_equal(ours, ref.astype(np.float32))
  return vol


def test_axial_ct_matches_dcm2niix(tmp_path):
  rng = np.random.default_rng(0)
  stored = rng.integers(-1000, 2000, size=(7, 12, 10)).astype(np.int16)
  pos = sd.linear_positions([-60.0, -80.5, 120.0], [0, 0, -2.5], 7)
  sd.write_series(str(tmp_path / "ct"), stored, pos, [1, 0, 0, 0, 1, 0],
                  pixel_spacing=(0.75, 0.8), intercept=-1024)
  vol = _compare(tmp_path / "ct", tmp_path)
  assert vol.voxels.min() < -1024


@pytest.mark.parametrize("plane,angle", [("SAG", 12.0), ("COR", -20.0)])
def test_oblique_mr_matches_dcm2niix(tmp_path, plane, angle):
  rng = np.random.default_rng(1)
  stored = rng.integers(0, 3000, size=(6, 9, 11)).astype(np.int16)
  iop = sd.oblique_iop(plane, angle)
  from radnet_jax.dicom.geometry import slice_normal
  pos = sd.linear_positions([10.0, -20.0, 30.0], 3.3 * slice_normal(iop), 6)
  sd.write_series(str(tmp_path / "mr"), stored, pos, iop,
                  pixel_spacing=(1.1, 0.9), modality="MR", EchoTime="90",
                  RepetitionTime="3000")
  _compare(tmp_path / "mr", tmp_path)


def test_real_ct_series_matches_dcm2niix(tmp_path):
  src = os.path.join(PYDICOM_FILES, "dicomdirtests", "98892001", "CT5N")
  if not os.path.isdir(src):
    pytest.skip("pydicom test series not installed")
  shutil.copytree(src, tmp_path / "ct5")
  _compare(tmp_path / "ct5", tmp_path)


def _nibabel_file(name):
  path = os.path.join(os.path.dirname(nib.__file__), "nicom", "tests", "data",
                      name)
  if not os.path.exists(path):
    pytest.skip(f"nibabel test file not installed: {name}")
  return path


def test_real_siemens_mosaic_matches_dcm2niix(tmp_path):
  # A real Siemens DWI mosaic (48 slices of 128x128, b = 1000); dcm2niix
  # does not read gzipped files, so it gets the plain file.
  import gzip
  os.makedirs(tmp_path / "dwi")
  with gzip.open(_nibabel_file("siemens_dwi_1000.dcm.gz")) as f:
    (tmp_path / "dwi" / "dwi.dcm").write_bytes(f.read())
  vol = _compare(tmp_path / "dwi", tmp_path)
  assert vol.voxels.shape == (48, 128, 128)


def test_uneven_mosaic_geometry_matches_dcm2niix(tmp_path):
  # nibabel's shrunken DTI mosaic: 48 images of 36x36 in a 256x256 mosaic,
  # i.e. a 7x7 grid and 4 rows and columns of padding. Same grid and affine
  # as dcm2niix; the first row of tiles holds the same voxels (dcm2niix
  # reads the later rows of this uneven layout from shifted offsets, which
  # no real scanner writes: Siemens mosaics divide evenly, as above).
  os.makedirs(tmp_path / "mosaic")
  shutil.copy(_nibabel_file("0.dcm"), tmp_path / "mosaic" / "0.dcm")
  (stack,) = dicom.scan(str(tmp_path / "mosaic"), salt=SALT).stacks
  vol = dicom.load_volume(stack)
  img = _dcm2niix(str(tmp_path / "mosaic"), str(tmp_path / "nii"))
  ref = np.asarray(img.get_fdata(dtype=np.float64))
  ref_affine = RAS_TO_LPS @ img.affine
  ours, affine = _to_grid(vol.voxels, vol.affine, ref_affine, ref.shape)
  np.testing.assert_allclose(affine, ref_affine, atol=1e-3)
  assert ref.shape == (36, 36, 48)
  np.testing.assert_array_equal(ours[..., :7], ref[..., :7].astype(np.float32))
