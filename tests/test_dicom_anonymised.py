"""Anonymised headers: scan, load, labels and shards work or skip with a reason.

Series from ``radnet_jax.phantom.geometry_layouts``: an empty SOPClassUID
(the file meta keeps the class), Study / Series / SOP UIDs replaced by
strings that are not UIDs, an empty or absent PatientID, no InstanceNumber,
no SliceThickness. predict_seg and the SEG writer are in test_segdicom.py,
the classification CLI in test_inference_predict.py.
"""
import os
import warnings

import numpy as np
import pydicom
import pytest

from radnet_jax import dicom, labels
from radnet_jax.dicom import metadata
from radnet_jax.phantom import geometry_layouts as gl
from radnet_jax.privacy import hash_id
from radnet_jax.shards import convert

SALT = "test-salt"
ANON = ("ct_anonymised", "ct_anon_text_uids", "mr_anonymised")


@pytest.fixture(scope="module")
def anon(tmp_path_factory):
  root = tmp_path_factory.mktemp("anon")
  gl.make_geometry_layouts(str(root), styles=ANON, rows=16, cols=16)
  return root


@pytest.mark.parametrize("style", ANON)
def test_scan_load_and_label_anonymised_series(anon, style):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")   # pydicom warns about the non-UID strings
    res = dicom.scan(str(anon / style), salt=SALT)
    (stack,) = res.stacks
    vol = dicom.load_volume(stack)
  assert not res.skipped
  modality = "MR" if style.startswith("mr") else "CT"
  rec = vol.record
  # SOPClassUID from the file meta; the patient hash is '' (no PatientID),
  # study / series hashes are those of whatever strings the files carry.
  assert rec["SOPClassUID"] == gl.SOP[modality]
  assert rec["PatientHash"] == ""
  ds = pydicom.dcmread(stack.files[0], stop_before_pixels=True)
  assert rec["SeriesHash"] == hash_id(str(ds.SeriesInstanceUID), SALT)
  assert rec["StudyHash"] == hash_id(str(ds.StudyInstanceUID), SALT)
  assert "InstanceNumber" not in ds and "SliceThickness" not in ds
  # Spacing from the positions (3 mm), order from the positions (superior first).
  assert vol.voxels.shape == (12, 16, 16)
  assert vol.spacing[0] == pytest.approx(3.0)
  assert np.all(np.diff(vol.affine[2, 3] + vol.affine[2, 0] * np.arange(12)) < 0)
  lab = labels.label(rec)
  assert lab["sequence"].value == ("CT" if modality == "CT" else "T2")
  assert lab["plane"].value == "AX"
  assert lab["spacing"].value == pytest.approx(3.0)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_sop_class_fallbacks():
  meta = pydicom.dataset.FileMetaDataset()
  meta.MediaStorageSOPClassUID = gl.SOP["CT"]
  for value in (None, "", "   ", "ANON"):
    ds = pydicom.Dataset()
    ds.file_meta = meta
    if value is not None:
      ds.SOPClassUID = value
    assert metadata.sop_class_uid(ds) == gl.SOP["CT"]
  ds.SOPClassUID = gl.SOP["MR"]
  assert metadata.sop_class_uid(ds) == gl.SOP["MR"]     # the dataset wins
  bare = pydicom.Dataset()
  bare.SOPClassUID = ""
  assert metadata.sop_class_uid(bare) == ""
  assert metadata.is_uid("1.2.840.10008.5.1.4.1.1.2")
  assert not metadata.is_uid("ANON-SERIES-1") and not metadata.is_uid("")


def test_shards_from_anonymised_series(anon, tmp_path):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    summary = convert.build_shards(str(anon), str(tmp_path / "shards"),
                                   shape=(8, 16, 16), workers=1, salt=SALT,
                                   progress=False)
  assert summary["stacks"] == 3 and summary["converted"] == 3
  assert summary["failed"] == 0
  assert summary["skipped_by_scan"] == 1      # truth.csv, not a DICOM file
  records = [r for split in ("train", "val", "test")
             for r in convert.iter_records(str(tmp_path / "shards"), split)]
  assert sorted(r["labels"]["sequence"] for r in records) == ["CT", "CT", "T2"]
  text = "".join(open(os.path.join(dp, f), errors="ignore").read()
                 for dp, _, fs in os.walk(tmp_path / "shards") for f in fs
                 if f.endswith((".json", ".csv", ".txt")))
  assert "ANON-SERIES" not in text and "ANON-STUDY" not in text
