"""LiTS-format NIfTI folder -> segmentation ArrayRecord shards.

  python -m data_prep.build_seg_shards --input LITS_DIR --out DIR \
      [--spacing 2.5,1.5,1.5] [--window=-200,250] [--range 0,1] \
      [--val_fraction 0] [--test_fraction 0.25] [--seed 0]

LITS_DIR holds volume-N.nii[.gz] and segmentation-N.nii[.gz] (any depth).
Writes DIR/seg_{train,val,test}.array_record and DIR/manifest.json; the logic
lives in radnet_jax.segdata.
"""
from __future__ import annotations

import argparse
import sys

from radnet_jax import segdata


def _floats(text: str, n: int, what: str) -> tuple:
  try:
    vals = tuple(float(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--{what}: expected {n} comma-separated "
                                     f"numbers, got {text!r}") from None
  if len(vals) != n:
    raise argparse.ArgumentTypeError(f"--{what}: expected {n} numbers, got {text!r}")
  return vals


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--input", required=True, help="LiTS-format folder")
  p.add_argument("--out", required=True, help="output shard folder")
  p.add_argument("--spacing", default="2.5,1.5,1.5",
                 help="target voxel size D,H,W in mm")
  p.add_argument("--window", default="-200,250", help="HU window lo,hi (write --window=-200,250)")
  p.add_argument("--range", default="0,1", help="output range of the window")
  p.add_argument("--val_fraction", type=float, default=0.0)
  p.add_argument("--test_fraction", type=float, default=0.25)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  try:
    cfg = segdata.SegPrepConfig(
        spacing=_floats(a.spacing, 3, "spacing"),
        window=_floats(a.window, 2, "window"),
        out_range=_floats(a.range, 2, "range"),
        val_fraction=a.val_fraction, test_fraction=a.test_fraction, seed=a.seed)
  except argparse.ArgumentTypeError as e:
    p.error(str(e))
  manifest = segdata.build_shards(a.input, a.out, cfg)
  return 0 if sum(manifest["counts"].values()) else 1


if __name__ == "__main__":
  sys.exit(main())
