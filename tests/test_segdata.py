"""LiTS NIfTI -> segmentation shards: geometry, labels, splits, mapping back."""
import json
import os

import nibabel as nib
import numpy as np
import pytest

from data_prep import build_seg_shards
from radnet_jax.dicom import nifti
from radnet_jax.shards import seg as segdata

# A LiTS-like file grid: axes (i, j, k) = (x, y, slice); RAS affine with the
# usual LiTS sign pattern (x towards -R... i.e. radiological) and slices
# stored inferior -> superior (k grows towards S).
SPACING_FILE = (0.75, 0.75, 1.25)            # mm along file axes i, j, k
AFFINE_RAS = np.array([[-0.75, 0, 0, 30.0],
                       [0, -0.75, 0, 40.0],
                       [0, 0, 1.25, -100.0],
                       [0, 0, 0, 1]])
FILE_SHAPE = (32, 24, 16)                    # (i, j, k)


def _case(seed):
  """HU volume and label map in file order, labels in 2-voxel aligned blocks."""
  rng = np.random.default_rng(seed)
  hu = rng.normal(40, 20, FILE_SHAPE).astype(np.float32)
  seg = np.zeros(FILE_SHAPE, np.uint8)
  seg[4:20, 6:18, 2:12] = 1                  # liver: even-aligned in i, j, k
  seg[8:12, 8:12, 4:8] = 2                   # tumour
  hu[seg > 0] = 100 + seed
  hu[0, 0, 15] = 3000                        # marker: most superior slice
  return hu, seg


def _write_lits(root, n=4):
  os.makedirs(root, exist_ok=True)
  for c in range(n):
    hu, seg = _case(c)
    nib.save(nib.Nifti1Image(hu, AFFINE_RAS), os.path.join(root, f"volume-{c}.nii.gz"))
    nib.save(nib.Nifti1Image(seg, AFFINE_RAS),
             os.path.join(root, f"segmentation-{c}.nii"))
  return root


def test_canonical_orientation_and_affine(tmp_path):
  root = _write_lits(str(tmp_path / "lits"), n=1)
  vox, aff, geom = nifti.load_nifti_canonical(os.path.join(root, "volume-0.nii.gz"))
  # D = slices (superior first), H = file j reversed? (j grows towards -A = P
  # already), W = file i (grows towards -R = L).
  assert vox.shape == (16, 24, 32)
  assert vox[0, 0, 0] == 3000                 # superior slice comes first
  np.testing.assert_allclose(np.linalg.norm(aff[:3, :3], axis=0), (1.25, .75, .75))
  # Same physical point for the marker through both affines (LPS).
  lps_file = np.array(geom["orig_affine"]) @ np.array([0, 0, 15, 1.0])
  np.testing.assert_allclose(aff @ np.array([0, 0, 0, 1.0]), lps_file)
  # Axis directions in LPS: D -> -Z (inferior), H -> +Y (posterior), W -> +X (left).
  assert aff[2, 0] < 0 and aff[1, 1] > 0 and aff[0, 2] > 0


def test_build_shards_round_trip(tmp_path):
  root = _write_lits(str(tmp_path / "lits"), n=4)
  out = str(tmp_path / "shards")
  # Target spacing = 2x the file spacing along every axis: block-aligned
  # labels map to the coarse grid and back without loss.
  rc = build_seg_shards.main(["--input", root, "--out", out, "--spacing",
                              "2.5,1.5,1.5", "--test-fraction", "0.25",
                              "--window=-200,250", "--range", "0,1"])
  assert rc == 0
  manifest = json.load(open(os.path.join(out, "manifest.json")))
  assert manifest["counts"] == {"train": 3, "val": 0, "test": 1}
  assert sorted(manifest["splits"]["train"] + manifest["splits"]["test"]) == ["0", "1", "2", "3"]
  recs = segdata.load_records(out, "train") + segdata.load_records(out, "test")
  assert len(recs) == 4
  for rec in recs:
    c = int(rec["case"])
    hu, seg = _case(c)
    assert rec["volume"].dtype == np.float16 and rec["volume"].shape == (8, 12, 16)
    assert rec["mask"].dtype == np.uint8 and rec["mask"].shape == (8, 12, 16)
    assert set(np.unique(rec["mask"])) == {0, 1, 2}
    assert rec["normalisation"] == "ct_window(-200,250)->[0,1]"
    assert 0.0 <= rec["volume"].min() and rec["volume"].max() <= 1.0
    # Liver voxels have HU 100+c -> (300+c)/450 in [0, 1].
    inner = rec["volume"][rec["mask"] == 2].astype(np.float32)
    np.testing.assert_allclose(np.median(inner), (300 + c) / 450, atol=2e-3)
    np.testing.assert_allclose(rec["geometry"]["spacing"], (2.5, 1.5, 1.5))
    # Mapping the record mask back lands exactly on the original labels.
    back = nifti.to_original_grid(rec["mask"], rec["geometry"])
    assert back.shape == FILE_SHAPE
    np.testing.assert_array_equal(back, seg)


def test_prediction_saved_as_nifti_lines_up(tmp_path):
  root = _write_lits(str(tmp_path / "lits"), n=1)
  cfg = segdata.SegPrepConfig(spacing=(2.5, 1.5, 1.5))
  rec = segdata.make_record("0", os.path.join(root, "volume-0.nii.gz"),
                            os.path.join(root, "segmentation-0.nii"), cfg)
  out = nifti.save_nifti(rec["mask"], rec["geometry"], str(tmp_path / "pred.nii.gz"))
  img = nib.load(out)
  np.testing.assert_allclose(img.affine, AFFINE_RAS, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(img.dataobj), _case(0)[1])
  # Record affine: the centre of record voxel (0,0,0) is the centre of the
  # 2x2x2 file block it summarises (extent-preserving grid).
  file_block_centre = np.array(rec["geometry"]["orig_affine"]) @ np.array(
      [0.5, 0.5, 14.5, 1.0])
  np.testing.assert_allclose(rec["affine"] @ np.array([0, 0, 0, 1.0]), file_block_centre)


def test_bad_inputs_name_the_file(tmp_path):
  root = str(tmp_path / "bad")
  os.makedirs(root)
  hu, seg = _case(0)
  seg[0, 0, 0] = 7
  nib.save(nib.Nifti1Image(hu, AFFINE_RAS), os.path.join(root, "volume-1.nii.gz"))
  nib.save(nib.Nifti1Image(seg, AFFINE_RAS), os.path.join(root, "segmentation-1.nii.gz"))
  with pytest.raises(ValueError, match="segmentation-1.nii.gz: unexpected labels"):
    segdata.make_record("1", os.path.join(root, "volume-1.nii.gz"),
                        os.path.join(root, "segmentation-1.nii.gz"), segdata.SegPrepConfig())
  # A corrupt case is skipped and reported, the good one converted.
  hu2, seg2 = _case(2)
  nib.save(nib.Nifti1Image(hu2, AFFINE_RAS), os.path.join(root, "volume-2.nii.gz"))
  nib.save(nib.Nifti1Image(seg2, AFFINE_RAS), os.path.join(root, "segmentation-2.nii.gz"))
  m = segdata.build_shards(root, str(tmp_path / "out"),
                           segdata.SegPrepConfig(test_fraction=0), progress=False)
  assert m["counts"]["train"] == 1 and m["errors"][0]["case"] == "1"
  assert "unexpected labels" in m["errors"][0]["reason"]


def test_normalise_hu_ranges():
  hu = np.array([-1000, -200, 25, 250, 3000, np.nan], np.float32)
  np.testing.assert_allclose(segdata.normalise_hu(hu, (-200, 250)),
                             [0, 0, 0.5, 1, 1, 0], atol=1e-6)
  np.testing.assert_allclose(segdata.normalise_hu(hu, (-200, 250), (-1, 1)),
                             [-1, -1, 0, 1, 1, -1], atol=1e-6)


def test_assign_splits_by_volume_deterministic():
  cases = [str(i) for i in range(10)]
  a = segdata.assign_splits(cases, 0.1, 0.2, seed=3)
  assert a == segdata.assign_splits(cases, 0.1, 0.2, seed=3)
  assert sorted(a.values()).count("test") == 2 and list(a.values()).count("val") == 1
