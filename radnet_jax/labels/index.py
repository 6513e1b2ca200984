"""Labelling a metadata index (CSV / Parquet) without pixels.

Each row is a metadata record (columns = DICOM keywords, plus e.g. the IDC
``collection_id``). The rules only read a few columns, and a million series
share far fewer distinct combinations of them, so ``label_table``
deduplicates on those columns, labels each distinct combination once and maps
the result back (the whole ~1M-row IDC index takes seconds, not hours).
"""
from __future__ import annotations

import os
import time
from typing import Any, Iterable

import numpy as np
import pandas as pd

from radnet_jax.labels import as_taxonomy, label
from radnet_jax.labels.priors import Priors
from radnet_jax.labels.taxonomy import TASKS, Taxonomy
from radnet_jax.labels.values import value_text
from radnet_jax.privacy import hash_id

# Every record key a rule reads (coverage, contrast, sequence, plane, spacing).
RULE_KEYS = (
    "Modality", "SOPClassUID", "ImageType", "SeriesDescription", "ProtocolName",
    "SequenceName", "StudyDescription", "ScanningSequence", "SequenceVariant",
    "ScanOptions", "EchoTime", "RepetitionTime", "InversionTime",
    "DiffusionBValue", "ContrastBolusAgent", "ContrastBolusRoute",
    "ContrastBolusVolume", "ContrastBolusStartTime", "ContrastBolusIngredient",
    "ImageOrientationPatient", "BodyPartExamined", "SliceSpacing",
    "SpacingBetweenSlices", "SliceThickness", "ExtentSI", "ExtentMM",
    "NumberOfSlices", "collection_id")
OUTPUT_COLUMNS = tuple(TASKS) + tuple(f"{t}_provenance" for t in TASKS)
# Direct identifiers never written back out (names, dates of birth, contacts).
PHI_COLUMNS = ("PatientName", "PatientBirthDate", "PatientBirthTime",
               "PatientAddress", "PatientTelephoneNumbers", "OtherPatientNames",
               "OtherPatientIDs", "PatientMotherBirthName", "AccessionNumber",
               "ReferringPhysicianName", "PerformingPhysicianName",
               "OperatorsName", "InstitutionAddress", "MedicalRecordLocator")
# Identifiers replaced by salted hashes with ``hash_ids``.
ID_COLUMNS = {"PatientID": "PatientHash", "StudyInstanceUID": "StudyHash",
              "SeriesInstanceUID": "SeriesHash", "SOPInstanceUID": "SOPHash"}


def read_index(path: str) -> pd.DataFrame:
  """CSV (optionally compressed) or Parquet -> DataFrame; ValueError if unreadable."""
  lower = path.lower()
  try:
    if lower.endswith((".parquet", ".pq")):
      return pd.read_parquet(path)
    return pd.read_csv(path, low_memory=False)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot read the index: {e}") from e


def write_index(df: pd.DataFrame, path: str) -> None:
  """Writes CSV or Parquet by extension (creates the folder)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  if path.lower().endswith((".parquet", ".pq")):
    df.to_parquet(path, index=False)
  else:
    df.to_csv(path, index=False)


def _hashable(col: pd.Series) -> pd.Series:
  """List/array cells (IOP, ImageType from Parquet) -> tuples, so they group."""
  if col.dtype != object:
    return col
  return col.map(lambda v: tuple(np.asarray(v).tolist())
                 if isinstance(v, (list, tuple, np.ndarray)) else v)


def _group(df: pd.DataFrame, cols: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """(first row of each distinct combination, inverse map row -> combination)."""
  if not cols:
    return np.zeros(1 if len(df) else 0, np.int64), np.zeros(len(df), np.int64)
  codes, sizes = [], []
  for c in cols:
    code, uniques = pd.factorize(_hashable(df[c]), use_na_sentinel=False)
    codes.append(code.astype(np.int64))
    sizes.append(max(1, len(uniques)))
  if float(np.prod(np.array(sizes, dtype=np.float64))) < 2 ** 62:
    key = np.zeros(len(df), np.int64)
    for code, size in zip(codes, sizes):
      key = key * size + code
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
  else:
    _, first, inverse = np.unique(np.stack(codes, 1), axis=0, return_index=True,
                                  return_inverse=True)
  return first, inverse.reshape(-1)


def rule_columns(df: pd.DataFrame, priors: Priors | None = None) -> list[str]:
  """The columns of ``df`` that the rules (and the priors' conditions) read."""
  wanted = {k.lower() for k in RULE_KEYS}
  if priors is not None:
    wanted |= {k.lower() for r in priors.rules for k, _ in r.conditions}
  return [c for c in df.columns if str(c).lower() in wanted]


def label_table(df: pd.DataFrame, taxonomy: str | Taxonomy = "paper",
                priors: Priors | None = None) -> pd.DataFrame:
  """Returns ``df`` plus the label columns (text) and one provenance column per task.

  Label text: class names, 'other', coverage bands joined by '|' ('none' = no
  band), spacing in mm; 'unknown' when undecided.
  """
  tax = as_taxonomy(taxonomy)
  base = df.drop(columns=[c for c in OUTPUT_COLUMNS if c in df.columns])
  cols = rule_columns(base, priors)
  first, inverse = _group(base, cols)
  records: Iterable[dict[str, Any]] = (
      base[cols].iloc[first].to_dict("records") if cols else [{}] * len(first))
  values = {c: [] for c in OUTPUT_COLUMNS}
  for rec in records:
    labs = label(rec, tax, priors)
    for task in TASKS:
      lab = labs[task]
      values[task].append(value_text(lab.value) if lab.known or lab.value is None
                          else value_text(None))
      values[f"{task}_provenance"].append(lab.provenance)
  out = base.copy()
  for c in OUTPUT_COLUMNS:
    out[c] = np.asarray(values[c], dtype=object)[inverse] if len(base) else []
  return out


def drop_phi(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
  """Removes direct-identifier columns; returns (frame, dropped names)."""
  phi = {c.lower() for c in PHI_COLUMNS}
  dropped = [c for c in df.columns if str(c).lower() in phi]
  return df.drop(columns=dropped), dropped


def hash_ids(df: pd.DataFrame, salt: str) -> pd.DataFrame:
  """Replaces PatientID / Study / Series / SOP UIDs with salted hashes."""
  out = df.copy()
  for col, new in ID_COLUMNS.items():
    if col in out.columns:
      codes, uniq = pd.factorize(out[col], use_na_sentinel=False)
      hashed = np.array([hash_id(None if pd.isna(u) else u, salt) for u in uniq],
                        dtype=object)
      pos = out.columns.get_loc(col)
      out = out.drop(columns=[col])
      out.insert(pos, new, hashed[codes] if len(out) else [])
  return out


def _spacing_bin(text: str) -> str:
  try:
    mm = float(text)
  except ValueError:
    return text
  for hi, name in ((1.0, "<1 mm"), (2.0, "1-2 mm"), (3.0, "2-3 mm"), (5.0, "3-5 mm"),
                   (10.0, "5-10 mm")):
    if mm < hi:
      return name
  return ">=10 mm"


def distribution(df: pd.DataFrame, top: int = 12) -> str:
  """Per-task label counts as a plain-text table (coverage: per band and per set)."""
  n = max(1, len(df))
  lines = []
  for task in TASKS:
    col = df[task].astype(str)
    if task == "spacing":
      col = col.map(_spacing_bin)
    counts = col.value_counts()
    lines.append(f"{task:<10} {'value':<44} {'rows':>9} {'%':>6}")
    shown = counts.iloc[:top]
    for value, count in shown.items():
      lines.append(f"{'':<10} {value[:44]:<44} {count:>9} {100 * count / n:>6.1f}")
    if len(counts) > top:
      rest = int(counts.iloc[top:].sum())
      lines.append(f"{'':<10} {f'({len(counts) - top} more values)':<44} {rest:>9} "
                   f"{100 * rest / n:>6.1f}")
    if task == "coverage":
      known = col[~col.isin(["unknown", "none"])]
      bands = known.str.split("|").explode().value_counts()
      for band, count in bands.items():
        lines.append(f"{'':<10} {'band ' + band:<44} {count:>9} {100 * count / n:>6.1f}")
    lines.append("")
  return "\n".join(lines)


def label_index_file(index: str, out: str, taxonomy: str = "paper",
                     priors: Priors | None = None, salt: str | None = None
                     ) -> tuple[pd.DataFrame, dict[str, float]]:
  """Reads, labels and writes an index; returns (labelled frame, timings in s)."""
  t0 = time.perf_counter()
  df = read_index(index)
  t1 = time.perf_counter()
  df, _ = drop_phi(df)
  labelled = label_table(df, taxonomy, priors)
  t2 = time.perf_counter()
  if salt:
    labelled = hash_ids(labelled, salt)
  write_index(labelled, out)
  t3 = time.perf_counter()
  return labelled, {"read": t1 - t0, "label": t2 - t1, "write": t3 - t2,
                    "total": t3 - t0}
