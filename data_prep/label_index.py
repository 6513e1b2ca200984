"""Label every row of a DICOM metadata index (CSV or Parquet), without pixels.

  python -m data_prep.label_index --index idc_index.parquet --out labelled.parquet \
      [--taxonomy paper|extended] [--priors my_priors.csv] [--no-builtin-priors] \
      [--hash-ids]

Keeps the input columns (direct identifiers such as PatientName are dropped),
adds ``sequence``, ``plane``, ``contrast``, ``coverage``, ``spacing`` and one
``<task>_provenance`` column each, and prints the label distribution per task.
"""
from __future__ import annotations

import os
import sys

from radnet_jax.labels.index import PHI_COLUMNS, distribution, label_index_file
from radnet_jax.labels.priors import Priors
from radnet_jax.privacy import SALT_ENV, load_or_create_salt
from radnet_jax.cli import flags


def main(argv: list[str] | None = None) -> int:
  p = flags.Parser(description=__doc__.split("\n\n")[0])
  p.add_argument("--index", required=True, help="input .csv[.gz] or .parquet")
  p.add_argument("--out", required=True, help="output .csv[.gz] or .parquet")
  p.add_argument("--taxonomy", default="paper", choices=("paper", "extended"))
  p.add_argument("--priors", default=None,
                 help="CSV/JSON of per-collection priors (tried before the built-in ones)")
  p.add_argument("--no-builtin-priors", action="store_true",
                 help="do not use the built-in table of well-known collections")
  p.add_argument("--hash-ids", action="store_true",
                 help="replace PatientID/Study/Series/SOP UIDs with salted hashes "
                      f"(salt: ${SALT_ENV} or <out dir>/.salt)")
  args = p.parse_args(argv)

  try:
    if args.priors:
      priors = Priors.from_file(args.priors, include_builtin=not args.no_builtin_priors)
    else:
      priors = None if args.no_builtin_priors else Priors.builtin()
    salt = (load_or_create_salt(os.path.dirname(os.path.abspath(args.out)))
            if args.hash_ids else None)
    df, times = label_index_file(args.index, args.out, args.taxonomy, priors, salt)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(distribution(df))
  print(f"{len(df)} rows labelled ({args.taxonomy} taxonomy, "
        f"{len(priors) if priors else 0} prior rules) -> {args.out}")
  print(f"time: read {times['read']:.1f}s, label {times['label']:.1f}s, "
        f"write {times['write']:.1f}s, total {times['total']:.1f}s")
  print(f"(columns never written: {', '.join(PHI_COLUMNS[:4])}, ...)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
