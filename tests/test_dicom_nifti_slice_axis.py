"""Which NIfTI array axis holds the slices (``dicom.nifti.slice_axis``)."""
import csv
import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest

from radnet_jax.dicom import geometry, nifti


@pytest.mark.parametrize("spacing, axis", [
    ((3.1, 3.1, 3.0), 2),      # 2D CT: 3.0 mm slices under 3.1 mm pixels
    ((0.78, 0.78, 0.625), 2),  # thin-slice CT
    ((2.29, 2.29, 2.0), 2),    # DTI, 2 mm slices on a 96 matrix
    ((1.06, 0.94, 0.94), 0),   # sagittal MPRAGE that dcm2niix reoriented
    ((0.93, 0.94, 0.94), 0),   # the same, partitions a hair thinner than the pixels
    ((4.13, 5.0, 4.13), 1),    # coronal reformat with its slices along j
    ((0.5, 0.5, 5.0), 2),      # 2D MR
    ((2.0, 2.0, 2.0), 2),      # isotropic: k
    ((5.0, 0.7, 0.8), 0),      # all different: the largest spacing
])
def test_slice_axis_is_the_odd_spacing_out(spacing, axis):
  assert nifti.slice_axis(spacing) == axis


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="needs dcm2niix")
def test_dcm2niix_volumes_load_in_their_acquisition_plane(tmp_path):
  # Every series of a phantom corpus, converted by dcm2niix, loads with the
  # plane the simulator acquired it in, incl. 3D series that dcm2niix
  # reorients (slices along i or j) and series whose slices are thinner than
  # their pixels (the largest-spacing rule called 2 of these 16 wrong).
  from radnet_jax import phantom
  root = str(tmp_path / "corpus")
  phantom.make_corpus(root, n=16, seed=1, workers=1, small=True, progress=False,
                      noise=phantom.HeaderNoise.off())
  truth = {r["series_uid"]: r for r in csv.DictReader(open(os.path.join(root, "truth.csv")))}
  out = tmp_path / "nii"
  out.mkdir()
  for patient in sorted(os.listdir(os.path.join(root, "dicom"))):
    subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-f", "%j", "-o", str(out),
                    os.path.join(root, "dicom", patient)], check=True, capture_output=True)
  seen, not_k, thin = 0, 0, 0
  for name in sorted(os.listdir(out)):
    img = nib.load(str(out / name))
    row = truth.get(name[:-len(".nii")])
    if row is None or len(img.shape) != 3:
      continue
    vol = nifti.load_nifti_volume(str(out / name))
    assert geometry.plane_of(vol.affine[:3, 0]) == row["plane"], (name, row["modality"], vol.spacing)
    sp = np.linalg.norm(img.affine[:3, :3], axis=0)
    axis = nifti.slice_axis(sp)
    seen += 1
    not_k += axis != 2
    thin += sp[axis] < sp.max() * 0.999
  assert seen == len(truth) == 16
  assert not_k >= 2 and thin >= 2, (not_k, thin)
