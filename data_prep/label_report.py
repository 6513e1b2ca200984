"""Header-derived labels vs phantom ground truth: per-task accuracy and confusion.

  python -m data_prep.label_report --corpus DIR [--taxonomy paper] [--workers 2]

Scans DIR/dicom with ``radnet_jax.dicom.scan``, labels every stack with
``radnet_jax.labels.label``, joins with DIR/truth.csv (``load_truth``) and
prints per task: coverage (fraction of series decided), accuracy on decided
series, and the confusion of header label vs truth. Coverage (body bands) is
scored as exact set match and as per-band accuracy.
"""
from __future__ import annotations

import collections
import os

from radnet_jax.dicom import scan
from radnet_jax.labels import label
from radnet_jax.labels.taxonomy import COVERAGE_BANDS, SEQUENCE_CLASSES
from radnet_jax.phantom.truth import load_truth
from radnet_jax.cli import flags

SALT = "label-report"


def evaluate(corpus: str, taxonomy: str = "paper", workers: int = 1) -> dict:
  """-> {task: {"n", "decided", "correct", "confusion": Counter((truth, label))}}."""
  truth = load_truth(os.path.join(corpus, "truth.csv"), SALT)
  res = scan(os.path.join(corpus, "dicom"), salt=SALT, workers=workers)
  stats = {t: {"n": 0, "decided": 0, "correct": 0, "confusion": collections.Counter()}
           for t in ("sequence", "plane", "contrast", "coverage", "spacing")}
  band = collections.Counter()
  seen = set()
  for stack in res.stacks:
    row = truth.get(stack.record.get("SeriesHash"))
    if row is None or stack.record["SeriesHash"] in seen:
      continue
    seen.add(stack.record["SeriesHash"])
    lab = label(stack.record, taxonomy=taxonomy)
    for task, st in stats.items():
      if task == "sequence" and row["sequence"] not in SEQUENCE_CLASSES[taxonomy]:
        continue   # outside this taxonomy (PT under 'paper'): not scored
      st["n"] += 1
      lb = lab[task]
      want = row[task] if task != "spacing" else float(row["spacing"])
      got = lb.as_text() if task != "spacing" else (lb.value if lb.known else None)
      if task == "coverage":
        want = row["coverage"]
      st["confusion"][(str(want), str(got) if lb.known else "unknown")] += 1
      if not lb.known:
        continue
      st["decided"] += 1
      if task == "spacing":
        st["correct"] += abs(float(got) - want) <= 0.05 * want + 0.01
      else:
        st["correct"] += got == want
      if task == "coverage":
        tv, lv = set(want.split("|")) - {""}, set(lb.value)
        for b in COVERAGE_BANDS:
          band[b] += (b in tv) == (b in lv)
  stats["coverage"]["band_accuracy"] = {b: band[b] / max(stats["coverage"]["decided"], 1) for b in COVERAGE_BANDS}
  stats["_summary"] = {"truth_series": len(truth), "matched": len(seen), "skipped_objects": len(res.skipped)}
  return stats


def format_report(stats: dict) -> str:
  s = stats["_summary"]
  lines = [f"series in truth: {s['truth_series']}, matched to scanned stacks: {s['matched']}, "
           f"skipped objects (localizers, SR, PR): {s['skipped_objects']}", "",
           "| task | scored | decided (coverage) | accuracy on decided |", "|---|---|---|---|"]
  for task in ("sequence", "plane", "contrast", "coverage", "spacing"):
    st = stats[task]
    lines.append(f"| {task} | {st['n']} | {st['decided'] / max(st['n'], 1):.1%} | {st['correct'] / max(st['decided'], 1):.1%} |")
  lines.append("")
  lines.append("coverage per-band accuracy: " + ", ".join(f"{b} {v:.0%}" for b, v in stats["coverage"]["band_accuracy"].items()))
  for task in ("sequence", "plane", "contrast"):
    conf = stats[task]["confusion"]
    truths = sorted({t for t, _ in conf})
    got = sorted({g for _, g in conf})
    lines += ["", f"{task}: rows = truth, columns = header label",
              "| truth \\ label | " + " | ".join(got) + " |", "|---" * (len(got) + 1) + "|"]
    for t in truths:
      lines.append(f"| {t} | " + " | ".join(str(conf[(t, g)]) for g in got) + " |")
  return "\n".join(lines)


def main(argv=None) -> None:
  ap = flags.Parser(description=__doc__, formatter_class=flags.RawDescriptionHelpFormatter)
  ap.add_argument("--corpus", required=True)
  ap.add_argument("--taxonomy", default="paper", choices=sorted(SEQUENCE_CLASSES))
  ap.add_argument("--workers", type=int, default=1)
  args = ap.parse_args(argv)
  print(format_report(evaluate(args.corpus, args.taxonomy, args.workers)))


if __name__ == "__main__":
  main()
