"""LiTS-format NIfTI folder (or DICOM CT + SEG folder) -> segmentation shards.

  python -m data_prep.build_seg_shards --input LITS_DIR --out DIR \
      [--format auto|nifti|dicom] [--spacing 2.5,1.5,1.5] [--window=-200,250] \
      [--range 0,1] [--val-fraction 0] [--test-fraction 0.25] [--seed 0] \
      [--label-map "Liver parenchyma=1,Kidney=0"] [--workers 1] [--unlabelled]

LITS_DIR holds volume-N.nii[.gz] and segmentation-N.nii[.gz] (any depth), or
(DICOM) CT series and the DICOM SEG objects that reference them (any layout;
segments named liver -> 1, tumour/lesion/neoplasm -> 2, others need
--label-map). DICOM case ids are salted series hashes (salt: $RADNET_SALT or
DIR/.salt). Writes DIR/seg_{train,val,test}.array_record and DIR/manifest.json;
the logic lives in radnet_jax.shards.seg and radnet_jax.dicom.seg.
"""
from __future__ import annotations

import argparse
import sys

from radnet_jax.shards import seg as segdata
from radnet_jax.cli import flags


def _floats(text: str, n: int, what: str) -> tuple:
  try:
    vals = tuple(float(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--{what}: expected {n} comma-separated "
                                     f"numbers, got {text!r}") from None
  if len(vals) != n:
    raise argparse.ArgumentTypeError(f"--{what}: expected {n} numbers, got {text!r}")
  return vals


def _label_map(text: str) -> dict:
  out = {}
  for item in filter(None, (t.strip() for t in text.split(","))):
    name, sep, value = item.rpartition("=")
    if not sep or not name.strip():
      raise argparse.ArgumentTypeError(f"--label-map: expected NAME=VALUE items, got {item!r}")
    try:
      out[name.strip()] = int(value)
    except ValueError:
      raise argparse.ArgumentTypeError(f"--label-map: {item!r}: value must be 0, 1 or 2"
                                       ) from None
  return out


def main(argv: list[str] | None = None) -> int:
  p = flags.Parser(description=__doc__.split("\n\n")[0])
  p.add_argument("--input", required=True, help="LiTS-format folder or DICOM CT + SEG folder")
  p.add_argument("--format", default="auto", choices=("auto", "nifti", "dicom"),
                 help="input kind (auto: NIfTI when volume-*.nii* files exist)")
  p.add_argument("--label-map", default="",
                 help="DICOM SEG segment label -> 0 (ignore) / 1 (liver) / 2 (tumour)")
  p.add_argument("--workers", type=int, default=1, help="DICOM header-scan processes")
  p.add_argument("--unlabelled", action="store_true",
                 help="DICOM: also convert CT series that no SEG references (no mask)")
  p.add_argument("--out", required=True, help="output shard folder")
  p.add_argument("--spacing", default="2.5,1.5,1.5",
                 help="target voxel size D,H,W in mm")
  p.add_argument("--window", default="-200,250", help="HU window lo,hi (write --window=-200,250)")
  p.add_argument("--range", default="0,1", help="output range of the window")
  p.add_argument("--val-fraction", type=float, default=0.0)
  p.add_argument("--test-fraction", type=float, default=0.25)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  try:
    cfg = segdata.SegPrepConfig(
        spacing=_floats(a.spacing, 3, "spacing"),
        window=_floats(a.window, 2, "window"),
        out_range=_floats(a.range, 2, "range"),
        val_fraction=a.val_fraction, test_fraction=a.test_fraction, seed=a.seed)
    label_map = _label_map(a.label_map)
  except argparse.ArgumentTypeError as e:
    p.error(str(e))
  manifest = segdata.build_shards(a.input, a.out, cfg, fmt=a.format,
                                  label_map=label_map or None, workers=a.workers,
                                  unlabelled=a.unlabelled)
  return 0 if sum(manifest["counts"].values()) else 1


if __name__ == "__main__":
  sys.exit(main())
