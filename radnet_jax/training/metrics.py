"""Exact evaluators (paper-style per-class tables) and their reports.

Evaluators accumulate per-example predictions over the whole split (rows with
``mask == 0`` or an unknown label are dropped), so every metric is exact, never
a mean of batch means. ``update`` takes host numpy arrays; ``result`` returns
plain python numbers (JSON-ready).

Per class (one-vs-rest) the paper reports N, AUC, accuracy, sensitivity
(recall), specificity, PPV (precision) and NPV; per task the total accuracy
(argmax). Coverage (multi-label) adds the exact-match rate (all 9 bands
right); spacing reports the MAE in mm.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve (Mann-Whitney U, ties count 1/2); NaN if one class.

  scores: (N,) float; labels: (N,) bool/0-1.
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels).astype(bool)
  npos, nneg = int(labels.sum()), int((~labels).sum())
  if npos == 0 or nneg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  s = scores[order]
  ranks = np.empty(len(s), np.float64)
  i = 0
  while i < len(s):  # average ranks over ties
    j = i
    while j + 1 < len(s) and s[j + 1] == s[i]:
      j += 1
    ranks[i:j + 1] = (i + j) / 2.0 + 1.0
    i = j + 1
  r = np.empty_like(ranks)
  r[order] = ranks
  u = r[labels].sum() - npos * (npos + 1) / 2.0
  return float(u / (npos * nneg))


def _div(a: float, b: float) -> float:
  return float(a) / float(b) if b else float("nan")


def binary_stats(pred: np.ndarray, true: np.ndarray) -> dict:
  """Accuracy, sensitivity, specificity, PPV, NPV of bool predictions."""
  pred, true = np.asarray(pred, bool), np.asarray(true, bool)
  tp = int((pred & true).sum())
  tn = int((~pred & ~true).sum())
  fp = int((pred & ~true).sum())
  fn = int((~pred & true).sum())
  return {"accuracy": _div(tp + tn, tp + tn + fp + fn),
          "sensitivity": _div(tp, tp + fn), "specificity": _div(tn, tn + fp),
          "ppv": _div(tp, tp + fp), "npv": _div(tn, tn + fn)}


class ClassificationEvaluator:
  """Softmax task: accumulates probabilities of examples with a known label."""

  def __init__(self, classes: Sequence[str]):
    self.classes = tuple(classes)
    self._probs: list[np.ndarray] = []
    self._labels: list[np.ndarray] = []

  def update(self, logits: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> None:
    """logits (B, K), labels (B,) int (-1 unknown), mask (B,) 0/1."""
    logits = np.asarray(logits, np.float64)
    keep = (np.asarray(mask) > 0) & (np.asarray(labels) >= 0)
    z = logits[keep] - logits[keep].max(axis=-1, keepdims=True)
    p = np.exp(z)
    self._probs.append(p / p.sum(-1, keepdims=True))
    self._labels.append(np.asarray(labels)[keep].astype(np.int64))

  def result(self) -> dict:
    k = len(self.classes)
    probs = np.concatenate(self._probs) if self._probs else np.zeros((0, k))
    labels = np.concatenate(self._labels) if self._labels else np.zeros(0, np.int64)
    pred = probs.argmax(-1) if len(probs) else labels
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (labels, pred), 1)
    per_class = {}
    for c, name in enumerate(self.classes):
      row = {"n": int((labels == c).sum()), "auc": auc(probs[:, c], labels == c)}
      row.update(binary_stats(pred == c, labels == c))
      per_class[name] = row
    return {"n": int(len(labels)), "accuracy": _div((pred == labels).sum(), len(labels)),
            "per_class": per_class, "confusion": cm.tolist(),
            "classes": list(self.classes)}


class MultiLabelEvaluator:
  """Sigmoid multi-label task (coverage): exact match + per-band metrics."""

  def __init__(self, bands: Sequence[str], threshold: float = 0.5):
    self.bands = tuple(bands)
    self.threshold = threshold
    self._probs: list[np.ndarray] = []
    self._labels: list[np.ndarray] = []

  def update(self, logits: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> None:
    """logits (B, K), labels (B, K) 0/1, mask (B,) 0/1 (coverage known & real)."""
    keep = np.asarray(mask) > 0
    self._probs.append(1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)[keep])))
    self._labels.append(np.asarray(labels)[keep] > 0.5)

  def result(self) -> dict:
    k = len(self.bands)
    probs = np.concatenate(self._probs) if self._probs else np.zeros((0, k))
    labels = np.concatenate(self._labels) if self._labels else np.zeros((0, k), bool)
    pred = probs >= self.threshold
    per_band = {}
    for b, name in enumerate(self.bands):
      row = {"n": int(labels[:, b].sum()), "auc": auc(probs[:, b], labels[:, b])}
      row.update(binary_stats(pred[:, b], labels[:, b]))
      per_band[name] = row
    exact = (pred == labels).all(-1)
    return {"n": int(len(labels)), "exact_match": _div(exact.sum(), len(labels)),
            "band_accuracy": _div((pred == labels).sum(), labels.size),
            "per_class": per_band}


class RegressionEvaluator:
  """Scalar regression (slice spacing, mm): MAE over examples with a target."""

  def __init__(self):
    self._abs: list[np.ndarray] = []
    self._rel: list[np.ndarray] = []

  def update(self, pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> None:
    """pred, target (B,) in mm (target NaN = unknown), mask (B,) 0/1."""
    pred, target = np.asarray(pred, np.float64).reshape(-1), np.asarray(target, np.float64)
    keep = (np.asarray(mask) > 0) & np.isfinite(target)
    err = np.abs(pred[keep] - target[keep])
    self._abs.append(err)
    self._rel.append(err / np.maximum(np.abs(target[keep]), 1e-6))

  def result(self) -> dict:
    err = np.concatenate(self._abs) if self._abs else np.zeros(0)
    rel = np.concatenate(self._rel) if self._rel else np.zeros(0)
    return {"n": int(len(err)), "mae_mm": float(err.mean()) if len(err) else float("nan"),
            "median_ae_mm": float(np.median(err)) if len(err) else float("nan"),
            "mean_rel_error": float(rel.mean()) if len(rel) else float("nan")}


def save_confusion_png(path: str, confusion: Sequence[Sequence[int]],
                       classes: Sequence[str], title: str) -> None:
  """Writes a labelled confusion-matrix PNG (rows = truth, cols = prediction)."""
  # matplotlib: slow to import and needed only for these plots.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  cm = np.asarray(confusion)
  fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(classes), 1.0 + 0.7 * len(classes)))
  ax.imshow(cm, cmap="Blues")
  ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
  ax.set_yticks(range(len(classes)), classes)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title)
  vmax = cm.max() if cm.size else 0
  for (i, j), v in np.ndenumerate(cm):
    ax.text(j, i, str(v), ha="center", va="center",
            color="white" if v > vmax / 2 else "black")
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _fmt(v) -> str:
  if isinstance(v, float):
    return "-" if math.isnan(v) else f"{v:.3f}"
  return str(v)


def results_markdown(results: Mapping[str, Mapping], title: str = "") -> str:
  """Markdown: a per-task summary table, then per-class tables."""
  lines = [f"### {title}", ""] if title else []
  lines += ["| task | N | metric | value |", "|---|---|---|---|"]
  for task, r in results.items():
    if "accuracy" in r and "per_class" in r:
      lines.append(f"| {task} | {r['n']} | accuracy | {_fmt(r['accuracy'])} |")
    if "exact_match" in r:
      lines.append(f"| {task} | {r['n']} | exact match | {_fmt(r['exact_match'])} |")
    if "mae_mm" in r:
      lines.append(f"| {task} | {r['n']} | MAE (mm) | {_fmt(r['mae_mm'])} |")
  cols = ("n", "auc", "accuracy", "sensitivity", "specificity", "ppv", "npv")
  for task, r in results.items():
    if "per_class" not in r:
      continue
    lines += ["", f"**{task}**", "", "| class | " + " | ".join(cols) + " |",
              "|---" * (len(cols) + 1) + "|"]
    for name, row in r["per_class"].items():
      lines.append(f"| {name} | " + " | ".join(_fmt(row[c]) for c in cols) + " |")
  return "\n".join(lines) + "\n"


def _jsonsafe(obj):
  if isinstance(obj, dict):
    return {k: _jsonsafe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonsafe(v) for v in obj]
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def jsonsafe(obj):
  """NaN/Inf -> None, so results.json is standard JSON."""
  return _jsonsafe(obj)
