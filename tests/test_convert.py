"""End-to-end shard conversion on a small mixed directory.

The input mixes synthetic series written here (known geometry, tags and PHI
strings), real pydicom test files (dicomdirtests, CT_small, MR_small) and
deliberately broken files (truncated, random bytes, an SR document).
"""
import csv
import glob
import json
import os
import shutil
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radnet_jax.shards import build
from radnet_jax.shards import convert
from radnet_jax.shards import records
from radnet_jax.labels import taxonomy as tx

lb = pytest.importorskip("radnet_jax.labels")
if not hasattr(lb, "label"):
  pytest.skip("radnet_jax.labels.label not available yet", allow_module_level=True)

SHAPE = (4, 16, 16)
SALT = "convert-test-salt"
PYDICOM_FILES = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

# Synthetic patients: (name, id, [(modality, description, body part, n, rows,
# cols, pixel spacing, slice spacing)]).
PATIENTS = [
    ("DOE^JOHN", "PID-SECRET-0001", [("CT", "CHEST W/O CONTRAST", "CHEST", 6, 20, 24, 0.8, 2.5),
                                     ("CT", "ABD PORTAL VENOUS +C", "ABDOMEN", 5, 20, 20, 0.7, 5.0)]),
    ("ROE^JANE", "PID-SECRET-0002", [("MR", "AX T2 TSE", "BRAIN", 5, 24, 20, 0.9, 4.0)]),
    ("POE^EDGAR", "PID-SECRET-0003", [("CT", "CHEST LOW DOSE", "CHEST", 7, 16, 16, 1.0, 1.25)]),
    ("KAY^ALAN", "PID-SECRET-0004", [("CT", "HEAD", "HEAD", 5, 18, 18, 0.5, 3.0),
                                     ("MR", "AX T1 SE", "BRAIN", 4, 16, 20, 1.1, 5.0)]),
    ("LEE^ANN", "PID-SECRET-0005", [("CT", "PELVIS", "PELVIS", 6, 16, 16, 0.9, 2.0)]),
    ("MOE^MAX", "PID-SECRET-0006", [("CT", "CHEST", "CHEST", 5, 16, 16, 0.6, 2.0)]),
]


def _slice(path, *, patient, pid, study, series, modality, desc, body, z, rows,
           cols, ps, number, pixels):
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = CT_IMAGE if modality == "CT" else MR_IMAGE
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient, pid, "19600101"
  ds.AccessionNumber = "ACC" + pid[-4:]
  ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
  ds.Modality, ds.SeriesDescription, ds.BodyPartExamined = modality, desc, body
  ds.StudyDescription = desc
  ds.SeriesNumber, ds.InstanceNumber = 3, number
  ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
  ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
  ds.ImagePositionPatient = [-10.0, -20.0, z]
  ds.PixelSpacing = [ps, ps]
  ds.SliceThickness = 2.0
  ds.Rows, ds.Columns = rows, cols
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
  if modality == "CT":
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
  else:
    ds.ScanningSequence, ds.SequenceVariant = "SE", "SK"
    ds.EchoTime, ds.RepetitionTime = (100.0, 4000.0) if "T2" in desc else (12.0, 500.0)
    ds.MagneticFieldStrength = 1.5
  ds.PixelData = pixels.astype("<i2").tobytes()
  ds.save_as(path, enforce_file_format=True)


def _write_series(root, patient, pid, study, spec, rng):
  modality, desc, body, n, rows, cols, ps, dz = spec
  series = generate_uid()
  folder = os.path.join(root, patient.replace("^", "_"), f"{modality}_{desc.replace('/', '_')}")
  os.makedirs(folder, exist_ok=True)
  # Instance numbers run opposite to z, and files are named out of order: the
  # assembly must sort by position.
  names = rng.permutation(n)
  for i in range(n):
    base = 1024 + (np.arange(rows * cols).reshape(rows, cols) % 200) + 50 * i
    pixels = base + rng.integers(0, 5, (rows, cols))
    _slice(os.path.join(folder, f"IM{names[i]:04d}.dcm"), patient=patient, pid=pid,
           study=study, series=series, modality=modality, desc=desc, body=body,
           z=100.0 - dz * i, rows=rows, cols=cols, ps=ps, number=n - i,
           pixels=pixels)
  return series


def _sr(path):
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = BASIC_TEXT_SR, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.PatientName, ds.PatientID = "SR", "SR^PATIENT", "PID-SECRET-SR01"
  ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
  ds.save_as(path, enforce_file_format=True)
  return ds


def _phi_strings(root):
  """Every PHI-like value in the input files: names, IDs, instance UIDs."""
  out = set()
  for path in glob.glob(os.path.join(root, "**", "*"), recursive=True):
    if not os.path.isfile(path):
      continue
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - junk files carry no PHI
      continue
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
               "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
      v = str(ds.get(kw, "") or "").strip()
      if len(v) >= 6:
        out.add(v)
  return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("input"))
  rng = np.random.default_rng(0)
  truth = {}
  for patient, pid, specs in PATIENTS:
    study = generate_uid()
    for spec in specs:
      uid = _write_series(root, patient, pid, study, spec, rng)
      truth[uid] = (pid, spec)
  real = os.path.join(root, "real")
  shutil.copytree(os.path.join(PYDICOM_FILES, "dicomdirtests", "77654033"),
                  os.path.join(real, "77654033"))
  shutil.copytree(os.path.join(PYDICOM_FILES, "dicomdirtests", "98892001"),
                  os.path.join(real, "98892001"))
  for name in ("CT_small.dcm", "MR_small.dcm"):
    shutil.copy(os.path.join(PYDICOM_FILES, name), real)
  broken = os.path.join(root, "broken")
  os.makedirs(broken)
  first = sorted(glob.glob(os.path.join(root, "DOE_JOHN", "CT_CHEST*", "*.dcm")))[0]
  with open(first, "rb") as f:
    data = f.read()
  with open(os.path.join(broken, "truncated.dcm"), "wb") as f:
    f.write(data[:len(data) // 3])
  with open(os.path.join(broken, "random.dcm"), "wb") as f:
    f.write(np.random.default_rng(1).bytes(4096))
  _sr(os.path.join(broken, "report_sr.dcm"))
  return root, truth


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
  root, _ = corpus
  out = str(tmp_path_factory.mktemp("out"))
  summary = build.build_shards(root, out, shape=SHAPE, workers=1, salt=SALT,
                                 records_per_shard=2, progress=False)
  return out, summary


def _all_records(out):
  recs = []
  for split in convert.SPLITS:
    for r in convert.iter_records(out, split):
      recs.append((split, r))
  return recs


def _hashes(salt=SALT):
  from radnet_jax.privacy import hash_id
  return lambda v: hash_id(v, salt)


def test_records_decode_with_known_geometry_and_labels(corpus, built):
  root, truth = corpus
  out, summary = built
  recs = _all_records(out)
  manifest = convert.read_manifest(out)
  assert len(recs) == sum(manifest["num_records"].values()) == summary["converted"]
  h = _hashes()
  by_series = {r["series"]: r for _, r in recs}
  # Every synthetic series is in the shards (the failed real ones are not).
  for uid, (pid, spec) in truth.items():
    modality, desc, body, n, rows, cols, ps, dz = spec
    r = by_series[h(uid)]
    assert r["patient"] == h(pid)
    assert r["volume"].shape == SHAPE and r["volume"].dtype == np.float16
    assert np.all(np.isfinite(r["volume"]))
    geo = r["geometry"]
    assert geo["orig_shape"] == [n, rows, cols]
    np.testing.assert_allclose(geo["orig_spacing"], [dz, ps, ps], atol=1e-3)
    np.testing.assert_allclose(geo["spacing"],
                               np.array([dz, ps, ps]) * [n, rows, cols] / np.array(SHAPE))
    # Axial canonical orientation: D runs superior -> inferior (z falls), the
    # first voxel centre is the top slice's (-10, -20) corner.
    orig = np.array(geo["orig_affine"])
    np.testing.assert_allclose(orig @ [0, 0, 0, 1], [-10, -20, 100, 1], atol=1e-4)
    corner_new = r["affine"] @ [0, 0, 0, 1]
    half = 0.5 * np.array(geo["spacing"])
    assert np.all(np.abs(np.linalg.solve(orig[:3, :3], (corner_new - orig @ [0, 0, 0, 1])[:3])
                         * [dz, ps, ps]) <= half + 1e-6)
    assert r["modality"] == modality
    if modality == "CT":
      assert r["normalisation"] == "ct_window(-1000,1000)->[-1,1]"
      # Stored 1024 + (0..199) + 50 * i (+ noise < 5) with intercept -1024: HU
      # in [0, 203 + 50 (n - 1)], i.e. [0, that / 1000] after the window.
      assert float(r["volume"].min()) >= -1e-3
      assert float(r["volume"].max()) <= (204 + 50 * (n - 1)) / 1000 + 1e-3
      # Slice i (z = 100 - dz i, superior first) is 50 HU brighter than i - 1,
      # so along the canonical D axis the slice means rise strictly.
      assert np.all(np.diff(r["volume"].astype(np.float32).mean(axis=(1, 2))) > 0.01)
    else:
      assert r["normalisation"] == "pct(0.5,99.5)->[0,1]"
      assert float(r["volume"].min()) >= 0 and float(r["volume"].max()) <= 1
    # Labels in the shard are the label module's output on the stored record.
    labels = lb.label(r["metadata"], taxonomy="paper")
    for task in tx.TASKS:
      assert r["labels"][task] == labels[task].as_text()
      assert r["provenance"][task] == labels[task].provenance
    targets = tx.Taxonomy("paper").encode(labels)
    np.testing.assert_array_equal(r["coverage"], np.float32(targets.pop("coverage")))
    for k, v in targets.items():
      assert records.spacing_target(r["targets"][k]) == pytest.approx(v, nan_ok=True)
    if modality == "CT":
      assert r["labels"]["sequence"] == "CT"
      assert r["targets"]["sequence"] == 0
    assert r["labels"]["plane"] == "AX"
    assert r["targets"]["spacing"] == pytest.approx(dz, abs=1e-3)


def test_manifest_counts_and_shard_layout(built):
  out, _ = built
  m = convert.read_manifest(out)
  assert m["schema_version"] == records.SCHEMA_VERSION and m["shape"] == list(SHAPE)
  assert m["classes"]["sequence"] == list(tx.SEQUENCE_CLASSES["paper"])
  recs = _all_records(out)
  for split in convert.SPLITS:
    files = [s["file"] for s in m["shards"][split]]
    assert [os.path.basename(p) for p in convert.shard_paths(out, split)] == files
    n = m["num_records"][split]
    assert sum(s["records"] for s in m["shards"][split]) == n
    assert all(s["records"] <= 2 for s in m["shards"][split])
    for i, f in enumerate(files):
      assert f == f"{split}-{i:05d}-of-{len(files):05d}.array_record"
    in_split = [r for s, r in recs if s == split]
    for task in ("sequence", "plane", "contrast"):
      assert sum(m["counts"][split][task].values()) == n
      for cls, c in m["counts"][split][task].items():
        assert c == sum(r["labels"][task] == cls for r in in_split)
  # Shards hold only shard-named files; the report exists and names the tasks.
  assert sorted(glob.glob(os.path.join(out, "*.array_record"))) == sorted(
      convert.shard_paths(out, s)[i] for s in convert.SPLITS
      for i in range(len(m["shards"][s])))
  text = open(os.path.join(out, "report.md")).read()
  for task in tx.TASKS:
    assert f"## {task}" in text
  assert os.path.getsize(os.path.join(out, "montage_sequence.png")) > 1000


def test_split_is_by_patient(built):
  out, _ = built
  seen = {}
  for split, r in _all_records(out):
    assert r["split"] == split
    assert seen.setdefault(r["patient"], split) == split
  rows = list(csv.DictReader(open(os.path.join(out, "labels.csv"))))
  assert len(rows) == len(_all_records(out))
  by_stack = {r["stack"]: s for s, r in _all_records(out)}
  for row in rows:
    assert by_stack[row["stack"]] == row["split"]
  # The split function itself: deterministic, roughly the asked fractions.
  splits = [convert.split_of(f"p{i}", (0.8, 0.1, 0.1)) for i in range(4000)]
  assert splits == [convert.split_of(f"p{i}") for i in range(4000)]
  assert 0.77 < splits.count("train") / 4000 < 0.83
  assert 0.08 < splits.count("val") / 4000 < 0.12


def test_errors_csv_lists_broken_inputs(corpus, built):
  root, _ = corpus
  out, summary = built
  rows = list(csv.DictReader(open(os.path.join(out, "errors.csv"))))
  assert summary["skipped_by_scan"] == sum(r["stage"] == "scan" for r in rows)
  # Paths are salted hashes by default; locate maps every one back.
  assert all(len(r["path"]) == 16 for r in rows)
  where = convert.locate(root, out, [r["path"] for r in rows], salt=SALT)
  assert len(where) == len({r["path"] for r in rows})
  by_path = {where[r["path"]]: r for r in rows}
  for name in ("truncated.dcm", "random.dcm", "report_sr.dcm"):
    row = by_path[os.path.join("broken", name)]
    assert row["reason"], name
  assert "DICOM" in by_path[os.path.join("broken", "random.dcm")]["reason"]
  assert "SR" in by_path[os.path.join("broken", "report_sr.dcm")]["reason"] or \
      "not an image" in by_path[os.path.join("broken", "report_sr.dcm")]["reason"]
  # The CR images of the real dicomdir set are not cross-sectional: skipped.
  assert any(p.startswith(os.path.join("real", "77654033", "CR")) for p in by_path)
  for r in rows:
    assert not os.path.isabs(r["path"]) and root not in r["reason"]


def test_no_phi_anywhere_in_output(corpus, built):
  root, _ = corpus
  out, _ = built
  phi = _phi_strings(root)
  assert {"DOE^JOHN", "PID-SECRET-0001", "PID-SECRET-SR01"} <= phi
  phi |= {"DOE_JOHN", "ROE_JANE", "19600101", root}
  for path in glob.glob(os.path.join(out, "**", "*"), recursive=True) + \
      glob.glob(os.path.join(out, ".*", "**", "*"), recursive=True):
    if not os.path.isfile(path):
      continue
    data = open(path, "rb").read()
    # errors.csv included: its paths are hashed by default (the dicomdir
    # folder 77654033 is named by a PatientID).
    for s in phi | {"77654033"}:
      assert s.encode() not in data, (os.path.relpath(path, out), s)


def test_deterministic_parallel_rerun_and_resume(corpus, built, tmp_path):
  root, _ = corpus
  out1, _ = built
  out2 = str(tmp_path / "out2")
  # A second run with a process pool gives byte-identical outputs.
  build.build_shards(root, out2, shape=SHAPE, workers=2, salt=SALT,
                       records_per_shard=2, progress=False)
  names = ["manifest.json", "labels.csv", "errors.csv"] + [
      os.path.basename(p) for s in convert.SPLITS for p in convert.shard_paths(out1, s)]

  def same(a, b):
    for n in names:
      assert open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n), "rb").read(), n

  same(out1, out2)
  # Simulate a kill mid-way: half of the per-stack work lost, a shard missing,
  # a half-written shard and a stray temporary file left behind.
  cache = glob.glob(os.path.join(out2, convert.WORK_DIR, "*", "*.rec"))
  assert cache
  for p in sorted(cache)[::2]:
    os.remove(p)
  shard = convert.shard_paths(out2, "train")[0]
  os.remove(shard)
  open(shard + ".tmp", "wb").write(b"partial")
  open(os.path.join(out2, "train-00099-of-00100.array_record"), "wb").write(b"stale")
  summary = build.build_shards(root, out2, shape=SHAPE, workers=1, salt=SALT,
                                 records_per_shard=2, progress=False)
  assert summary["cached"] == len(cache) - len(sorted(cache)[::2])
  assert summary["converted"] == len(sorted(cache)[::2])
  same(out1, out2)
  assert not glob.glob(os.path.join(out2, "*.tmp"))
  assert not os.path.exists(os.path.join(out2, "train-00099-of-00100.array_record"))


def test_cli_hashed_paths_by_default_locate_and_clean_work(corpus, tmp_path,
                                                           capsys):
  from data_prep import build_shards as cli
  from data_prep import locate
  root, _ = corpus
  sub = str(tmp_path / "in")
  shutil.copytree(os.path.join(root, "broken"), os.path.join(sub, "broken"))
  shutil.copytree(os.path.join(root, "MOE_MAX"), os.path.join(sub, "MOE_MAX"))
  shutil.copytree(os.path.join(root, "real", "77654033"), os.path.join(sub, "77654033"))
  out = str(tmp_path / "out")
  assert cli.main(["--input", sub, "--out", out, "--shape", "2,8,8", "--workers", "1",
                   "--clean-work", "--quiet"]) == 0
  rows = list(csv.DictReader(open(os.path.join(out, "errors.csv"))))
  # 3 broken files, 3 CR images and the 1-slice fragment that a 202.5 mm gap
  # cuts off the CT series (all at scan; its 3-slice part converts).
  assert len(rows) == 7 and all(r["stage"] == "scan" for r in rows)
  assert sum("fragment of 1 slice(s)" in r["reason"] for r in rows) == 1
  for r in rows:
    assert len(r["path"]) == 16 and "broken" not in r["path"] and ".dcm" not in r["reason"]
  # With hashed paths no PHI string (folder names included) is left anywhere.
  phi = _phi_strings(sub) | {"MOE_MAX", "77654033", sub}
  assert "77654033" in _phi_strings(sub)   # the folder is named by PatientID
  for path in glob.glob(os.path.join(out, "**", "*"), recursive=True):
    if os.path.isfile(path):
      data = open(path, "rb").read()
      assert not [s for s in phi if s.encode() in data], path
  assert not os.path.exists(os.path.join(out, convert.WORK_DIR))
  m = json.load(open(os.path.join(out, "manifest.json")))
  assert m["shape"] == [2, 8, 8] and sum(m["num_records"].values()) == 2
  # locate prints (never writes) the path behind every errors.csv row.
  capsys.readouterr()
  before = sorted(os.listdir(out))
  assert locate.main(["--input", sub, "--shards", out]) == 0
  printed = dict(line.split("\t")[:2] for line in capsys.readouterr().out.splitlines())
  assert sorted(printed) == sorted(r["path"] for r in rows)
  assert os.path.join("broken", "random.dcm") in printed.values()
  assert os.path.join("77654033", "CT2", "17106") in printed.values()
  assert sorted(os.listdir(out)) == before  # nothing written
  # --plain-paths writes the relative paths instead.
  out2 = str(tmp_path / "out2")
  assert cli.main(["--input", sub, "--out", out2, "--shape", "2,8,8", "--workers",
                   "1", "--plain-paths", "--quiet"]) == 0
  rows2 = list(csv.DictReader(open(os.path.join(out2, "errors.csv"))))
  assert sorted(r["path"] for r in rows2) == sorted(printed.values())
  assert cli.main(["--input", str(tmp_path / "nope"), "--out", out, "--quiet"]) == 2
