"""Labelling a metadata index (CSV / Parquet) with data_prep.label_index."""
import numpy as np
import pandas as pd
import pytest

from data_prep import label_index as cli
from radnet_jax.labels import label
from radnet_jax.labels.index import OUTPUT_COLUMNS, label_table, read_index

ROWS = [
    {"PatientName": "DOE^JANE", "PatientID": "P1", "SeriesInstanceUID": "1.2.3.1",
     "collection_id": "nlst", "Modality": "CT", "BodyPartExamined": "CHEST",
     "SeriesDescription": "1,OPL,GE,LSQX", "StudyDescription": "NLST-LSS",
     "SliceThickness": 2.5},
    {"PatientName": "DOE^JOHN", "PatientID": "P2", "SeriesInstanceUID": "1.2.3.2",
     "collection_id": "x", "Modality": "MR", "BodyPartExamined": "BRAIN",
     "SeriesDescription": "AX T1 POST GAD", "StudyDescription": "MRI BRAIN W/WO",
     "SliceThickness": None},
    {"PatientName": "", "PatientID": "P3", "SeriesInstanceUID": "1.2.3.3",
     "collection_id": "x", "Modality": "MR", "BodyPartExamined": None,
     "SeriesDescription": "SAG T1 FLAIR", "StudyDescription": None,
     "SliceThickness": 5.0},
    {"PatientName": "", "PatientID": "P4", "SeriesInstanceUID": "1.2.3.4",
     "collection_id": "x", "Modality": "SEG", "BodyPartExamined": "LIVER",
     "SeriesDescription": "Segmentation", "StudyDescription": None,
     "SliceThickness": None},
    {"PatientName": "", "PatientID": "P5", "SeriesInstanceUID": "1.2.3.5",
     "collection_id": "x", "Modality": "MR", "BodyPartExamined": None,
     "SeriesDescription": "localizer", "StudyDescription": None, "SliceThickness": None},
]
EXPECTED = {  # row -> (sequence, plane, contrast, coverage, spacing)
    0: ("CT", "unknown", "no", "lung", "2.5"),
    1: ("T1", "AX", "yes", "brain", "unknown"),
    2: ("T1-FLAIR", "SAG", "unknown", "unknown", "5"),
    3: ("other", "unknown", "unknown", "unknown", "unknown"),
    4: ("other", "unknown", "unknown", "unknown", "unknown"),
}


def _frame(repeat: int = 3) -> pd.DataFrame:
  return pd.DataFrame(ROWS * repeat)


def _check(out: pd.DataFrame, repeat: int = 3):
  assert len(out) == len(ROWS) * repeat
  for i in range(len(out)):
    got = tuple(str(out.iloc[i][t]) for t in ("sequence", "plane", "contrast",
                                              "coverage", "spacing"))
    assert got == EXPECTED[i % len(ROWS)], (i, got)
  assert out.iloc[0]["contrast_provenance"] == "prior:collection_id=nlst,Modality=ct"
  assert out.iloc[1]["sequence_provenance"] == "desc:SeriesDescription~'T1'"


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_cli_on_csv_and_parquet(tmp_path, capsys, suffix):
  src = tmp_path / f"index.{suffix}"
  df = _frame()
  if suffix == "csv":
    df.to_csv(src, index=False)
  else:
    df.to_parquet(src, index=False)
  dst = tmp_path / f"out.{suffix}"
  assert cli.main(["--index", str(src), "--out", str(dst)]) == 0
  out = read_index(str(dst))
  # Input columns kept (minus direct identifiers), label + provenance columns added.
  assert "PatientName" not in out.columns
  assert list(out.columns) == [c for c in df.columns if c != "PatientName"] + list(OUTPUT_COLUMNS)
  assert out["SeriesInstanceUID"].tolist() == df["SeriesInstanceUID"].tolist()
  _check(out)
  printed = capsys.readouterr().out
  assert "sequence" in printed and "T1-FLAIR" in printed and "15 rows labelled" in printed
  assert "DOE" not in printed


def test_extended_taxonomy_and_hashed_ids(tmp_path, monkeypatch):
  monkeypatch.setenv("RADNET_SALT", "s3cret")
  src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
  pd.DataFrame([{"PatientID": "P9", "SeriesInstanceUID": "1.2.9", "Modality": "MR",
                 "SeriesDescription": "ep2d_diff_b1000"}]).to_csv(src, index=False)
  assert cli.main(["--index", str(src), "--out", str(dst), "--taxonomy", "extended",
                   "--hash-ids"]) == 0
  out = pd.read_csv(dst)
  assert out.loc[0, "sequence"] == "DWI"
  assert "PatientID" not in out.columns and "SeriesInstanceUID" not in out.columns
  assert len(out.loc[0, "SeriesHash"]) == 16 and out.loc[0, "SeriesHash"] != "1.2.9"


def test_dedup_matches_row_by_row_labelling():
  df = _frame(repeat=4).sample(frac=1.0, random_state=0).reset_index(drop=True)
  df["ImageOrientationPatient"] = [[0, 1, 0, 0, 0, -1] if i % 2 else None
                                   for i in range(len(df))]
  out = label_table(df, "paper")
  for i, rec in enumerate(df.to_dict("records")):
    labels = label(rec, "paper")
    assert out.loc[i, "plane"] == (labels["plane"].value or "unknown")
    assert out.loc[i, "sequence_provenance"] == labels["sequence"].provenance


def test_cli_reports_bad_input(tmp_path, capsys):
  assert cli.main(["--index", str(tmp_path / "missing.csv"),
                   "--out", str(tmp_path / "o.csv")]) == 2
  assert "missing.csv" in capsys.readouterr().err


def test_real_idc_index_sample(tmp_path):
  idc = pytest.importorskip("idc_index_data")
  path = getattr(idc, "IDC_INDEX_PARQUET_FILEPATH", None)
  if path is None:
    pytest.skip("idc-index-data without a Parquet index")
  cols = ["collection_id", "Modality", "SOPClassUID", "BodyPartExamined",
          "SeriesDescription", "StudyDescription", "SeriesInstanceUID"]
  df = pd.read_parquet(path, columns=cols).sample(n=20000, random_state=0)
  out = label_table(df, "paper", priors=None)
  assert len(out) == len(df)
  for task in ("sequence", "plane", "contrast", "coverage", "spacing"):
    assert out[task].notna().all()
  ct = out[out["Modality"] == "CT"]
  assert (ct["sequence"] == "CT").mean() > 0.9          # CT minus scouts/SC
  assert set(out.loc[out["Modality"].isin(["SR", "SEG"]), "sequence"]) <= {"other"}
  chest = out[(out["BodyPartExamined"] == "CHEST") & (out["Modality"] == "CT")]
  assert (chest["coverage"] == "lung").all()
  mr = out[out["Modality"] == "MR"]
  assert np.isin(mr["sequence"], ["T1", "T2", "T1-FLAIR", "T2-FLAIR", "other",
                                  "unknown"]).all()
  assert (mr["sequence"].isin(["T1", "T2"])).mean() > 0.4
