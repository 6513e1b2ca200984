"""Human-readable outputs of a shard conversion: CSVs, label report, montages.

Everything written here is PHI-free by construction: rows carry salted hashes
(series, stack), label texts and provenance; file paths in ``errors.csv`` are
salted hashes (``convert.locate`` maps them back), or paths relative to the
input root with ``hash_paths=False``; montage file names
come from task names, never from tag values.

Files (in the conversion's output directory):

* ``labels.csv``: one row per converted stack: ``stack, series_hash, split,
  modality``, then for each task ``<task>`` (label text, ``unknown`` when
  undecided) and ``<task>_provenance`` (the rule that fired). A curator edits
  the task columns and feeds the file back with ``--overrides`` (the override
  key is the ``stack`` column; ``series_hash`` is informative, so that the
  loader does not see two key columns). Best keep only the corrected rows:
  every task cell given is recorded as an override, even if unchanged.
* ``errors.csv``: ``path, series, stack, stage, reason`` for every skipped file
  or stack (stage = ``scan``, ``load``, ``resample``, ``label``, ``crash``).
* ``report.md``: per task and split, class counts and unknown rates; the
  provenance (rule) counts; the error reasons.
* ``montage_<task>.png``: mid-slices (middle index of D) of a few volumes per
  class, so mislabels stand out.
"""
from __future__ import annotations

import collections
import csv
import os
from typing import Iterable, Mapping, Sequence

import numpy as np

from radnet_jax.labels import taxonomy as tx

ERROR_COLUMNS = ("path", "series", "stack", "stage", "reason")
MONTAGE_PER_CLASS = 6


def label_columns(tasks: Sequence[str] = tx.TASKS) -> list[str]:
  cols = ["stack", "series_hash", "split", "modality"]
  for task in tasks:
    cols += [task, f"{task}_provenance"]
  return cols


def _write_csv(path: str, columns: Sequence[str],
               rows: Iterable[Mapping[str, object]]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore",
                       lineterminator="\n")
    w.writeheader()
    for row in rows:
      w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
  os.replace(tmp, path)


def write_labels_csv(path: str, rows: Iterable[Mapping[str, object]]) -> None:
  """``labels.csv``: one row per stack (see the module docstring)."""
  _write_csv(path, label_columns(), rows)


def write_errors_csv(path: str, rows: Iterable[Mapping[str, object]]) -> None:
  """``errors.csv``: one row per skipped file / failed stack."""
  _write_csv(path, ERROR_COLUMNS, rows)


def provenance_rule(provenance: str) -> str:
  """The rule part of a provenance string (drops the matched tag value).

  ``"desc:SeriesDescription='AX T1 +C'"`` -> ``"desc:SeriesDescription"``, so
  the report aggregates by rule and does not echo free text.
  """
  text = str(provenance or "")
  for sep in ("=", "("):
    text = text.split(sep, 1)[0]
  return text.strip() or "none"


class MontageCollector:
  """Keeps mid-slices of the first few volumes per (task, class), bounded."""

  def __init__(self, per_class: int = MONTAGE_PER_CLASS):
    self.per_class = per_class
    self.slices: dict[str, dict[str, list[tuple[str, np.ndarray]]]] = (
        collections.defaultdict(lambda: collections.defaultdict(list)))

  def add(self, volume: np.ndarray, labels: Mapping[str, str], name: str) -> None:
    """volume: ``(D, H, W)``; labels: {task: label text} ('a|b' for coverage)."""
    mid = None
    for task, text in labels.items():
      if task == "spacing":
        continue
      classes = str(text).split("|") if task == "coverage" else [str(text)]
      for cls in classes:
        bucket = self.slices[task][cls]
        if len(bucket) < self.per_class:
          if mid is None:
            mid = np.asarray(volume[volume.shape[0] // 2], np.float32).copy()
          bucket.append((name, mid))

  def write(self, out_dir: str, task_classes: Mapping[str, Sequence[str]]) -> list[str]:
    """Writes ``montage_<task>.png`` per task; returns the file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task, classes in task_classes.items():
      by_class = self.slices.get(task, {})
      order = [c for c in classes if c in by_class]
      order += sorted(c for c in by_class if c not in order)
      if not order:
        continue
      ncol = self.per_class
      fig, axes = plt.subplots(len(order), ncol, squeeze=False,
                               figsize=(1.6 * ncol + 1.2, 1.7 * len(order)))
      for r, cls in enumerate(order):
        items = by_class[cls]
        for c in range(ncol):
          ax = axes[r][c]
          ax.set_xticks([])
          ax.set_yticks([])
          for side in ax.spines.values():
            side.set_visible(False)
          if c < len(items):
            name, img = items[c]
            lo, hi = float(np.min(img)), float(np.max(img))
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            ax.set_title(name[:8], fontsize=6)
        axes[r][0].set_ylabel(f"{cls}\n(n={len(items)} shown)", fontsize=8)
      fig.suptitle(f"{task}: mid-slices per class", fontsize=10)
      fig.tight_layout()
      fname = f"montage_{task}.png"
      # Fixed metadata so that re-runs write identical bytes.
      fig.savefig(os.path.join(out_dir, fname), dpi=80,
                  metadata={"Software": None})
      plt.close(fig)
      written.append(fname)
    return written


def _pct(n: int, total: int) -> str:
  return f"{100.0 * n / total:.1f}%" if total else "-"


def write_report_md(path: str, manifest: Mapping, provenance: Mapping[str, Mapping[str, int]],
                    error_reasons: Mapping[str, int], montages: Sequence[str]) -> None:
  """``report.md``: class counts per task and split, unknown rates, rules, errors.

  provenance: {task: {rule: count}} over all splits; error_reasons:
  {"stage: reason head": count}.
  """
  counts = manifest["counts"]
  splits = [s for s in manifest["splits"] if manifest["num_records"].get(s)]
  total = sum(manifest["num_records"].values())
  lines = ["# Label report", "",
           f"Taxonomy `{manifest['taxonomy']}`, shape {manifest['shape']} "
           f"(D, H, W), {total} volumes "
           + ", ".join(f"{s}: {manifest['num_records'][s]}" for s in manifest["splits"])
           + f"; {manifest['num_errors']} skipped (see errors.csv).", "",
           "Unknown labels are masked out of the loss, never guessed. Edit "
           "`labels.csv` and re-run with `--overrides labels.csv` to correct.", ""]
  for task in tx.TASKS:
    lines += [f"## {task}", ""]
    if task == "spacing":
      lines += ["| split | known | unknown | min mm | median mm | max mm |",
                "|---|---|---|---|---|---|"]
      for s in splits:
        st = counts[s]["spacing"]
        lines.append(f"| {s} | {st['known']} | {st['unknown']} | "
                     f"{st['min']} | {st['median']} | {st['max']} |")
    else:
      classes = list(manifest["classes"][task])
      extra = sorted({c for s in splits for c in counts[s][task]} - set(classes)
                     - {tx.UNKNOWN})
      cols = classes + extra + [tx.UNKNOWN]
      lines += ["| split | " + " | ".join(cols) + " | unknown rate |",
                "|---" * (len(cols) + 2) + "|"]
      for s in splits:
        c = counts[s][task]
        n = manifest["num_records"][s]
        lines.append(f"| {s} | " + " | ".join(str(c.get(k, 0)) for k in cols)
                     + f" | {_pct(c.get(tx.UNKNOWN, 0), n)} |")
      if extra:
        lines += ["", f"Values outside the taxonomy ({', '.join(extra)}) are "
                  "masked in training."]
    rules = provenance.get(task, {})
    if rules:
      lines += ["", "| rule | count |", "|---|---|"]
      for rule, n in sorted(rules.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"| `{rule}` | {n} |")
    if f"montage_{task}.png" in montages:
      lines += ["", f"![{task}](montage_{task}.png)"]
    lines.append("")
  if error_reasons:
    lines += ["## Skipped", "", "| stage: reason | count |", "|---|---|"]
    for reason, n in sorted(error_reasons.items(), key=lambda kv: (-kv[1], kv[0])):
      lines.append(f"| {reason} | {n} |")
    lines.append("")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write("\n".join(lines))
  os.replace(tmp, path)
