"""Find the input files behind the hashed paths of a conversion's errors.csv.

  python -m data_prep.locate --input /data/dicom --shards /data/shards [HASH ...]

``build_shards`` writes salted hashes instead of paths in ``errors.csv``
(archive folders are often named after patients). Run this where the archive
is: it hashes every path under ``--input`` with the shards' salt
(``--shards``/.salt, ``--salt`` or $RADNET_SALT) and prints ``hash<TAB>path``
for the given hashes, or for every row of ``<shards>/errors.csv`` when none is
given. It prints only; nothing is written.
"""
from __future__ import annotations

import csv
import os
import sys

from radnet_jax.shards import convert
from radnet_jax.cli import flags


def build_parser() -> flags.Parser:
  p = flags.Parser(prog="python -m data_prep.locate",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--input", required=True,
                 help="the --input folder the conversion was given")
  p.add_argument("--shards", required=True,
                 help="the conversion's output folder (its .salt, errors.csv)")
  p.add_argument("--salt", default=None, help="the conversion's salt, if not in --shards")
  p.add_argument("hashes", nargs="*", help="hashed paths (default: all of errors.csv)")
  return p


def main(argv: list[str] | None = None) -> int:
  a = build_parser().parse_args(argv)
  hashes = list(a.hashes)
  reasons: dict[str, str] = {}
  if not hashes:
    path = os.path.join(a.shards, "errors.csv")
    if not os.path.exists(path):
      print(f"locate: error: {path}: no errors.csv", file=sys.stderr)
      return 2
    with open(path, newline="") as f:
      for row in csv.DictReader(f):
        hashes.append(row["path"])
        reasons.setdefault(row["path"], row.get("reason", ""))
  try:
    found = convert.locate(a.input, a.shards, hashes, salt=a.salt)
  except FileNotFoundError as e:
    print(f"locate: error: {e}", file=sys.stderr)
    return 2
  for h in dict.fromkeys(hashes):
    where = found.get(h, "(not found under --input: other input or salt?)")
    line = f"{h}\t{where}"
    if reasons.get(h):
      line += f"\t{reasons[h]}"
    print(line)
  return 0 if found else 1


if __name__ == "__main__":
  sys.exit(main())
