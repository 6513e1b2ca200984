"""Header QA: the network's per-series predictions next to the metadata labels.

``qa_row`` turns one series' head outputs and its metadata labels into the
report columns (predicted class and probabilities, the header's label and
the rule that produced it, ``disagree_<task>``, ``qa_flag``); ``Report``
holds the rows and writes the CSVs. No jax here: the CLI imports this
module before it parses its arguments. ``radnet_jax.inference.predict``
runs the network and fills the report.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np

from radnet_jax.labels import taxonomy as tax

# Tasks whose confident disagreement with the header raises ``qa_flag``.
QA_TASKS = ("sequence", "plane", "contrast", "coverage")
DEFAULT_THRESHOLD = 0.9
# A predicted slice spacing this many times off the header's is "disagree".
SPACING_RATIO = 1.5
INFO_COLUMNS = ["source", "series_hash", "stack_key", "study_hash", "patient_hash",
                "modality", "series_description", "n_files", "shape", "spacing_mm"]


@dataclasses.dataclass
class Report:
  """Per-series predictions next to the metadata labels (the header-QA report).

  rows: one dict per stack (see ``predict`` for the columns).
  skipped: SkippedInput entries (files/series without a prediction).
  columns: the CSV column order.
  inputs: {stack key: float32 (D, H, W) model input} when requested.
  """
  rows: list
  skipped: list
  columns: list
  inputs: dict = dataclasses.field(default_factory=dict)

  @property
  def flagged(self) -> list:
    """Rows with ``qa_flag`` set."""
    return [r for r in self.rows if r.get("qa_flag")]

  def to_dataframe(self) -> Any:
    import pandas as pd  # pylint: disable=g-import-not-at-top  # heavy, optional: only here
    return pd.DataFrame(self.rows, columns=self.columns)

  def write_csv(self, path: str, skipped_path: str | None = None) -> tuple[str, str]:
    """Writes the predictions CSV and the skipped-inputs CSV (default
    ``<path stem>_skipped.csv``); returns both paths."""
    if skipped_path is None:
      stem = path[:-4] if path.lower().endswith(".csv") else path
      skipped_path = stem + "_skipped.csv"
    for p in (path, skipped_path):
      if os.path.dirname(p):
        os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(path, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
      w.writeheader()
      for r in self.rows:
        w.writerow({k: _csv_value(r.get(k, "")) for k in self.columns})
    with open(skipped_path, "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["path", "series_hash", "stage", "reason"])
      for s in self.skipped:
        w.writerow([s.path, s.series, s.stage, s.reason])
    return path, skipped_path


def _csv_value(v: Any) -> Any:
  if isinstance(v, bool):
    return int(v)
  if isinstance(v, float):
    return f"{v:.6g}"
  return v


def _softmax(z: np.ndarray) -> np.ndarray:
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def qa_columns(heads: Mapping[str, int], taxonomy: Any) -> list[str]:
  cols = []
  for t in tax.CLASSIFICATION_TASKS:
    if t in heads:
      cols += [f"pred_{t}", f"prob_{t}", f"label_{t}", f"provenance_{t}", f"disagree_{t}"]
      cols += [f"p_{t}_{c}" for c in taxonomy.classes(t)]
  if "coverage" in heads:
    cols += ["pred_coverage", "label_coverage", "provenance_coverage", "disagree_coverage"]
    cols += [f"p_coverage_{b}" for b in tax.COVERAGE_BANDS]
  if "spacing" in heads:
    cols += ["pred_spacing_mm", "label_spacing_mm", "provenance_spacing", "disagree_spacing"]
  return cols


def qa_row(outputs: Mapping[str, np.ndarray], labels: Mapping[str, Any], taxonomy: Any,
           threshold: float = DEFAULT_THRESHOLD, qa_tasks: Sequence[str] = QA_TASKS) -> dict:
  """Prediction vs metadata columns for one series.

  Args:
    outputs: one series' head outputs {task: logits (K,)}; spacing = log mm.
    labels: {task: Label} from the metadata ({} = none).
    taxonomy: a ``labels.taxonomy.Taxonomy``.
    threshold: confidence needed to call a disagreement a QA flag.
    qa_tasks: tasks whose confident disagreement sets ``qa_flag``.
  Returns:
    {pred_<t>, prob_<t>, p_<t>_<class>, label_<t>, provenance_<t>,
    disagree_<t>, ..., qa_flag, qa_tasks, qa_confidence}. For a softmax task
    ``disagree_<t>`` = the header's label is known, in the taxonomy, and not
    the network's top class; it is *confident* when the top class has
    probability >= ``threshold``. For coverage, disagree = the predicted band
    set (p > 0.5) differs from the header's; confident when some band is
    predicted against the header with probability >= ``threshold``. Spacing
    disagrees when the prediction is more than 1.5x off (never flags: the
    header spacing is measured from slice positions).
  """
  row: dict[str, Any] = {}
  flags, conf = [], 0.0
  for t in tax.CLASSIFICATION_TASKS:
    if t not in outputs:
      continue
    classes = taxonomy.classes(t)
    p = _softmax(np.asarray(outputs[t]).reshape(-1))
    k = int(np.argmax(p))
    lab = labels.get(t)
    row[f"pred_{t}"] = classes[k]
    row[f"prob_{t}"] = float(p[k])
    for c, pc in zip(classes, p):
      row[f"p_{t}_{c}"] = float(pc)
    row[f"label_{t}"] = lab.as_text() if lab is not None else tax.UNKNOWN
    row[f"provenance_{t}"] = lab.provenance if lab is not None else "unknown:no metadata"
    known = lab is not None and lab.known and lab.value in classes
    dis = bool(known and lab.value != classes[k])
    row[f"disagree_{t}"] = dis
    if dis and p[k] >= threshold and t in qa_tasks:
      flags.append(t)
      conf = max(conf, float(p[k]))
  if "coverage" in outputs:
    bands = tax.COVERAGE_BANDS
    p = 1.0 / (1.0 + np.exp(-np.asarray(outputs["coverage"], np.float64).reshape(-1)))
    pred = {b for b, pb in zip(bands, p) if pb > 0.5}
    row["pred_coverage"] = "|".join(b for b in bands if b in pred)
    for b, pb in zip(bands, p):
      row[f"p_coverage_{b}"] = float(pb)
    lab = labels.get("coverage")
    row["label_coverage"] = lab.as_text() if lab is not None else tax.UNKNOWN
    row["provenance_coverage"] = lab.provenance if lab is not None else "unknown:no metadata"
    known = lab is not None and lab.known and isinstance(lab.value, tuple)
    dis = bool(known and set(lab.value) != pred)
    row["disagree_coverage"] = dis
    if dis and "coverage" in qa_tasks:
      against = [pb if b not in lab.value else 1.0 - pb for b, pb in zip(bands, p)]
      c = max(against)
      if c >= threshold:
        flags.append("coverage")
        conf = max(conf, float(c))
  if "spacing" in outputs:
    pred_mm = float(np.exp(np.asarray(outputs["spacing"], np.float64).reshape(-1)[0]))
    row["pred_spacing_mm"] = pred_mm
    lab = labels.get("spacing")
    known = lab is not None and lab.known
    row["label_spacing_mm"] = float(lab.value) if known else float("nan")
    row["provenance_spacing"] = lab.provenance if lab is not None else "unknown:no metadata"
    row["disagree_spacing"] = bool(known and max(pred_mm / float(lab.value),
                                                 float(lab.value) / pred_mm) > SPACING_RATIO)
  row["qa_flag"] = bool(flags)
  row["qa_tasks"] = "|".join(flags)
  row["qa_confidence"] = conf if flags else float("nan")
  return row
