"""Label-balanced selection from a labelled IDC index and its download lists."""
import json
import os
import re

import numpy as np
import pandas as pd
import pytest

from radnet_jax.labels import selection

idc_index_data = pytest.importorskip("idc_index_data")


def _real_rows(n: int = 400) -> pd.DataFrame:
  """The first n/4 CT and 3n/4 MR rows of the installed IDC index (streamed)."""
  import pyarrow.parquet as pq
  pf = pq.ParquetFile(idc_index_data.IDC_INDEX_PARQUET_FILEPATH)
  want = {"CT": n // 4, "MR": n - n // 4}
  got = {"CT": [], "MR": []}
  for batch in pf.iter_batches(batch_size=8192, columns=list(selection.IDC_COLUMNS)):
    df = batch.to_pandas()
    for mod in got:
      got[mod].append(df[df.Modality == mod])
    if all(sum(map(len, got[m])) >= want[m] for m in want):
      break
  parts = [pd.concat(got[m]).head(want[m]) for m in ("CT", "MR")]
  return pd.concat(parts).reset_index(drop=True)


def _labelled(n: int = 400) -> pd.DataFrame:
  """Real IDC rows with deterministic synthetic labels of known frequencies."""
  df = _real_rows(n)
  i = np.arange(len(df))
  # sequence: T2-FLAIR is rare (5 rows), T1 common; unknown for every 7th.
  seq = np.where(i % 2 == 0, "T1", "T2").astype(object)
  seq[(i % 80) == 3] = "T2-FLAIR"
  seq[(i % 7) == 0] = "unknown"
  seq[df.Modality.to_numpy() == "CT"] = "CT"
  df["sequence"] = seq
  df["plane"] = np.where(i % 10 == 0, "SAG", np.where(i % 3 == 0, "COR", "AX"))
  df["contrast"] = np.where(i % 4 == 0, "yes", "no")
  df["coverage"] = np.where(i % 5 == 0, "liver|kidney|intestine",
                            np.where(i % 5 == 1, "unknown", "brain"))
  df["spacing"] = 1.25
  return df


def test_idc_index_has_the_columns_we_use():
  schema_path = os.path.join(os.path.dirname(idc_index_data.__file__),
                             "idc_index_schema.json")
  with open(schema_path) as f:
    names = {c["name"] for c in json.load(f)["columns"]}
  assert set(selection.IDC_COLUMNS) <= names
  rows = _real_rows(50)
  assert rows[selection.URL_COLUMN].str.match(r"^s3://[\w.-]+/[0-9a-f-]{36}/\*$").all()
  # The URL's folder is the crdc_series_uuid (what s5cmd_lines relies on).
  assert (rows[selection.URL_COLUMN].str.split("/").str[3]
          == rows[selection.UUID_COLUMN]).all()


def test_balanced_selection_counts():
  df = _labelled()
  crit = selection.Criteria(per_class=6, modalities=None, min_instances=0,
                            original_only=False, seed=3)
  sel = selection.select(df, crit)
  s = sel.summary.set_index(["task", "class"])
  # Every cell reaches min(per_class, available); rare cells get everything.
  assert (s["selected"] >= s["target"]).all()
  assert s.loc[("sequence", "T2-FLAIR"), "available"] == int(
      (df.sequence == "T2-FLAIR").sum())
  assert ("sequence", "unknown") not in s.index
  assert ("coverage", "liver") in s.index and ("coverage", "brain") in s.index
  # The selection is small: bounded by cells x per_class.
  assert len(sel.table) <= len(s) * 6
  assert sel.table[selection.UUID_COLUMN].is_unique
  assert sel.table["reason"].str.match(r"^\w+=[\w-]+$").all()


def test_deterministic_under_row_order_and_seed():
  df = _labelled()
  crit = selection.Criteria(per_class=5, modalities=None, min_instances=0, seed=11)
  a = selection.select(df, crit).table[selection.UUID_COLUMN]
  b = selection.select(df.sample(frac=1.0, random_state=0), crit).table[
      selection.UUID_COLUMN]
  assert list(a) == list(b)
  c = selection.select(df, selection.Criteria(per_class=5, modalities=None,
                                              min_instances=0, seed=12)).table
  assert set(c[selection.UUID_COLUMN]) != set(a)


def test_filters():
  df = _labelled()
  df.loc[:9, "analysis_result_id"] = "some_analysis"
  crit = selection.Criteria(per_class=1000, modalities=("MR",), min_instances=30,
                            require_known=("sequence",), original_only=True)
  sel = selection.select(df, crit)
  t = sel.table
  assert len(t) > 0 and (t.Modality == "MR").all()
  assert (t.instanceCount >= 30).all()
  assert t.analysis_result_id.isna().all()
  assert (t.sequence != "unknown").all()
  # per_class above availability: everything eligible with a known cell is taken.
  ok = selection.eligible(df, crit)
  assert len(t) == int(ok.sum())


def test_max_per_patient_and_budget():
  df = _labelled()
  crit = selection.Criteria(per_class=50, modalities=None, min_instances=0,
                            max_per_patient=1)
  t = selection.select(df, crit).table
  assert t.PatientID.is_unique
  t2 = selection.select(df, selection.Criteria(per_class=50, modalities=None,
                                               min_instances=0, max_series=7)).table
  assert len(t2) == 7


def test_join_download_columns_from_idc_index():
  df = _labelled(60)
  idc = df[list(selection.IDC_COLUMNS)]
  bare = df[[selection.UID_COLUMN, "sequence", "plane", "contrast", "coverage"]]
  joined = selection.attach_download_columns(bare, idc)
  assert list(joined[selection.URL_COLUMN]) == list(df[selection.URL_COLUMN])
  with pytest.raises(ValueError, match="neither series_aws_url"):
    selection.attach_download_columns(bare.drop(columns=[selection.UID_COLUMN]), idc)
  stranger = bare.copy()
  stranger.loc[0, selection.UID_COLUMN] = "1.2.3.4"
  with pytest.raises(ValueError, match="not in the installed IDC index"):
    selection.attach_download_columns(stranger, idc)


def test_outputs_are_idc_tool_formats_and_phi_free(tmp_path):
  df = _labelled()
  sel = selection.select(df, selection.Criteria(per_class=4, modalities=None,
                                                min_instances=0))
  paths = selection.write_outputs(sel, str(tmp_path), dest="dl")
  lines = [l for l in open(paths["s5cmd"]).read().splitlines()
           if not l.startswith("#")]
  assert len(lines) == len(sel.table)
  pat = re.compile(r"^cp (s3://idc-open-data/([0-9a-f-]{36})/\*) dl/\2/$")
  for line, url in zip(lines, sel.table[selection.URL_COLUMN]):
    m = pat.match(line)
    assert m, line
    assert m.group(1) == url  # idc-index matches the source to series_aws_url
  uids = open(paths["uids"]).read().split()
  assert uids == list(sel.table[selection.UID_COLUMN])
  out = pd.read_csv(paths["csv"])
  assert "PatientID" not in out.columns and "SeriesInstanceUID" not in out.columns
  assert {"crdc_series_uuid", "sequence", "coverage", "reason"} <= set(out.columns)
  summary = pd.read_csv(paths["summary"])
  assert set(summary.columns) == {"task", "class", "available", "selected", "target"}
  assert "total:" in selection.format_summary(sel)


def test_cli(tmp_path, capsys):
  from data_prep import select_series
  path = tmp_path / "labelled.csv"
  _labelled(120).to_csv(path, index=False)
  rc = select_series.main(["--index", str(path), "--out", str(tmp_path / "sel"),
                           "--per-class", "3", "--modalities", "",
                           "--min-instances", "0", "--seed", "1"])
  assert rc == 0
  assert "total:" in capsys.readouterr().out
  assert (tmp_path / "sel" / "manifest.s5cmd").exists()
  with pytest.raises(FileNotFoundError, match="missing.csv"):
    select_series.main(["--index", str(tmp_path / "missing.csv"),
                        "--out", str(tmp_path / "x")])
