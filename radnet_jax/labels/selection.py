"""Select a label-balanced subset of a public archive and write its download list.

Input: a *labelled index*, one row per series, e.g. the NCI Imaging Data
Commons index (``idc-index-data``) after ``data_prep.label_index`` added one
text column per task (``sequence``, ``plane``, ``contrast``, ``coverage``, as
written by ``Label.as_text``: a class name, ``unknown``, or coverage bands
joined by ``|``). The public download columns of the IDC index are used as is:

===================  =====================================================
column               use
===================  =====================================================
``series_aws_url``   ``s3://idc-open-data/<crdc_series_uuid>/*``: s5cmd source
``crdc_series_uuid`` the series' folder in the bucket (and our folder name)
``SeriesInstanceUID``the id ``idc download`` accepts
``collection_id``,   filters and the summary
``Modality``,
``instanceCount``,
``series_size_MB``,
``analysis_result_id``
``PatientID``        only to cap series per patient; never written out
===================  =====================================================

A table without ``series_aws_url`` is joined to the installed IDC index on
``crdc_series_uuid`` or ``SeriesInstanceUID``.

Selection (``select``): every (task, class) cell, rarest first, is filled up
to ``per_class`` series in a seeded pseudo-random order that depends only on
(seed, series id), so the same index and seed give the same selection
whatever the row order. A series counts for every cell it belongs to, so
common classes may exceed ``per_class`` (the summary shows by how much);
rare classes get all the series they have.

Outputs (``write_outputs``): ``manifest.s5cmd`` (one ``cp <url> <dir>/``
line per series: ``s5cmd --no-sign-request --endpoint-url
https://s3.amazonaws.com run manifest.s5cmd``, or ``idc download
manifest.s5cmd``), ``series_uids.txt`` (one SeriesInstanceUID per line for
``idc download``), ``selection.csv`` (what was chosen and why; no patient
ids) and ``selection_summary.csv`` (per cell: available / selected).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from radnet_jax.labels.taxonomy import COVERAGE_BANDS, UNKNOWN

SELECT_TASKS = ("sequence", "plane", "contrast", "coverage")
URL_COLUMN = "series_aws_url"
UUID_COLUMN = "crdc_series_uuid"
UID_COLUMN = "SeriesInstanceUID"
# Columns copied from the IDC index when a labelled table lacks them.
IDC_COLUMNS = (UID_COLUMN, UUID_COLUMN, URL_COLUMN, "collection_id",
               "Modality", "instanceCount", "series_size_MB",
               "analysis_result_id", "PatientID")
# What may leave this module in selection.csv (no PatientID, no dates).
_PUBLIC_COLUMNS = ("collection_id", UUID_COLUMN, "Modality", "instanceCount",
                   "series_size_MB")
_URL_RE = re.compile(r"^s3://[A-Za-z0-9._-]+/[A-Za-z0-9._-]+/\*$")


@dataclasses.dataclass(frozen=True)
class Criteria:
  """What to select.

  per_class: target number of series per (task, class) cell.
  tasks: tasks whose classes are balanced.
  modalities: keep only these DICOM modalities (None = all).
  min_instances: drop series with fewer DICOM instances (too thin for 3D).
  max_size_mb: drop series larger than this (None = no limit).
  original_only: drop IDC analysis results (derived series).
  require_known: tasks whose label must be known for a series to be eligible.
  max_per_patient: cap per patient, for diversity (None = no cap).
  max_series: overall budget; cells stop filling once it is reached.
  seed: selection order seed.
  """
  per_class: int = 100
  tasks: tuple[str, ...] = SELECT_TASKS
  modalities: tuple[str, ...] | None = ("CT", "MR", "PT")
  min_instances: int = 16
  max_size_mb: float | None = None
  original_only: bool = True
  require_known: tuple[str, ...] = ()
  max_per_patient: int | None = None
  max_series: int | None = None
  seed: int = 0


def load_labelled_index(path: str) -> pd.DataFrame:
  """Reads a labelled index (.parquet, .csv or .csv.gz); raises on a bad file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: labelled index not found")
  try:
    if path.endswith(".parquet"):
      return pd.read_parquet(path)
    return pd.read_csv(path, low_memory=False)
  except Exception as e:  # pandas raises many types for a broken file
    raise ValueError(f"{path}: cannot read labelled index ({e})") from e


def label_column(df: pd.DataFrame, task: str) -> str:
  """The column holding a task's text label (``task``, ``label_task`` ...)."""
  for name in (task, f"label_{task}", f"{task}_label", f"labels.{task}"):
    if name in df.columns:
      return name
  raise KeyError(f"no label column for task {task!r} (looked for {task!r}, "
                 f"'label_{task}', '{task}_label'); columns: {list(df.columns)[:40]}")


def idc_index_table(columns: Sequence[str] = IDC_COLUMNS) -> pd.DataFrame:
  """The installed ``idc-index-data`` series table (one row per series)."""
  try:
    import idc_index_data  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the labelled index lacks series_aws_url and the "
                      "idc-index-data package is not installed to add it "
                      "(pip install idc-index-data)") from e
  return pd.read_parquet(idc_index_data.IDC_INDEX_PARQUET_FILEPATH,
                         columns=list(columns))


def attach_download_columns(df: pd.DataFrame,
                            idc: pd.DataFrame | None = None) -> pd.DataFrame:
  """Adds missing IDC columns (URL, uuid, size ...) by joining on a series key."""
  missing = [c for c in IDC_COLUMNS if c not in df.columns]
  if not missing:
    return df
  key = next((k for k in (UUID_COLUMN, UID_COLUMN) if k in df.columns), None)
  if key is None:
    raise ValueError(
        "labelled index has neither series_aws_url nor a key to find it "
        f"({UUID_COLUMN} or {UID_COLUMN}); keep one of them in data_prep.label_index "
        "output")
  if idc is None:
    idc = idc_index_table()
  extra = idc[[key] + [c for c in missing if c in idc.columns]]
  out = df.merge(extra.drop_duplicates(key), on=key, how="left")
  if URL_COLUMN in out and out[URL_COLUMN].isna().any():
    n = int(out[URL_COLUMN].isna().sum())
    raise ValueError(f"{n} series of the labelled index are not in the installed "
                     f"IDC index (by {key}); was it built from another IDC release?")
  return out


def _order_key(ids: Iterable[str], seed: int) -> np.ndarray:
  """Seeded pseudo-random rank per id, independent of row order."""
  out = []
  for s in ids:
    h = hashlib.blake2b(f"{seed}:{s}".encode(), digest_size=8).digest()
    out.append(int.from_bytes(h, "little") >> 1)
  return np.asarray(out, dtype=np.int64)


def _cells(df: pd.DataFrame, tasks: Sequence[str]) -> dict[tuple[str, str], np.ndarray]:
  """(task, class) -> boolean membership mask over rows (unknown excluded)."""
  cells = {}
  for task in tasks:
    col = df[label_column(df, task)].fillna(UNKNOWN).astype(str)
    if task == "coverage":
      for band in COVERAGE_BANDS:
        mask = col.str.split("|").apply(lambda parts, b=band: b in parts).to_numpy()
        if mask.any():
          cells[(task, band)] = mask
      continue
    for value in sorted(set(col) - {UNKNOWN, "", "nan", "other"}):
      cells[(task, value)] = (col == value).to_numpy()
  return cells


def eligible(df: pd.DataFrame, criteria: Criteria) -> np.ndarray:
  """Boolean mask of rows that pass the filters."""
  keep = np.ones(len(df), dtype=bool)
  if criteria.modalities is not None and "Modality" in df:
    keep &= df["Modality"].isin(criteria.modalities).to_numpy()
  if criteria.min_instances and "instanceCount" in df:
    keep &= (pd.to_numeric(df["instanceCount"], errors="coerce").fillna(0)
             >= criteria.min_instances).to_numpy()
  if criteria.max_size_mb is not None and "series_size_MB" in df:
    keep &= (pd.to_numeric(df["series_size_MB"], errors="coerce").fillna(np.inf)
             <= criteria.max_size_mb).to_numpy()
  if criteria.original_only and "analysis_result_id" in df:
    keep &= df["analysis_result_id"].isna().to_numpy()
  for task in criteria.require_known:
    col = df[label_column(df, task)].fillna(UNKNOWN).astype(str)
    keep &= ~col.isin([UNKNOWN, "", "nan"]).to_numpy()
  return keep


def _series_id(df: pd.DataFrame) -> pd.Series:
  for k in (UUID_COLUMN, UID_COLUMN, URL_COLUMN):
    if k in df.columns:
      return df[k].astype(str)
  raise ValueError(f"labelled index needs a series key column ({UUID_COLUMN}, "
                   f"{UID_COLUMN} or {URL_COLUMN})")


@dataclasses.dataclass
class Selection:
  """The chosen rows (``table``, with a ``reason`` column) and per-cell counts."""
  table: pd.DataFrame
  summary: pd.DataFrame


def select(df: pd.DataFrame, criteria: Criteria = Criteria()) -> Selection:
  """Label-balanced, seeded selection; see the module docstring.

  ``summary`` has one row per (task, class): ``available`` (eligible series
  with that label), ``selected`` and ``target`` (= per_class, or available
  when fewer).
  """
  if df.empty:
    raise ValueError("labelled index is empty")
  df = df.reset_index(drop=True)
  ids = _series_id(df)
  if ids.duplicated().any():
    df = df.loc[~ids.duplicated()].reset_index(drop=True)
    ids = _series_id(df)
  ok = eligible(df, criteria)
  cells = _cells(df, criteria.tasks)
  rank = _order_key(ids, criteria.seed)
  patients = (df["PatientID"].astype(str).to_numpy()
              if criteria.max_per_patient and "PatientID" in df else None)
  chosen = np.zeros(len(df), dtype=bool)
  reason: list[str] = [""] * len(df)
  per_patient: dict[str, int] = {}
  order = sorted(cells, key=lambda c: (int((cells[c] & ok).sum()), c))
  for cell in order:
    members = cells[cell] & ok
    have = int((members & chosen).sum())
    if have >= criteria.per_class:
      continue
    candidates = np.flatnonzero(members & ~chosen)
    candidates = candidates[np.argsort(rank[candidates], kind="stable")]
    for i in candidates:
      if have >= criteria.per_class:
        break
      if criteria.max_series is not None and chosen.sum() >= criteria.max_series:
        break
      if patients is not None:
        p = patients[i]
        if per_patient.get(p, 0) >= criteria.max_per_patient:
          continue
        per_patient[p] = per_patient.get(p, 0) + 1
      chosen[i] = True
      reason[i] = f"{cell[0]}={cell[1]}"
      have += 1
  rows = []
  for (task, cls), mask in sorted(cells.items()):
    avail = int((mask & ok).sum())
    rows.append({"task": task, "class": cls, "available": avail,
                 "selected": int((mask & chosen).sum()),
                 "target": min(criteria.per_class, avail)})
  summary = pd.DataFrame(rows, columns=["task", "class", "available", "selected",
                                        "target"])
  table = df.loc[chosen].copy()
  table["reason"] = [reason[i] for i in np.flatnonzero(chosen)]
  table = table.iloc[np.argsort(rank[chosen], kind="stable")].reset_index(drop=True)
  return Selection(table, summary)


def s5cmd_lines(table: pd.DataFrame, dest: str = "dicom") -> list[str]:
  """``cp s3://bucket/<uuid>/* <dest>/<uuid>/`` per series (s5cmd ``run`` format).

  One folder per series keeps a resumed download and the converter's error
  log readable; ``idc download`` reads the same lines (it replaces the
  destination with its own layout).
  """
  if URL_COLUMN not in table:
    raise ValueError(f"selection has no {URL_COLUMN} column")
  lines = []
  for url in table[URL_COLUMN].astype(str):
    if not _URL_RE.match(url):
      raise ValueError(f"unexpected series URL {url!r} (want s3://bucket/<uuid>/*)")
    folder = url.split("/")[3]
    lines.append(f"cp {url} {dest.rstrip('/')}/{folder}/")
  return lines


def write_outputs(sel: Selection, out_dir: str, *, dest: str = "dicom",
                  label_columns: Mapping[str, str] | None = None) -> dict[str, str]:
  """Writes manifest.s5cmd, series_uids.txt, selection.csv, selection_summary.csv.

  Returns {kind: path}. selection.csv carries the public series id
  (crdc_series_uuid), collection, modality, size, labels and the reason it
  was chosen; never PatientID or dates.
  """
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  lines = s5cmd_lines(sel.table, dest)
  size = pd.to_numeric(sel.table.get("series_size_MB", pd.Series(dtype=float)),
                       errors="coerce").sum()
  header = [
      f"# RadNet-JAX selection: {len(lines)} series, {size / 1024:.1f} GiB",
      "# download: s5cmd --no-sign-request --endpoint-url https://s3.amazonaws.com "
      "run manifest.s5cmd",
      "#       or: idc download manifest.s5cmd --download-dir DIR",
  ]
  paths["s5cmd"] = os.path.join(out_dir, "manifest.s5cmd")
  with open(paths["s5cmd"], "w") as f:
    f.write("\n".join(header + lines) + "\n")
  if UID_COLUMN in sel.table:
    paths["uids"] = os.path.join(out_dir, "series_uids.txt")
    with open(paths["uids"], "w") as f:
      f.write("\n".join(sel.table[UID_COLUMN].astype(str)) + "\n")
  cols = [c for c in _PUBLIC_COLUMNS if c in sel.table]
  if label_columns is None:
    label_columns = {}
    for t in SELECT_TASKS + ("spacing",):
      try:
        label_columns[t] = label_column(sel.table, t)
      except KeyError:
        pass
  public = sel.table[cols].copy()
  for task, col in label_columns.items():
    public[task] = sel.table[col].values
  public["reason"] = sel.table["reason"].values
  paths["csv"] = os.path.join(out_dir, "selection.csv")
  public.to_csv(paths["csv"], index=False)
  paths["summary"] = os.path.join(out_dir, "selection_summary.csv")
  sel.summary.to_csv(paths["summary"], index=False)
  return paths


def format_summary(sel: Selection) -> str:
  """Plain-text table: task, class, available, selected, target."""
  s = sel.summary
  lines = [f"{'task':<10} {'class':<12} {'available':>10} {'selected':>9} {'target':>7}"]
  for task, cls, avail, chosen, target in s[
      ["task", "class", "available", "selected", "target"]].itertuples(index=False):
    flag = "  (short)" if chosen < target else ""
    lines.append(f"{task:<10} {cls:<12} {avail:>10} {chosen:>9} {target:>7}{flag}")
  size = pd.to_numeric(sel.table.get("series_size_MB", pd.Series(dtype=float)),
                       errors="coerce").sum()
  lines.append(f"total: {len(sel.table)} series, {size / 1024:.1f} GiB")
  return "\n".join(lines)
