"""radnet_jax.predict: the header-QA report on a phantom DICOM folder, CLI, NIfTI."""
import csv
import glob
import os
import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from tests.test_inference_load import INPUT_SHAPE, make_checkpoint

SALT = "test-salt"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """4 small phantom MR series (AX, AX, COR, SAG; 2 with contrast), no header
  noise, plus a deliberately wrong header, a junk file and a truncated file."""
  from radnet_jax import phantom
  root = str(tmp_path_factory.mktemp("phantom"))
  phantom.make_corpus(root, n=4, seed=1, workers=1, small=True, progress=False,
                      noise=phantom.HeaderNoise.off())
  truth = phantom.load_truth(os.path.join(root, "truth.csv"), SALT)
  dicom_dir = os.path.join(root, "dicom")
  # Deliberately wrong header: a plain (no contrast) series claims a contrast agent.
  files = {}
  for p in glob.glob(os.path.join(dicom_dir, "**", "*"), recursive=True):
    if os.path.isfile(p):
      ds = pydicom.dcmread(p, stop_before_pixels=True)
      files.setdefault(str(ds.SeriesInstanceUID), []).append(p)
  plain = sorted(u for u in files if _h(u) in truth and truth[_h(u)]["contrast"] == "no")
  wrong = plain[0]
  for p in files[wrong]:
    ds = pydicom.dcmread(p)
    ds.ContrastBolusAgent = "GADAVIST"
    ds.ContrastBolusRoute = "IV"
    ds.save_as(p)
  with open(os.path.join(dicom_dir, "notes.txt"), "w") as f:
    f.write("not a DICOM file\n")
  src = files[plain[-1]][0]
  with open(src, "rb") as f:
    head = f.read(400)
  with open(os.path.join(dicom_dir, "truncated.dcm"), "wb") as f:
    f.write(head)
  return {"root": root, "dicom": dicom_dir, "truth": truth, "wrong": _h(wrong),
          "patients": sorted({r["patient_id"] for r in truth.values()}),
          "uids": sorted(files) + sorted(r["study_uid"] for r in truth.values())}


def _h(uid):
  from radnet_jax.privacy import hash_id
  return hash_id(uid, SALT)


@pytest.fixture(scope="module")
def forced_ckpt(tmp_path_factory):
  """A network that always says contrast "no" and plane "AX" (probability ~1)."""
  wd = str(tmp_path_factory.mktemp("forced"))
  make_checkpoint(wd, force={"contrast": 0, "plane": 0})
  return wd


def test_report_flags_headers_the_network_contradicts(corpus, forced_ckpt):
  import radnet_jax
  from radnet_jax.labels import taxonomy as tax
  report = radnet_jax.predict(forced_ckpt, corpus["dicom"], salt=SALT, keep_inputs=True,
                              batch_size=3, qa_tasks=("plane", "contrast"),
                              hash_paths=False)
  rows = {r["series_hash"]: r for r in report.rows}
  truth = corpus["truth"]
  assert set(rows) == set(truth)   # every image series predicted, keyed like truth.csv
  for c in ("pred_sequence", "prob_sequence", "label_sequence", "provenance_sequence",
            "disagree_sequence", "p_sequence_T2-FLAIR", "p_plane_SAG", "pred_coverage",
            "p_coverage_pelvis", "pred_spacing_mm", "label_spacing_mm", "qa_flag",
            "qa_tasks", "qa_confidence"):
    assert c in report.columns
  for r in rows.values():
    for t in tax.CLASSIFICATION_TASKS:
      ps = [r[f"p_{t}_{c}"] for c in tax.Taxonomy("paper").classes(t)]
      assert sum(ps) == pytest.approx(1.0, abs=1e-6)
      assert r[f"prob_{t}"] == pytest.approx(max(ps))
    assert r["pred_plane"] == "AX" and r["pred_contrast"] == "no"
    # Metadata labels are right on a noise-free corpus (except the one we broke).
    assert r["label_plane"] == truth[r["series_hash"]]["plane"]
    assert r["provenance_plane"].startswith("iop:")
  # The plane flag fires exactly on the non-axial series.
  assert {h for h, r in rows.items() if r["disagree_plane"]} == \
      {h for h, t in truth.items() if t["plane"] != "AX"}
  # Contrast: true contrast series + the plain series whose header claims contrast.
  wrong = rows[corpus["wrong"]]
  assert wrong["label_contrast"] == "yes" and "ContrastBolusAgent" in wrong["provenance_contrast"]
  assert wrong["disagree_contrast"] and "contrast" in wrong["qa_tasks"].split("|")
  expected = {h for h, t in truth.items() if t["contrast"] == "yes"} | {corpus["wrong"]}
  assert {h for h, r in rows.items() if r["disagree_contrast"]} == expected
  non_axial = {h for h, t in truth.items() if t["plane"] != "AX"}
  assert {r["series_hash"] for r in report.flagged} == expected | non_axial
  for r in report.flagged:
    assert r["qa_confidence"] > 0.99
  # Inputs kept for display: the model input of each stack.
  assert all(v.shape == INPUT_SHAPE for v in report.inputs.values())
  # The junk and the truncated file are reported, not fatal.
  reasons = {s.path: s.reason for s in report.skipped}
  assert "notes.txt" in reasons and "truncated.dcm" in reasons
  assert not any(os.path.isabs(p) for p in reasons)


def test_cli_writes_phi_free_csvs(corpus, forced_ckpt, tmp_path, capsys):
  from radnet_jax.cli import predict as cli
  secrets = corpus["patients"] + corpus["uids"] + [corpus["root"]]
  # Default: skipped files by salted path hash, so no identifier anywhere
  # (the phantom's folders are named by PatientID, as many exports are).
  out = str(tmp_path / "qa" / "predictions.csv")
  assert cli.main(["--checkpoint", forced_ckpt, "--input", corpus["dicom"], "--out", out,
                   "--salt", SALT, "--threshold", "0.95", "--no-progress"]) == 0
  text = open(out).read()
  rows = list(csv.DictReader(open(out)))
  assert len(rows) == 4
  assert {r["series_hash"] for r in rows} == set(corpus["truth"])
  assert all(r["qa_flag"] in ("0", "1") for r in rows)
  skipped_text = open(str(tmp_path / "qa" / "predictions_skipped.csv")).read()
  for secret in secrets:
    assert secret not in text and secret not in skipped_text
  assert "notes.txt" not in skipped_text and len(skipped_text.splitlines()) > 2
  summary = capsys.readouterr().out
  assert "4 stack(s) predicted" in summary and "flagged by header QA" in summary
  # --plain-paths (for de-identified archives): skipped files by their path
  # relative to --input; the header-derived CSV stays identifier-free.
  out2 = str(tmp_path / "plain" / "predictions.csv")
  assert cli.main(["--checkpoint", forced_ckpt, "--input", corpus["dicom"], "--out", out2,
                   "--salt", SALT, "--no-progress", "--plain-paths"]) == 0
  text = open(out2).read()
  skipped_text = open(str(tmp_path / "plain" / "predictions_skipped.csv")).read()
  for secret in secrets:
    assert secret not in text
  assert "notes.txt" in skipped_text and corpus["root"] not in skipped_text
  # Bad checkpoint path: a clear error and exit code 2, no traceback.
  assert cli.main(["--checkpoint", str(tmp_path / "none"), "--input", corpus["dicom"],
                   "--out", out]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_cli_predicts_anonymised_headers(corpus, forced_ckpt, tmp_path):
  # Real anonymisers blank SOPClassUID and PatientID, drop InstanceNumber and
  # SliceThickness and replace UIDs by other strings: every series is still
  # predicted, and the replacement UIDs never appear raw.
  import warnings
  from radnet_jax.cli import predict as cli
  src, dst = corpus["dicom"], str(tmp_path / "anon")
  uids = {}
  for p in sorted(glob.glob(os.path.join(src, "**", "*"), recursive=True)):
    if not os.path.isfile(p):
      continue
    try:
      ds = pydicom.dcmread(p)
    except Exception:  # the corpus's junk / truncated files: left out here
      continue
    if "PixelData" not in ds or "ImagePositionPatient" not in ds:
      continue
    if "LOCALIZER" in list(ds.get("ImageType", [])):   # skipped by design, anonymised or not
      continue
    series = uids.setdefault(str(ds.SeriesInstanceUID), f"ANON-SERIES-{len(uids)}")
    ds.SeriesInstanceUID, ds.StudyInstanceUID = series, "ANON-STUDY"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = \
        f"ANON-IMG-{os.path.basename(p)}"
    ds.SOPClassUID, ds.PatientID = "", ""
    for key in ("InstanceNumber", "SliceThickness"):
      if key in ds:
        delattr(ds, key)
    out_file = os.path.join(dst, os.path.relpath(p, src))
    os.makedirs(os.path.dirname(out_file), exist_ok=True)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      ds.save_as(out_file)
  out = str(tmp_path / "qa" / "predictions.csv")
  assert cli.main(["--checkpoint", forced_ckpt, "--input", dst, "--out", out,
                   "--salt", SALT, "--no-progress"]) == 0
  rows = list(csv.DictReader(open(out)))
  assert len(rows) == 4
  assert {r["series_hash"] for r in rows} == {_h(u) for u in uids.values()}
  text = open(out).read()
  assert not any(u in text for u in uids.values())


def test_qa_row_thresholds():
  from radnet_jax import api
  from radnet_jax.labels.taxonomy import Label, Taxonomy
  tx = Taxonomy("paper")
  p = np.array([0.1, 0.8, 0.1])      # network: COR with probability 0.8
  labels = {"plane": Label("AX", "iop:ImageOrientationPatient"),
            "coverage": Label(("lung",), "bpe:BodyPartExamined='CHEST'")}
  cov = np.full(9, -5.0)
  cov[3] = 5.0   # lung
  cov[5] = 1.0   # liver, p = 0.73 (against the header, not confident)
  out = {"plane": np.log(p), "coverage": cov}
  r = api.qa_row(out, labels, tx, threshold=0.9)
  assert r["pred_plane"] == "COR" and r["prob_plane"] == pytest.approx(0.8)
  assert r["disagree_plane"] and not r["qa_flag"]
  assert r["pred_coverage"] == "lung|liver" and r["disagree_coverage"]
  r = api.qa_row(out, labels, tx, threshold=0.7)
  assert r["qa_flag"] and r["qa_tasks"] == "plane|coverage"
  assert r["qa_confidence"] == pytest.approx(0.8)
  r = api.qa_row(out, labels, tx, threshold=0.7, qa_tasks=("coverage",))
  assert r["qa_tasks"] == "coverage"
  # Unknown or out-of-taxonomy header labels never disagree.
  r = api.qa_row(out, {"plane": Label(None, "unknown:no evidence")}, tx, threshold=0.5)
  assert not r["disagree_plane"] and not r["qa_flag"] and r["label_plane"] == "unknown"


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix not installed")
def test_nifti_input_matches_dicom_orientation(corpus, forced_ckpt, tmp_path):
  """A dcm2niix NIfTI of a series loads in the same canonical orientation as
  the DICOM series, and predicts without metadata labels."""
  import radnet_jax
  from radnet_jax import api, dicom
  res = dicom.scan(corpus["dicom"], salt=SALT)
  for stack in res.stacks:
    if stack.record.get("SeriesHash") in corpus["truth"] and \
        corpus["truth"][stack.record["SeriesHash"]]["plane"] != "AX":
      break
  src = tmp_path / "series"
  src.mkdir()
  for p in stack.files:
    shutil.copy(p, src / os.path.basename(p))
  out = tmp_path / "nii"
  out.mkdir()
  subprocess.run(["dcm2niix", "-z", "y", "-f", "vol", "-o", str(out), str(src)],
                 check=True, capture_output=True)
  nii = str(out / "vol.nii.gz")
  vol_d = dicom.load_volume(stack)
  vol_n = api.load_nifti(nii, modality="MR")
  assert vol_n.voxels.shape == vol_d.voxels.shape
  np.testing.assert_allclose(vol_n.affine, vol_d.affine, atol=1e-2)
  np.testing.assert_allclose(vol_n.voxels, vol_d.voxels, rtol=1e-4, atol=1e-2)
  report = radnet_jax.predict(forced_ckpt, str(out), salt=SALT, modality="MR")
  assert len(report.rows) == 1
  r = report.rows[0]
  assert r["source"] == "nifti" and r["modality"] == "MR"
  assert r["label_plane"] == "unknown" and not r["qa_flag"]
  assert "vol" not in r["series_hash"]   # hashed file name
  one = radnet_jax.predict(forced_ckpt, nii, salt=SALT)   # a single file; modality guessed
  assert one.rows[0]["modality_source"] == "guessed from intensities"


def test_predict_streams_classic_stacks(corpus, forced_ckpt, stack_loads):
  # radnet_jax.predict on a DICOM folder converts through the shard
  # converter's streaming path (slices decoded straight onto the shard grid),
  # never through the full-resolution volume.
  import radnet_jax
  report = radnet_jax.predict(forced_ckpt, corpus["dicom"], salt=SALT, batch_size=3)
  assert len(report.rows) == len(corpus["truth"]) > 0
  assert stack_loads == {"resampled": len(report.rows), "full": 0}


def test_cli_unusable_input_is_one_line_not_a_traceback(forced_ckpt, corpus, tmp_path, capsys):
  from radnet_jax.cli import predict as cli
  out = str(tmp_path / "p.csv")
  assert cli.main(["--checkpoint", forced_ckpt, "--input", str(tmp_path / "nope"),
                   "--out", out, "--no-progress"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "input does not exist" in err and "\n" not in err
  with pytest.raises(SystemExit) as e:   # argparse: before the checkpoint is loaded
    cli.main(["--checkpoint", forced_ckpt, "--input", corpus["dicom"], "--out", out,
              "--threshold", "5", "--no-progress"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.endswith("--threshold: must be a probability in (0, 1], got '5'")
  assert "Traceback" not in err
