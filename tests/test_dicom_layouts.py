"""Multi-volume series stored one slice per file (phantom.layouts): scan
splits them into every expected 3D volume, per vendor style, with the key in
the record; and dcm2niix (where installed) finds the same volumes with the
same voxels."""
import glob
import os
import shutil
import collections
import subprocess

import numpy as np
import pytest

from radnet_jax import dicom
from radnet_jax.labels import OTHER, label
from radnet_jax.phantom import layouts
from radnet_jax.privacy import hash_id

SALT = "test-salt"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("layouts"))
  truth = layouts.make_layouts(out)
  return out, truth


def _by_style(truth):
  out = collections.defaultdict(list)
  for row in truth:
    out[row["style"]].append(row)
  return out


@pytest.mark.parametrize("style", layouts.STYLES)
def test_every_volume_is_its_own_stack_with_its_key(corpus, style):
  out, truth = corpus
  rows = _by_style(truth)[style]
  res = dicom.scan(os.path.join(out, "dicom", style), salt=SALT)
  assert not res.skipped, res.skipped
  assert len(res.stacks) == len(rows)
  recs = sorted((s.record for s in res.stacks), key=lambda r: r["VolumeIndex"])
  assert [r["VolumeIndex"] for r in recs] == list(range(len(rows)))
  assert {r["NumberOfVolumes"] for r in recs} == {len(rows)}
  for row, rec in zip(rows, recs):
    assert rec["NumberOfSlices"] == row["n_slices"]
    if row["kind"] == "dwi":
      assert rec["DiffusionBValue"] == pytest.approx(row["b_value"])
      if row["b_value"]:
        np.testing.assert_allclose(rec["DiffusionGradientOrientation"],
                                   [float(v) for v in row["direction"].split()],
                                   atol=1e-5)
      assert rec["SeriesBValues"] == sorted({r["b_value"] for r in rows})
    else:
      # time points in acquisition order; the split key is named
      assert rec["VolumeSplitBy"]
      assert rec["VolumeTimeS"] == pytest.approx(row["time_s"], abs=0.01)
  vols = [dicom.load_volume(s) for s in res.stacks]
  for v in vols:
    assert v.voxels.shape == (rows[0]["n_slices"], rows[0]["rows"],
                              rows[0]["columns"])
  # The volumes of a series really differ (a wrong split would mix them).
  flat = {v.voxels.tobytes() for v in vols}
  assert len(flat) == len(vols)


@pytest.mark.parametrize("descriptions", [True, False])
def test_labels_of_every_volume_match_the_truth(corpus, descriptions):
  out, truth = corpus
  expected = {(r["series_uid"], r["volume_index"]): r for r in truth}
  by_hash = {hash_id(r["series_uid"], SALT): r["series_uid"] for r in truth}
  res = dicom.scan(os.path.join(out, "dicom"), salt=SALT)
  assert len(res.stacks) == len(truth)
  for st in res.stacks:
    rec = dict(st.record)
    if not descriptions:  # the tags alone decide
      for key in ("SeriesDescription", "ProtocolName"):
        rec.pop(key, None)
    row = expected[(by_hash[rec["SeriesHash"]], rec["VolumeIndex"])]
    labels = label(rec, "extended")
    assert labels["sequence"].value == row["sequence"], (row, labels["sequence"])
    if row["contrast"]:
      assert labels["contrast"].value == row["contrast"], (row, labels["contrast"])
    paper = label(rec, "paper")["sequence"]
    assert paper.value in (OTHER, None), (row, paper)   # masked, never T1/T2


def test_unorderable_repeats_name_the_tags_tried(corpus, tmp_path):
  out, _ = corpus
  src = os.path.join(out, "dicom", "ge_fmri")
  import pydicom  # the InstanceNumbers stripped: nothing orders the files
  for i, path in enumerate(sorted(glob.glob(os.path.join(src, "*")))):
    ds = pydicom.dcmread(path)
    del ds.InstanceNumber
    ds.save_as(str(tmp_path / f"f{i:03d}"))
  (stack,) = dicom.scan(str(tmp_path), salt=SALT).stacks
  assert "InstanceNumber order" in stack.record["VolumeSplitTried"]
  with pytest.raises(dicom.DicomError, match="mixed acquisitions.*tried"):
    dicom.load_volume(stack)


nib = pytest.importorskip("nibabel")
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _dcm2niix_volumes(src, out):
  os.makedirs(out, exist_ok=True)
  proc = subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-o", out, src],
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stdout[-800:]
  vols = []
  for f in sorted(glob.glob(os.path.join(out, "*.nii"))):
    img = nib.load(f)
    data = np.asarray(img.get_fdata(dtype=np.float64))
    data = data[..., None] if data.ndim == 3 else data
    vols += [(data[..., t], RAS_TO_LPS @ img.affine) for t in range(data.shape[3])]
  return vols


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix is not on PATH")
@pytest.mark.parametrize("style", layouts.STYLES)
def test_same_volumes_as_dcm2niix(corpus, style, tmp_path):
  from tests.test_dicom_dcm2niix import _to_grid  # pylint: disable=import-outside-toplevel
  out, truth = corpus
  src = os.path.join(out, "dicom", style)
  ref = _dcm2niix_volumes(src, str(tmp_path / "nii"))
  assert len(ref) == len(_by_style(truth)[style])
  stacks = dicom.scan(src, salt=SALT).stacks
  assert len(stacks) == len(ref)
  # Volume t of ours is volume t of dcm2niix's 4D output, voxel for voxel.
  for st in stacks:
    vol = dicom.load_volume(st)
    ref_vox, ref_affine = ref[st.record["VolumeIndex"]]
    ours, affine = _to_grid(vol.voxels, vol.affine, ref_affine, ref_vox.shape)
    np.testing.assert_allclose(affine, ref_affine, atol=1e-3)
    np.testing.assert_array_equal(ours, ref_vox.astype(np.float32))
