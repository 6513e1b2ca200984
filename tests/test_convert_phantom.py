"""Conversion of a tiny phantom corpus: labels vs truth.csv, curator overrides."""
import csv
import os

import pytest

from radnet_jax.shards import build
from radnet_jax.shards import convert
from radnet_jax.privacy import hash_id

phantom = pytest.importorskip("radnet_jax.phantom")
if not hasattr(phantom, "make_corpus"):
  pytest.skip("radnet_jax.phantom.make_corpus not available", allow_module_level=True)

SALT = "phantom-convert-salt"
SHAPE = (4, 16, 16)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("phantom"))
  phantom.make_corpus(root, n=8, seed=3, small=True, workers=1, progress=False,
                      noise=phantom.HeaderNoise.off())
  out = str(tmp_path_factory.mktemp("shards"))
  summary = build.build_shards(os.path.join(root, "dicom"), out, shape=SHAPE,
                                 workers=1, salt=SALT, progress=False)
  truth = {hash_id(r["series_uid"], SALT): r
           for r in csv.DictReader(open(os.path.join(root, "truth.csv")))}
  return root, out, summary, truth


def _records(out):
  return [r for s in convert.SPLITS for r in convert.iter_records(out, s)]


def test_phantom_labels_match_truth(converted):
  _, out, summary, truth = converted
  recs = _records(out)
  assert summary["failed"] == 0 and len(recs) == len(truth) == 8
  for r in recs:
    t = truth[r["series"]]
    assert r["patient"] == hash_id(t["patient_id"], SALT)
    assert r["modality"] == t["modality"]
    # Without header noise the acquisition tags decide sequence and plane: the
    # stored label must be the truth. Contrast may stay unknown (absent
    # contrast tags are no proof of a plain scan), but is never wrong.
    for task in ("sequence", "plane"):
      assert r["labels"][task] == t[task], (task, r["provenance"][task])
    assert r["labels"]["contrast"] in (t["contrast"], "unknown")
    if r["labels"]["contrast"] == "unknown":
      assert r["targets"]["contrast"] == -1
    assert r["geometry"]["orig_shape"][0] == int(t["n_slices"])
  # Patients never straddle splits.
  split_of = {}
  for r in recs:
    assert split_of.setdefault(r["patient"], r["split"]) == r["split"]


def test_overrides_win_are_recorded_and_reuse_volumes(converted, tmp_path):
  root, out, summary, _ = converted
  rows = list(csv.DictReader(open(os.path.join(out, "labels.csv"))))
  target = rows[0]
  new_seq = "T2-FLAIR" if target["sequence"] != "T2-FLAIR" else "T1"
  # The curator keeps only the corrected row of labels.csv.
  path = str(tmp_path / "curated.csv")
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(target))
    w.writeheader()
    w.writerow({**target, "sequence": new_seq, "plane": "", "contrast": "",
                "coverage": "", "spacing": "", "contrast_provenance": "edited"})
  before = {r["stack"]: r for r in _records(out)}
  again = build.build_shards(os.path.join(root, "dicom"), out, shape=SHAPE,
                               workers=1, salt=SALT, overrides=path, progress=False)
  assert again["converted"] == 0 and again["cached"] == summary["converted"]
  after = {r["stack"]: r for r in _records(out)}
  r = after[target["stack"]]
  assert r["labels"]["sequence"] == new_seq
  assert r["provenance"]["sequence"] == "override:curated.csv"
  assert r["targets"]["sequence"] == ("CT", "T1", "T2", "T1-FLAIR",
                                      "T2-FLAIR").index(new_seq)
  assert r["labels"]["plane"] == before[target["stack"]]["labels"]["plane"]
  assert (r["volume"] == before[target["stack"]]["volume"]).all()
  for key, rec in after.items():
    if key != target["stack"]:
      assert rec["labels"] == before[key]["labels"]
  m = convert.read_manifest(out)
  assert m["config"]["overrides_sha256"] and "curated" not in str(m["config"])
  text = open(os.path.join(out, "report.md")).read()
  assert "override:curated.csv" in text
