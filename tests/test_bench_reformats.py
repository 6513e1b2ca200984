"""bench/real_reformats.py: a reformat's voxels sit where its affine says."""
import importlib.util
import os

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "real_reformats.py")


def _module():
  spec = importlib.util.spec_from_file_location("real_reformats", _PATH)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("plane,tilt", [("AX", 0.0), ("COR", 20.0), ("SAG", -20.0)])
def test_reformat_samples_the_source_at_its_affine(plane, tilt):
  """A linear field of world position, stored on an oblique 4 x 4 x 5 mm grid,
  reads back in the reformat as the same field of the reformat's own voxel
  centres (the box slice profile averages a linear field to its centre);
  the slice normal points along the asked plane, tilted by ``tilt``."""
  rr = _module()
  from radnet_jax.dicom import geometry  # pylint: disable=g-import-not-at-top
  a = np.deg2rad(35.0)
  src_aff = np.eye(4)
  src_aff[:3, :3] = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]]) @ np.diag([4.0, 4.0, 5.0])
  src_aff[:3, 3] = [-116.0, -90.0, -40.0]
  shape = (58, 58, 30)
  ijk = np.indices(shape).reshape(3, -1).T
  world = ijk @ src_aff[:3, :3].T + src_aff[:3, 3]
  coef = np.array([0.7, -0.4, 1.1])
  field = (world @ coef + 500.0).reshape(shape).astype(np.float32)
  vox, aff = rr.reformat(field, src_aff, plane, tilt, thickness=5.0, pixel=3.6)
  assert geometry.plane_of(aff[:3, 2]) == plane
  normal = aff[:3, 2] / np.linalg.norm(aff[:3, 2])
  assert normal @ rr._PLANES[plane][0] == pytest.approx(np.cos(np.deg2rad(tilt)))
  assert np.linalg.norm(aff[:3, :3], axis=0) == pytest.approx([3.6, 3.6, 5.0])
  out_ijk = np.indices(vox.shape).reshape(3, -1).T
  centres = out_ijk @ aff[:3, :3].T + aff[:3, 3]
  expect = centres @ coef + 500.0
  # Voxels whose whole slice profile lies a voxel inside the source grid.
  inv = np.linalg.inv(src_aff)
  inside = np.ones(len(centres), bool)
  for end in (-0.5, 0.5):
    src = (centres + end * aff[:3, 2]) @ inv[:3, :3].T + inv[:3, 3]
    inside &= np.all((src >= 1) & (src <= np.array(shape) - 2), axis=1)
  assert inside.mean() > 0.2
  np.testing.assert_allclose(vox.reshape(-1)[inside], expect[inside], atol=0.05)
