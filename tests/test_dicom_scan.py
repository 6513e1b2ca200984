"""scan(): grouping, stack splitting and skip reasons on real and synthetic files."""
import gzip
import os
import shutil

import numpy as np
import pydicom
import pytest

from radnet_jax import dicom
from radnet_jax.dicom.metadata import record_from_dataset
from radnet_jax.privacy import hash_id
from tests.data import synth_dicom as sd

SALT = "test-salt"
PYDICOM_FILES = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
DATA_STORE = os.path.join(os.path.dirname(os.path.dirname(pydicom.__file__)),
                          "data_store", "data")


def _nibabel_data():
  nibabel = pytest.importorskip("nibabel")
  return os.path.join(os.path.dirname(nibabel.__file__), "nicom", "tests", "data")


def _need(path):
  if not os.path.exists(path):
    pytest.skip(f"test file not installed: {path}")
  return path


def _reasons(result):
  return {os.path.basename(k.path): k.reason for k in result.skipped}


def test_real_dicomdir_tree_stacks_and_reasons():
  root = _need(os.path.join(PYDICOM_FILES, "dicomdirtests"))
  res = dicom.scan(root, salt=SALT)
  sizes = sorted(len(s.files) for s in res.stacks)
  # CT2 (3 slices, then a 202.5 mm gap and a 1-slice fragment) and CT5N.
  assert sizes == [3, 5]
  ct5 = next(s for s in res.stacks if len(s.files) == 5)
  # Files sorted along the normal in canonical order (axial: superior first,
  # z descending), not by name or InstanceNumber.
  z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
       for p in ct5.files]
  assert z == sorted(z, reverse=True)
  assert ct5.record["Modality"] == "CT"
  assert ct5.record["NumberOfSlices"] == 5
  assert ct5.record["SliceSpacing"] == pytest.approx(2.5, abs=1e-3)
  assert ct5.record["ExtentSI"] == pytest.approx(12.5, abs=1e-3)
  assert ct5.record["StackKey"] == ct5.key
  reasons = _reasons(res)
  assert "LOCALIZER" in reasons["6293"]                # CT2N scout pair
  assert "mixed orientations" in reasons["4950"]       # MR2 3-plane localizer
  assert "mixed orientations" in reasons["4467"]       # MR700 radial projections
  assert "DICOMDIR" in reasons["DICOMDIR"]
  assert reasons["README.txt"] == "not a DICOM file"
  assert "not a cross-sectional image" in reasons["6154"]  # CR radiograph
  assert "too few slices" in reasons["15820"]
  assert "fragment of 1 slice(s) cut off by a gap of 202.5 mm" in reasons["17106"]
  assert len(res.stacks) + len(res.skipped) >= 2 + 70


def test_scan_is_deterministic_and_parallel_equal():
  root = _need(os.path.join(PYDICOM_FILES, "dicomdirtests", "98892001"))
  a = dicom.scan(root, salt=SALT)
  b = dicom.scan(root, salt=SALT, workers=2)
  assert [s.key for s in a.stacks] == [s.key for s in b.stacks]
  assert [s.files for s in a.stacks] == [s.files for s in b.stacks]
  assert [s.record for s in a.stacks] == [s.record for s in b.stacks]
  assert a.skipped == b.skipped


@pytest.mark.parametrize("name,reason", [
    ("rtplan.dcm", "RT plan"), ("rtstruct.dcm", "RT structure set"),
    ("test-SR.dcm", "structured report"), ("rtdose.dcm", "RT dose"),
    ("waveform_ecg.dcm", "waveform"), ("MR_truncated.dcm", "truncated"),
])
def test_non_image_and_broken_files_are_skipped(tmp_path, name, reason):
  src = _need(os.path.join(PYDICOM_FILES, name))
  shutil.copy(src, tmp_path / name)
  res = dicom.scan(str(tmp_path), salt=SALT, min_slices=1)
  assert res.stacks == []
  assert len(res.skipped) == 1 and reason in res.skipped[0].reason


def test_seg_and_enhanced_without_geometry_are_skipped(tmp_path):
  for name in ("liver.dcm", "emri_small.dcm"):
    shutil.copy(_need(os.path.join(DATA_STORE, name)), tmp_path / name)
  reasons = _reasons(dicom.scan(str(tmp_path), salt=SALT, min_slices=1))
  assert "segmentation (SEG)" in reasons["liver.dcm"]
  assert "without per-frame functional groups" in reasons["emri_small.dcm"]


def _ct_volume(n=6, h=5, w=4):
  return (np.arange(n * h * w).reshape(n, h, w) * 7 - 300).astype(np.int16)


def test_synthetic_split_by_echo_localizer_junk_gz(tmp_path):
  iop = [1, 0, 0, 0, 1, 0]
  pos = sd.linear_positions([0, 0, 0], [0, 0, 2.0], 6)
  series = pydicom.uid.generate_uid()
  vol = _ct_volume()
  # Two echoes of one MR series, interleaved in one folder.
  sd.write_series(str(tmp_path / "mr"), vol, pos, iop, modality="MR",
                  series_uid=series, seed=1, EchoTime="10", EchoNumbers="1")
  sd.write_series(str(tmp_path / "mr"), vol, pos, iop, modality="MR",
                  series_uid=series, seed=2, EchoTime="80", EchoNumbers="2")
  # A scout series (ImageType LOCALIZER) and a 3-plane localizer.
  sd.write_series(str(tmp_path / "scout"), vol[:3], pos[:3], iop, seed=3,
                  ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
  three = pydicom.uid.generate_uid()
  for k, plane in enumerate(("AX", "COR", "SAG")):
    sd.write_series(str(tmp_path / "loc3"), vol[:1], [[0, 0, 0]],
                    sd.oblique_iop(plane, 0), series_uid=three, seed=10 + k)
  # Junk, a corrupt DICOM and a gzipped copy of a 3-slice CT.
  (tmp_path / "notes.txt").write_text("not dicom")
  (tmp_path / "corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(300))
  with open(pydicom.data.get_testdata_file("CT_small.dcm"), "rb") as f:
    (tmp_path / "cut.dcm").write_bytes(f.read()[:700])   # header cut mid-way
  gz_paths = sd.write_series(str(tmp_path / "gz"), vol[:3], pos[:3], iop, seed=4)
  for p in gz_paths:
    with open(p, "rb") as f, gzip.open(p + ".gz", "wb") as g:
      g.write(f.read())
    os.remove(p)

  res = dicom.scan(str(tmp_path), salt=SALT)
  echoes = sorted(s.record["EchoTime"] for s in res.stacks
                  if s.record["Modality"] == "MR")
  assert echoes == [10.0, 80.0]
  assert all(len(s.files) == 6 for s in res.stacks if s.record["Modality"] == "MR")
  gz = [s for s in res.stacks if s.files[0].endswith(".gz")]
  assert len(gz) == 1 and len(gz[0].files) == 3
  assert len(res.stacks) == 3
  by_dir = {}
  for k in res.skipped:
    by_dir.setdefault(os.path.basename(os.path.dirname(k.path)), set()).add(k.reason)
  assert any("LOCALIZER" in r for r in by_dir["scout"])
  assert all("mixed orientations" in r for r in by_dir["loc3"])
  reasons = _reasons(res)
  assert reasons["notes.txt"] == "not a DICOM file"
  assert "corrupt" in reasons["corrupt.dcm"]
  assert "corrupt" in reasons["cut.dcm"] or "truncated" in reasons["cut.dcm"]
  # Skipped entries of a known series carry its salted hash, never the UID.
  assert all(k.series in ("", hash_id(three, SALT)) for k in res.skipped
             if "loc3" in k.path)


def test_temporal_split_only_when_positions_repeat(tmp_path):
  iop = [1, 0, 0, 0, 1, 0]
  pos = sd.linear_positions([0, 0, 0], [0, 0, 3.0], 4)
  vol = _ct_volume(4)
  series = pydicom.uid.generate_uid()
  # Two phases at the same positions (AcquisitionNumber 1 and 2).
  sd.write_series(str(tmp_path / "a"), vol, pos, iop, series_uid=series,
                  seed=1, AcquisitionNumber=1)
  sd.write_series(str(tmp_path / "a"), vol + 5, pos, iop, series_uid=series,
                  seed=2, AcquisitionNumber=2)
  # A CT whose slices carry different AcquisitionNumbers but distinct positions.
  sd.write_series(str(tmp_path / "b"), vol, pos, iop, seed=3,
                  per_slice_tags=[{"AcquisitionNumber": k} for k in range(4)])
  res = dicom.scan(str(tmp_path), salt=SALT)
  assert sorted(len(s.files) for s in res.stacks) == [4, 4, 4]
  assert len({s.key for s in res.stacks}) == 3


def test_enhanced_ct_frames_and_mprage_record():
  res = dicom.scan(_need(os.path.join(DATA_STORE, "eCT_Supplemental.dcm")),
                   salt=SALT, min_slices=2)
  (stack,) = res.stacks
  # IOP r=-x, c=+y: normal r x c = -z, so z=-149 (frame 2) sorts first.
  assert stack.frames == ((0, 1), (0, 0))
  assert stack.record["NumberOfSlices"] == 2
  assert stack.record["SliceSpacing"] == pytest.approx(10.0)
  assert stack.record["ContrastBolusAgentAdministered"] == "YES"

  path = _need(os.path.join(_nibabel_data(), "philips_mprage.dcm.gz"))
  res = dicom.scan(path, salt=SALT)
  (stack,) = res.stacks
  assert len(stack.frames) == 176
  rec = stack.record
  assert rec["EchoTime"] == pytest.approx(3.513)
  assert rec["RepetitionTime"] == pytest.approx(7.5693, abs=1e-3)
  assert rec["FlipAngle"] == 7.0
  assert rec["ScanningSequence"] == ["GR"] and rec["SequenceVariant"] == ["MP"]
  assert rec["MRAcquisitionType"] == "3D"
  assert rec["PixelSpacing"] == [1.0, 1.0]
  assert len(rec["ImageOrientationPatient"]) == 6
  assert rec["SliceSpacing"] == pytest.approx(1.0, abs=1e-3)


def test_siemens_mosaic_b_value():
  path = _need(os.path.join(_nibabel_data(), "siemens_dwi_1000.dcm.gz"))
  (stack,) = dicom.scan(path, salt=SALT).stacks
  assert stack.record["DiffusionBValue"] == 1000.0
  assert stack.record["NumberOfImagesInMosaic"] == 48
  assert stack.record["NumberOfSlices"] == 48


def test_record_is_phi_free_and_typed(tmp_path):
  vol = _ct_volume(3)
  series, study = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
  paths = sd.write_series(str(tmp_path), vol, sd.linear_positions(
      [0, 0, 0], [0, 0, 1], 3), [1, 0, 0, 0, 1, 0], series_uid=series,
      study_uid=study, ContrastBolusAgent="Omnipaque", ScanOptions="HELICAL",
      ConvolutionKernel="B30f", KVP="120")
  rec = record_from_dataset(pydicom.dcmread(paths[0], stop_before_pixels=True), SALT)
  text = repr(rec)
  for phi in (sd.PATIENT_NAME, sd.PATIENT_ID, "19600101", "ACC998877",
              "20200102", "General Hospital", series, study):
    assert phi not in text
  assert rec["PatientHash"] == hash_id(sd.PATIENT_ID, SALT)
  assert rec["SeriesHash"] == hash_id(series, SALT)
  assert rec["StudyHash"] == hash_id(study, SALT)
  assert rec["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
  assert rec["ScanOptions"] == ["HELICAL"]
  assert rec["ImageOrientationPatient"] == [1.0, 0, 0, 0, 1.0, 0]
  assert rec["KVP"] == 120.0 and isinstance(rec["Rows"], int)
  assert rec["ContrastBolusAgent"] == "Omnipaque"
  assert rec["SourceFormat"] == "dicom"
  assert "EchoTime" not in rec  # absent tags are absent keys
  assert all(v is not None for v in rec.values())


def test_record_built_once_per_group_and_rebuilt_when_a_worker_dropped_it(tmp_path):
  import importlib
  from radnet_jax.dicom import entries as entries_mod
  scan_mod = importlib.import_module("radnet_jax.dicom.scan")
  iop = [1, 0, 0, 0, 1, 0]
  paths = sd.write_series(str(tmp_path), _ct_volume(), sd.linear_positions(
      [0, 0, 0], [0, 0, 2.0], 6), iop, shuffle=False, SeriesDescription="AX +C")
  seen = set()
  results = [entries_mod.read_entries(p, SALT, seen) for p in paths]
  assert results[0][0].record is not None
  assert all(r[0].record is None for r in results[1:])   # one record per group
  reference = dicom.scan(str(tmp_path), salt=SALT).stacks[0].record
  # As if a parallel reader had seen the group before the first file here:
  # the grouping re-reads the first file's record.
  dropped = [entries_mod.read_entries(p, SALT, set(seen)) for p in paths]
  assert all(r[0].record is None for r in dropped)
  res = scan_mod.group_entries(dropped, SALT)
  assert len(res.stacks) == 1 and res.stacks[0].record == reference
  assert reference["SeriesDescription"] == "AX +C" and reference["NumberOfSlices"] == 6
