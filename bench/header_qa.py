r"""Header QA on a phantom corpus: how many injected wrong headers does predict flag?

  python bench/header_qa.py --checkpoint /tmp/demo_h --corpus /tmp/qa_corpus \
      [--make n=120,seed=11,noise=2] [--thresholds 0.5,0.7,0.9] [--out qa.csv]

The phantom's ``truth.csv`` has the simulated truth of every series and the
header corruptions applied to it (``header_noise``). A series' header is
*wrong* for a task when the metadata rules give a known label that differs
from the truth (sequence, plane, contrast; coverage: a different band set).
The report flags a series (``qa_flag``) when the network contradicts a known
header label with probability >= threshold. Printed per threshold:

  recall      flagged / series with a wrong header (on a QA task)
  false-flag  flagged / series whose known header labels are all right
  precision   wrong / flagged

and, per injected corruption kind, how many series carry it, how many of
those end up with a wrong label, and how many of those are flagged.
``--make`` first writes a fresh corpus (different seed from the training
corpus: these series were never seen in training).
"""
from __future__ import annotations

import collections
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from radnet_jax.cli import flags as cli_flags  # noqa: E402  pylint: disable=wrong-import-position

SALT = "header-qa-bench"
TASKS = ("sequence", "plane", "contrast", "coverage")


def wrong_tasks(row: dict, truth: dict) -> list[str]:
  """QA tasks whose known header label contradicts the truth."""
  out = []
  for t in ("sequence", "plane", "contrast"):
    lab = row.get(f"label_{t}", "unknown")
    if lab != "unknown" and lab != truth[t]:
      out.append(t)
  lab = row.get("label_coverage", "unknown")
  if lab != "unknown" and set(lab.split("|")) - {""} != set(truth["coverage"].split("|")) - {""}:
    out.append("coverage")
  return out


def flagged_at(row: dict, threshold: float, tasks=TASKS) -> list[str]:
  """Tasks the report would flag at ``threshold`` (same rule as api.qa_row)."""
  out = []
  for t in ("sequence", "plane", "contrast"):
    if t in tasks and row.get(f"disagree_{t}") and row[f"prob_{t}"] >= threshold:
      out.append(t)
  if "coverage" in tasks and row.get("disagree_coverage"):
    bands = set(row["label_coverage"].split("|"))
    against = [(1.0 - v) if k[len("p_coverage_"):] in bands else v
               for k, v in row.items() if k.startswith("p_coverage_")]
    if max(against) >= threshold:
      out.append("coverage")
  return out


def main() -> None:
  ap = cli_flags.Parser(description=__doc__.splitlines()[0])
  ap.add_argument("--checkpoint", required=True)
  ap.add_argument("--corpus", required=True, help="phantom corpus dir (dicom/ + truth.csv)")
  ap.add_argument("--make", default="", help="n=120,seed=11,noise=2: write the corpus first")
  ap.add_argument("--thresholds", default="0.5,0.7,0.9")
  ap.add_argument("--detail-threshold", type=float, default=0.9,
                  help="threshold of the per-corruption table")
  ap.add_argument("--tasks", default=",".join(TASKS))
  ap.add_argument("--workers", type=int, default=1)
  ap.add_argument("--out", default="", help="also write the predictions CSV here")
  args = ap.parse_args()

  import radnet_jax
  from radnet_jax import phantom
  if args.make:
    kv = dict(p.split("=") for p in args.make.split(","))
    t0 = time.time()
    phantom.make_corpus(args.corpus, n=int(kv.get("n", 120)), seed=int(kv.get("seed", 11)),
                        workers=args.workers, progress=False,
                        noise=phantom.HeaderNoise().scaled(float(kv.get("noise", 1))))
    print(f"corpus written in {time.time() - t0:.0f} s")
  truth = phantom.load_truth(os.path.join(args.corpus, "truth.csv"), SALT)
  tasks = tuple(t for t in args.tasks.split(",") if t)
  t0 = time.time()
  loaded = radnet_jax.load(args.checkpoint)
  report = radnet_jax.predict(loaded, os.path.join(args.corpus, "dicom"), salt=SALT,
                              workers=args.workers, qa_tasks=tasks)
  secs = time.time() - t0
  if args.out:
    report.write_csv(args.out)
  rows = [r for r in report.rows if r["series_hash"] in truth]
  print(f"checkpoint {loaded.path} (step {loaded.step}); corpus {args.corpus}: "
        f"{len(truth)} series in truth.csv, {len(rows)} predicted stacks, "
        f"{len(report.skipped)} skipped files, {secs:.0f} s")

  # Network accuracy against the simulator truth (context for the flags).
  from radnet_jax.labels.taxonomy import Taxonomy
  acc = []
  for t in ("sequence", "plane", "contrast"):
    classes = Taxonomy(loaded.taxonomy).classes(t)
    ok = [r[f"pred_{t}"] == truth[r["series_hash"]][t] for r in rows
          if truth[r["series_hash"]][t] in classes]   # PT has no class in "paper"
    acc.append(f"{t} {np.mean(ok):.3f} (n={len(ok)})")
  hdr = []
  for t in ("sequence", "plane", "contrast"):
    known = [r for r in rows if r[f"label_{t}"] != "unknown"]
    right = sum(r[f"label_{t}"] == truth[r["series_hash"]][t] for r in known)
    hdr.append(f"{t} {right}/{len(known)}")
  print("network accuracy vs truth: " + ", ".join(acc))
  print("header labels right (known): " + ", ".join(hdr))

  wrong = {r["stack_key"]: [t for t in wrong_tasks(r, truth[r["series_hash"]]) if t in tasks]
           for r in rows}
  n_wrong = sum(bool(v) for v in wrong.values())
  n_right = len(rows) - n_wrong
  print(f"\nstacks with a wrong header label (on {','.join(tasks)}): {n_wrong}; "
        f"with all known labels right: {n_right}")
  print("\n| threshold | flagged | recall (wrong headers flagged) | false-flag rate | precision |")
  print("|---|---|---|---|---|")
  for thr in (float(x) for x in args.thresholds.split(",")):
    flags = {r["stack_key"]: flagged_at(r, thr, tasks) for r in rows}
    tp = sum(bool(flags[k]) and bool(wrong[k]) for k in flags)
    fp = sum(bool(flags[k]) and not wrong[k] for k in flags)
    nf = sum(bool(v) for v in flags.values())
    rec = f"{tp}/{n_wrong} = {tp / n_wrong:.2f}" if n_wrong else "-"
    ffr = f"{fp}/{n_right} = {fp / n_right:.3f}" if n_right else "-"
    prec = f"{tp}/{nf} = {tp / nf:.2f}" if nf else "-"
    print(f"| {thr:g} | {nf} | {rec} | {ffr} | {prec} |")

  thr = args.detail_threshold
  print(f"\nper injected corruption (threshold {thr:g}):")
  print("| header_noise | stacks | wrong label | flagged of wrong | by task (wrong: flagged) |")
  print("|---|---|---|---|---|")
  kinds = collections.defaultdict(list)
  for r in rows:
    for k in (truth[r["series_hash"]]["header_noise"] or "none").split("|"):
      kinds[k].append(r)
  for k in sorted(kinds):
    rs = kinds[k]
    w = [r for r in rs if wrong[r["stack_key"]]]
    f = [r for r in w if flagged_at(r, thr, tasks)]
    by = collections.Counter(t for r in w for t in wrong[r["stack_key"]])
    byf = collections.Counter(t for r in w for t in wrong[r["stack_key"]]
                              if t in flagged_at(r, thr, tasks))
    detail = ", ".join(f"{t} {by[t]}: {byf[t]}" for t in sorted(by))
    print(f"| {k} | {len(rs)} | {len(w)} | {len(f)} | {detail} |")


if __name__ == "__main__":
  main()
