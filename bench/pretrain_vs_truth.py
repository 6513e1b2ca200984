"""Pretraining demo accuracy against header labels *and* the phantom's truth.

  python bench/pretrain_vs_truth.py WORKDIR CORPUS_DIR SHARDS_DIR [--split test] [--errors contrast]

WORKDIR: a pretraining run (``run.py --config=experiments/pretrain.py``);
CORPUS_DIR holds the phantom's ``truth.csv``; SHARDS_DIR the converted shards
(for the demo: ``<cache>/phantom-v2-n480-s0-36x72x72/{corpus,shards-0.7-0.1-0.2}``).
The model is trained and tested on header-derived labels; the simulator knows
the true sequence / plane / contrast / coverage of every series, so this
prints, per task, the accuracy against the header labels (records whose
header label is known, as the trainer reports it) and against the truth (all
records whose truth is in the task's classes, including those with an
unknown header label). Records are joined on the salted SeriesHash.
A second table splits the header-label accuracy by the truth's modality and
region (``CT brain``, ``MR abdomen``, ...), to see where the errors are;
``--errors TASK`` lists each wrong record of one task (``coverage``: the bands
missed and the bands added, with their probabilities) with its truth, header
label and header noise (a header label the noise flipped is an "error" the
network got right).
"""
from __future__ import annotations

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from radnet_jax import api, privacy  # noqa: E402  pylint: disable=wrong-import-position
from radnet_jax.data import augment
from radnet_jax.shards import convert
from radnet_jax.labels import taxonomy as tax
from radnet_jax.phantom import load_truth
from radnet_jax.cli import flags

TASKS = ("sequence", "plane", "contrast")


def main() -> None:
  p = flags.Parser(description=__doc__.split("\n")[0])
  p.add_argument("workdir")
  p.add_argument("corpus")
  p.add_argument("shards")
  p.add_argument("--split", default="test")
  p.add_argument("--prefer", default="best", help="best | latest checkpoint")
  p.add_argument("--errors", default="", choices=("", *TASKS, "coverage"),
                 help="also list the records whose prediction of this task differs from its header label")
  a = p.parse_args()
  loaded = api.load(a.workdir, prefer=a.prefer)
  model, variables, config = loaded
  taxonomy = tax.Taxonomy(config.get("taxonomy", "paper"))
  shape = tuple(int(s) for s in config.input_shape)
  truth = load_truth(os.path.join(a.corpus, "truth.csv"), privacy.load_salt(a.shards))
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])

  bands = list(tax.COVERAGE_BANDS)
  stats = {t: {"header": [0, 0], "truth": [0, 0]} for t in (*TASKS, "coverage")}
  by_group: dict = {}
  missing = 0
  errors: list = []
  for rec in convert.iter_records(a.shards, a.split):
    row = truth.get(rec.get("series"))
    if row is None:
      missing += 1
      continue
    x = augment.crop_or_pad(np.asarray(rec["volume"], np.float32), shape)[None, ..., None]
    out = jax.device_get(fwd(variables, x))
    labels = rec.get("labels", {})
    group = by_group.setdefault(f"{row['modality']} {row['region']}",
                                {t: [0, 0] for t in (*TASKS, "coverage")})
    for t in TASKS:
      if t not in out:
        continue
      classes = taxonomy.classes(t)
      pred = classes[int(np.argmax(out[t][0]))]
      head = labels.get(t, "unknown")
      if t == a.errors and head in classes and pred != head:
        errors.append(f"| {row['modality']} {row['region']} | {row['sequence']} {row['plane']} | {row[t]} | "
                      f"{head} | {pred} ({float(np.max(jax.nn.softmax(out[t][0]))):.2f}) | "
                      f"{row['header_noise'] or '-'} |")
      if head in classes:
        stats[t]["header"][0] += 1
        stats[t]["header"][1] += int(pred == head)
        group[t][0] += 1
        group[t][1] += int(pred == head)
      if str(row[t]) in classes:
        stats[t]["truth"][0] += 1
        stats[t]["truth"][1] += int(pred == str(row[t]))
    if "coverage" in out:
      pred = {b for b, z in zip(bands, out["coverage"][0]) if z > 0}
      head = rec.get("coverage")
      if rec.get("targets", {}).get("coverage_mask"):
        want = {b for b, v in zip(bands, np.asarray(head).reshape(-1)) if v > 0.5}
        stats["coverage"]["header"][0] += 1
        stats["coverage"]["header"][1] += int(pred == want)
        group["coverage"][0] += 1
        group["coverage"][1] += int(pred == want)
        if a.errors == "coverage" and pred != want:
          z = np.asarray(out["coverage"][0], np.float64)
          p_of = lambda b: f"{b} {1 / (1 + np.exp(-z[bands.index(b)])):.2f}"
          errors.append(f"| {row['modality']} {row['region']} | {row['sequence']} {row['plane']} | "
                        f"{'|'.join(b for b in bands if b in want) or '-'} | "
                        f"{', '.join(p_of(b) for b in bands if b in want - pred) or '-'} | "
                        f"{', '.join(p_of(b) for b in bands if b in pred - want) or '-'} |")
      true = {b for b in str(row["coverage"]).split("|") if b}  # truth.csv: "a|b|c"
      stats["coverage"]["truth"][0] += 1
      stats["coverage"]["truth"][1] += int(pred == true)

  print(f"{a.split} split of {a.shards}, checkpoint {loaded.step} of {a.workdir}")
  print("| task | metric | vs header labels (N) | vs truth (N) |")
  print("|---|---|---|---|")
  for t, s in stats.items():
    cells = []
    for k in ("header", "truth"):
      n, ok = s[k]
      cells.append(f"{ok / n:.3f} ({n})" if n else "- (0)")
    metric = "exact match" if t == "coverage" else "accuracy"
    print(f"| {t} | {metric} | {cells[0]} | {cells[1]} |")
  print()
  print("| truth modality, region | " + " | ".join(f"{t} (N)" for t in (*TASKS, "coverage")) + " |")
  print("|---|" + "---|" * (len(TASKS) + 1))
  for g in sorted(by_group):
    cells = [f"{ok}/{n}" if n else "-" for n, ok in (by_group[g][t] for t in (*TASKS, "coverage"))]
    print(f"| {g} | " + " | ".join(cells) + " |")
  if missing:
    print(f"({missing} records without a truth row)")
  if a.errors:
    print(f"\n{len(errors)} {a.errors} errors against the header label (sorted):")
    if a.errors == "coverage":
      print("| truth modality, region | truth sequence, plane | header bands | missed (p) | extra (p) |")
      print("|---|---|---|---|---|")
    else:
      print("| truth modality, region | truth sequence, plane | truth | header label | predicted (p) | header noise |")
      print("|---|---|---|---|---|---|")
    print("\n".join(sorted(errors)))


if __name__ == "__main__":
  main()
