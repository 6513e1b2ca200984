r"""Header QA: predict every series of a DICOM folder and compare with its metadata.

  python -m radnet_jax.cli.predict --checkpoint workdirs/pretrain --input /data/dicom \
      --out predictions.csv [--threshold 0.9] [--workers 4]

Writes ``predictions.csv`` (one row per stack: the network's class and
probabilities for each task next to the metadata label and the rule that
produced it, ``disagree_<task>`` flags and ``qa_flag``; salted hashes only,
no identifiers) and ``predictions_skipped.csv`` (files and series without a
prediction, with the reason), then prints a summary. ``--input`` may also be
a NIfTI file or a folder of NIfTI files (no metadata labels then).

The library function behind it is ``radnet_jax.predict(checkpoint, input, ...)``
(``radnet_jax.inference.predict``; see there for the arguments and columns).
Argument parsing only: jax is imported when the checkpoint is loaded, so
``--help`` and a bad flag answer at once.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import Sequence

from radnet_jax import api
from radnet_jax import privacy
from radnet_jax.cli import flags
from radnet_jax.inference.header_qa import DEFAULT_THRESHOLD, QA_TASKS, Report


def summary_text(report: Report, threshold: float) -> str:
  """A short plain-text summary of a report (counts per task, skip reasons)."""
  rows = report.rows
  lines = [f"{len(rows)} stack(s) predicted, {len(report.flagged)} flagged by header QA "
           f"(threshold {threshold:g}), {len(report.skipped)} file(s)/series skipped"]
  tasks = [c[len("disagree_"):] for c in report.columns if c.startswith("disagree_")]
  for t in tasks:
    n_dis = sum(bool(r.get(f"disagree_{t}")) for r in rows)
    if t == "spacing":
      n_known = sum(r.get("label_spacing_mm") == r.get("label_spacing_mm") for r in rows)  # not NaN
    else:
      n_known = sum(r.get(f"label_{t}", "unknown") != "unknown" for r in rows)
    lines.append(f"  {t:<9} header known for {n_known:4d}, network disagrees on {n_dis:4d}")
  by = collections.Counter(t for r in rows for t in str(r.get("qa_tasks", "")).split("|") if t)
  if by:
    lines.append("  qa flags by task: " + ", ".join(f"{k} {v}" for k, v in by.most_common()))
  reasons = collections.Counter(s.reason.split(":")[0] if s.stage != "scan" else s.reason
                                for s in report.skipped)
  for reason, n in reasons.most_common(8):
    lines.append(f"  skipped {n:4d}: {reason[:100]}")
  return "\n".join(lines)


def _threshold(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = float("nan")
  if not 0 < value <= 1:
    raise argparse.ArgumentTypeError(f"must be a probability in (0, 1], got {text!r}")
  return value


def build_parser() -> flags.Parser:
  """The command-line parser (documented flags are tested against it)."""
  ap = flags.Parser(
      prog="python -m radnet_jax.cli.predict",
      description="Predict every series of a DICOM folder (or NIfTI) with a RadNet "
                  "checkpoint and flag headers that the pixels contradict.")
  ap.add_argument("--checkpoint", required=True,
                  help="run workdir, checkpoints/ or best/ folder, step folder (local or gs://)")
  ap.add_argument("--input", required=True, help="DICOM folder/file, NIfTI file or folder")
  ap.add_argument("--out", default="predictions.csv", help="predictions CSV")
  ap.add_argument("--skipped", default=None,
                  help="skipped-inputs CSV (default: <out stem>_skipped.csv)")
  ap.add_argument("--threshold", type=_threshold, default=DEFAULT_THRESHOLD,
                  help="confidence of the network needed to flag a header (0-1]")
  ap.add_argument("--qa-tasks", default=",".join(QA_TASKS),
                  help="comma-separated tasks that can raise qa_flag")
  ap.add_argument("--prefer", choices=("best", "latest"), default="best",
                  help="which checkpoint of a workdir")
  ap.add_argument("--batch-size", type=int, default=4)
  ap.add_argument("--workers", type=int, default=1, help="processes loading volumes")
  ap.add_argument("--salt", default=None,
                  help="hashing salt (default: $RADNET_SALT, else <out dir>/.salt, created)")
  ap.add_argument("--priors", default=None, help="label priors: builtin or a file")
  ap.add_argument("--modality", default=None, help="modality of NIfTI inputs (CT, MR)")
  ap.add_argument("--dtype", default=None, help="compute dtype override, e.g. float32")
  paths = ap.add_mutually_exclusive_group()
  paths.add_argument("--plain-paths", dest="hash_paths", action="store_false",
                     help="skipped files by path relative to --input (for de-identified "
                          "archives; the default writes salted hashes, as build_shards)")
  paths.add_argument("--hash-paths", dest="hash_paths", action="store_true",
                     help="skipped files by salted hash of the relative path (default)")
  ap.set_defaults(hash_paths=True)
  ap.add_argument("--no-progress", action="store_true")
  return ap


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry; returns the exit status (2 for an unusable checkpoint, input or
  salt: one line on stderr, no traceback)."""
  args = build_parser().parse_args(argv)
  if "://" not in args.input and not os.path.exists(args.input):
    print(f"error: {args.input}: input does not exist", file=sys.stderr)
    return 2
  qa_tasks = tuple(t.strip() for t in args.qa_tasks.split(",") if t.strip())
  try:
    salt = privacy.load_or_create_salt(os.path.dirname(os.path.abspath(args.out)),
                                       args.salt)
    loaded = api.load(args.checkpoint, prefer=args.prefer, dtype=args.dtype)
  except (FileNotFoundError, ValueError, PermissionError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    report = api.predict(loaded, args.input, threshold=args.threshold, qa_tasks=qa_tasks,
                         batch_size=args.batch_size, salt=salt, priors=args.priors,
                         modality=args.modality, workers=args.workers,
                         progress=not args.no_progress, hash_paths=args.hash_paths)
  except (FileNotFoundError, ValueError) as e:  # missing input, segmentation checkpoint
    print(f"error: {e}", file=sys.stderr)
    return 2
  out, skipped = report.write_csv(args.out, args.skipped)
  print(summary_text(report, args.threshold))
  print(f"wrote {out} and {skipped} (checkpoint step {loaded.step})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
