"""Dataset priors and curator overrides."""
import json

import pytest

from radnet_jax.labels import OTHER, Priors, apply_overrides, find_override, label, load_overrides
from radnet_jax.labels.taxonomy import Taxonomy


def test_builtin_prior_fills_only_unknown_tasks():
  priors = Priors.builtin()
  rec = {"Modality": "CT", "collection_id": "nlst", "SeriesDescription": "0,OPL,GE,LSQX"}
  labels = label(rec, priors=priors)
  assert labels["contrast"].value == "no"
  assert labels["contrast"].provenance == "prior:collection_id=nlst,Modality=ct"
  assert labels["coverage"].value == ("lung",)
  # The record's own evidence wins over the prior.
  own = label({**rec, "SeriesDescription": "CHEST W CONTRAST",
               "BodyPartExamined": "ABDOMEN"}, priors=priors)
  assert own["contrast"].value == "yes" and own["contrast"].provenance.startswith("desc:")
  assert own["coverage"].value == ("liver", "kidney", "intestine")
  # Conditions must all match: NLST priors are for CT only.
  mr = label({"Modality": "MR", "collection_id": "NLST"}, priors=priors)
  assert not mr["contrast"].known
  # Without priors the same record stays unknown.
  assert not label(rec)["contrast"].known


def test_collection_names_fold_case_and_punctuation():
  labels = label({"Modality": "CT", "collection_id": "TCGA-LIHC"}, priors=Priors.builtin())
  assert labels["coverage"].value == ("liver",)
  assert labels["coverage"].provenance.startswith("prior:collection_id=tcga_lihc")


def test_priors_from_csv_take_precedence(tmp_path):
  path = tmp_path / "my_priors.csv"
  path.write_text("collection_id,Modality,sequence,contrast,coverage\n"
                  "nlst,CT,,yes,\n"
                  "site_a,MR,PD,,pelvis\n")
  priors = Priors.from_file(str(path))
  nlst = label({"Modality": "CT", "collection_id": "nlst"}, priors=priors)
  assert nlst["contrast"].value == "yes"
  assert nlst["contrast"].provenance.endswith("(my_priors.csv)")
  assert nlst["coverage"].value == ("lung",)          # still from the built-in table
  site = label({"Modality": "MR", "collection_id": "Site A"}, "extended", priors)
  assert site["sequence"].value == "PD" and site["coverage"].value == ("pelvis",)
  # PD is not a paper class: the prior yields OTHER there.
  assert label({"Modality": "MR", "collection_id": "site_a"}, "paper",
               priors)["sequence"].value == OTHER
  only_user = Priors.from_file(str(path), include_builtin=False)
  assert not label({"Modality": "CT", "collection_id": "nlst"},
                   priors=only_user)["coverage"].known


def test_priors_from_json(tmp_path):
  path = tmp_path / "p.json"
  path.write_text(json.dumps({"my_brain_set": {"coverage": "brain", "Modality": "MR"}}))
  labels = label({"Modality": "MR", "collection_id": "my_brain_set"},
                 priors=Priors.from_file(str(path), include_builtin=False))
  assert labels["coverage"].value == ("brain",)


def test_bad_prior_value_names_file_and_row(tmp_path):
  path = tmp_path / "bad.csv"
  path.write_text("collection_id,contrast\nx,maybe\n")
  with pytest.raises(ValueError, match=r"bad.csv: row 1: bad contrast value 'maybe'"):
    Priors.from_file(str(path))


def test_load_and_apply_overrides(tmp_path):
  path = tmp_path / "labels.csv"
  path.write_text("series,stack,sequence,plane,contrast,coverage,spacing,sequence_provenance\n"
                  "aaaa1111bbbb2222,,t2-flair,,yes,liver|kidney,,ignored\n"
                  ",stackkey01,unknown,axial,,none,2.5,\n")
  overrides = load_overrides(str(path))
  assert overrides["aaaa1111bbbb2222"] == {"sequence": "T2-FLAIR", "contrast": "yes",
                                           "coverage": ("liver", "kidney")}
  assert overrides["stackkey01"] == {"sequence": None, "plane": "AX", "coverage": (),
                                     "spacing": 2.5}
  labels = label({"Modality": "MR", "SeriesDescription": "AX T1 +C"})
  row = find_override(overrides, series="aaaa1111bbbb2222", stack="other")
  out = apply_overrides(labels, row)
  assert out["sequence"].value == "T2-FLAIR"
  assert out["sequence"].provenance == "override:labels.csv"
  assert out["plane"] is labels["plane"]               # untouched tasks keep their rule
  cleared = apply_overrides(labels, find_override(overrides, stack="stackkey01"))
  assert not cleared["sequence"].known
  assert cleared["sequence"].provenance == "unknown:override:labels.csv"
  assert Taxonomy("paper").encode(cleared)["sequence"] == -1
  assert cleared["coverage"].value == () and cleared["spacing"].value == 2.5
  assert find_override(overrides, series="nope") is None


@pytest.mark.parametrize("content,message", [
    ("series,sequence\nabc,T3\n", r"labels.csv:2: bad sequence value 'T3'"),
    ("series,contrast\nabc,yes\nabc,no\n", r"labels.csv:3: 'abc' already overridden on line 2"),
    ("series,coverage\nabc,liver|spleen\n", r"labels.csv:2: bad coverage band"),
    ("series,spacing\nabc,-1\n", r"labels.csv:2: bad spacing value"),
    ("path,sequence\nx,T1\n", r"labels.csv: needs a 'series' or 'stack' column"),
    ("series,notes\nabc,hello\n", r"labels.csv: no task column"),
])
def test_bad_overrides_name_file_line_and_value(tmp_path, content, message):
  path = tmp_path / "labels.csv"
  path.write_text(content)
  with pytest.raises(ValueError, match=message):
    load_overrides(str(path))
