"""DICOM folders -> labelled, PHI-free ArrayRecord shards for pretraining.

  python -m data_prep.build_shards --input /data/dicom --out /data/shards \
      [--shape 48,192,192] [--overrides labels.csv] [--workers N] \
      [--taxonomy paper|extended] [--priors FILE] [--hash-paths] [--clean-work]

Re-running the same command resumes an interrupted run (finished stacks are
reused from ``OUT/.work``) and, for the same input and ``OUT/.salt``, writes
byte-identical shards. To correct labels: edit ``OUT/labels.csv`` and re-run
with ``--overrides OUT/labels.csv`` (volumes are reused; only shards are
rewritten). All logic lives in ``radnet_jax.shards.build.build_shards``.
"""
from __future__ import annotations

import argparse
import os
import sys

from radnet_jax.dicom import isolation
from radnet_jax.shards import build
from radnet_jax.shards import convert
from radnet_jax.cli import flags


def _shape(text: str) -> tuple[int, int, int]:
  try:
    shape = tuple(int(s) for s in text.replace("x", ",").split(","))
  except ValueError:
    shape = ()
  if len(shape) != 3 or min(shape) < 1:
    raise argparse.ArgumentTypeError(f"--shape wants D,H,W (e.g. 48,192,192), got {text!r}")
  return shape  # type: ignore[return-value]


def _split(text: str) -> tuple[float, float, float]:
  try:
    split = tuple(float(s) for s in text.split(","))
  except ValueError:
    split = ()
  if len(split) != 3 or min(split) < 0 or sum(split) <= 0:
    raise argparse.ArgumentTypeError(f"--split wants train,val,test fractions, got {text!r}")
  return split  # type: ignore[return-value]


def add_conversion_flags(p: flags.Parser) -> None:
  """The flags that set what a conversion writes (shared with
  ``data_prep.beam_build_shards``): grid, labels, salt, sharding, split."""
  p.add_argument("--shape", type=_shape, default=convert.DEFAULT_SHAPE,
                 help="D,H,W voxels of the stored volumes (default 48,192,192)")
  p.add_argument("--overrides", default=None,
                 help="curated labels CSV (an edited labels.csv); its labels win")
  p.add_argument("--taxonomy", choices=("paper", "extended"), default="paper")
  p.add_argument("--priors", default="builtin",
                 help="dataset-level label priors: 'builtin' (default: the "
                      "built-in collection table), 'none', or a CSV/JSON file "
                      "(its rules first, then the built-in ones)")
  p.add_argument("--salt", default=None,
                 help="hashing salt (default: $RADNET_SALT, then OUT/.salt, else new)")
  p.add_argument("--records-per-shard", type=int,
                 default=convert.DEFAULT_RECORDS_PER_SHARD)
  p.add_argument("--split", type=_split, default=convert.DEFAULT_SPLIT,
                 help="train,val,test fractions by patient (default 0.8,0.1,0.1)")
  p.add_argument("--seed", type=int, default=0, help="split seed")
  paths = p.add_mutually_exclusive_group()
  paths.add_argument("--plain-paths", dest="hash_paths", action="store_false",
                     help="write paths relative to --input in errors.csv (for "
                          "de-identified archives; the default writes salted "
                          "hashes, which python -m data_prep.locate maps back)")
  paths.add_argument("--hash-paths", dest="hash_paths", action="store_true",
                     help="salted hashes of the paths in errors.csv (default)")
  p.set_defaults(hash_paths=True)


def build_parser() -> flags.Parser:
  p = flags.Parser(prog="python -m data_prep.build_shards",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--input", required=True, help="root folder of DICOM files")
  p.add_argument("--out", required=True, help="output folder for shards + reports")
  p.add_argument("--workers", type=int, default=None,
                 help="processes (default: all cores; 1 = in-process)")
  add_conversion_flags(p)
  p.add_argument("--clean-work", action="store_true",
                 help="delete the work cache OUT/.work after a successful run")
  p.add_argument("--quiet", action="store_true", help="no progress bars / table")
  p.add_argument("--file-timeout", type=float, default=isolation.DEFAULT_FILE_TIMEOUT_S,
                 help="seconds one file may take to read and decode before its stack "
                      "is skipped as hung (default %(default)s)")
  return p


def main(argv: list[str] | None = None) -> int:
  """Exit status: 0 done (some stacks may be in errors.csv), 1 no stack could
  be converted, 2 bad arguments or input, 3 stopped by the machine (disk
  full or read-only, no permission on --out, out of memory): fix it and
  rerun the same command, which resumes from OUT/.work."""
  p = build_parser()
  args = p.parse_args(argv)
  try:
    summary = build.build_shards(
        args.input, args.out, shape=args.shape, overrides=args.overrides,
        workers=args.workers, taxonomy=args.taxonomy, priors=args.priors,
        salt=args.salt, records_per_shard=args.records_per_shard,
        seed=args.seed, split=args.split, hash_paths=args.hash_paths,
        keep_work=not args.clean_work, progress=not args.quiet,
        file_timeout_s=args.file_timeout)
  except build.RunStopped as e:
    print(f"build_shards: {e}\nbuild_shards: nothing was recorded as a data error; "
          "rerun the same command once this is fixed: finished stacks are reused "
          f"from {os.path.join(args.out, convert.WORK_DIR)}", file=sys.stderr)
    return 3
  except (FileNotFoundError, ValueError) as e:
    print(f"build_shards: error: {e}", file=sys.stderr)
    return 2
  if not sum(summary["num_records"].values()):
    what = (f"all {summary['stacks']} stacks failed" if summary["stacks"]
            else "no image stack was found")
    print(f"build_shards: error: {what}; no shard was written (reasons in "
          f"{os.path.join(args.out, 'errors.csv')})", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
