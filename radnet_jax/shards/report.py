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
    """Writes ``montage_<task>.png`` per task; returns the file names.

    One row per class (its name and count on the left), one tile per kept
    mid-slice (windowed to its own min..max, the stack name above it),
    drawn with Pillow: a montage costs milliseconds, where importing
    matplotlib alone cost more than converting a small archive (issue 15).
    The bytes depend only on the images and names (no timestamps), so
    re-runs write identical files.
    """
    from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
    tile, label_w, title_h, name_h = 96, 110, 18, 11
    written = []
    for task, classes in task_classes.items():
      by_class = self.slices.get(task, {})
      order = [c for c in classes if c in by_class]
      order += sorted(c for c in by_class if c not in order)
      if not order:
        continue
      ncol = self.per_class
      row_h = tile + name_h + 4
      canvas = Image.new("L", (label_w + ncol * (tile + 4), title_h + len(order) * row_h),
                         255)
      draw = ImageDraw.Draw(canvas)
      draw.text((4, 3), f"{task}: mid-slices per class", fill=0)
      for r, cls in enumerate(order):
        items = by_class[cls]
        y0 = title_h + r * row_h
        draw.text((4, y0 + tile // 2 - 6), f"{cls}"[:17], fill=0)
        draw.text((4, y0 + tile // 2 + 6), f"(n={len(items)} shown)", fill=90)
        for c, (name, img) in enumerate(items[:ncol]):
          x0 = label_w + c * (tile + 4)
          draw.text((x0, y0), name[:8], fill=60)
          canvas.paste(_tile(img, tile), (x0, y0 + name_h))
      fname = f"montage_{task}.png"
      canvas.save(os.path.join(out_dir, fname), optimize=False)
      written.append(fname)
    return written


def _tile(img: np.ndarray, size: int):
  """A mid-slice (H, W) as a size x size grey tile (aspect kept, centred),
  windowed to its own min..max."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  img = np.asarray(img, np.float32)
  lo, hi = float(np.min(img)), float(np.max(img))
  grey = np.clip((img - lo) / (hi - lo if hi > lo else 1.0) * 255.0, 0, 255)
  im = Image.fromarray(grey.astype(np.uint8), "L")
  h, w = img.shape
  scale = size / max(h, w)
  im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                 Image.Resampling.BILINEAR)
  out = Image.new("L", (size, size), 0)
  out.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
  return out


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
