"""Label-noise ceiling of a phantom corpus: header labels vs simulator truth.

  python bench/pretrain_label_noise.py ~/.cache/radnet_jax/phantom-n240-s0-36x72x72

Joins every shard record (by its salted SeriesHash) with the corpus's
``truth.csv`` and prints, per split and task, how many labels are known, and
how often a known header label disagrees with the truth. A model trained and
tested on header labels cannot be judged beyond that agreement: this is the
ceiling the demo's accuracies should be read against.
"""
from __future__ import annotations

import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from radnet_jax import privacy  # noqa: E402  pylint: disable=wrong-import-position
from radnet_jax.shards import convert
from radnet_jax.phantom import load_truth

TASKS = ("sequence", "plane", "contrast", "coverage")


def main(root: str) -> None:
  shards = os.path.join(root, "shards")
  truth = load_truth(os.path.join(root, "corpus", "truth.csv"),
                     privacy.load_salt(shards))
  print(f"| split | task | records | known | disagree with truth | ceiling |")
  print("|---|---|---|---|---|---|")
  for split in ("train", "val", "test"):
    stats = collections.defaultdict(lambda: [0, 0, 0])
    missing = 0
    for rec in convert.iter_records(shards, split):
      row = truth.get(rec.get("series"))
      if row is None:
        missing += 1
        continue
      for t in TASKS:
        s = stats[t]
        s[0] += 1
        lab = rec.get("labels", {}).get(t, "unknown")
        if lab in ("unknown", "other", None):
          continue
        s[1] += 1
        want = str(row[t])
        s[2] += int(str(lab) != want)
    for t in TASKS:
      n, known, bad = stats[t]
      ceil = 1 - bad / known if known else float("nan")
      print(f"| {split} | {t} | {n} | {known} | {bad} ({bad / max(known, 1):.1%}) | {ceil:.1%} |")
    if missing:
      print(f"| {split} | (records without a truth row) | {missing} | | | |")


if __name__ == "__main__":
  main(os.path.expanduser(sys.argv[1]))
