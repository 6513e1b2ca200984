"""Builds the synthetic DICOM corpus (and optionally the LiTS-layout liver set).

  python -m data_prep.make_phantoms --out DIR --n 200 --seed 0 [--lits 20]
      [--full-size] [--workers N] [--noise-scale 1.0] [--layouts]

Writes DIR/dicom/..., DIR/truth.csv and, with --lits N, DIR/lits/volume-*.nii.gz
and segmentation-*.nii.gz (with --lits-dicom also DIR/lits/dicom/case-N: the
CT as a DICOM series plus its mask as a DICOM SEG); with --layouts also DIR/layouts/ (multi-volume
DWI/DTI, fMRI, perfusion and DCE series in five vendors' one-slice-per-file conventions, and
DIR/layouts/truth.csv with one row per expected 3D volume). The logic lives in ``radnet_jax.phantom``.
"""
from __future__ import annotations

import json
import os

from radnet_jax.phantom import HeaderNoise, make_corpus, make_layouts, make_lits
from radnet_jax.cli import flags


def main(argv=None) -> None:
  ap = flags.Parser(description=__doc__, formatter_class=flags.RawDescriptionHelpFormatter)
  ap.add_argument("--out", required=True, help="output folder")
  ap.add_argument("--n", type=int, default=200, help="number of image series")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--lits", type=int, default=0, help="also write N LiTS-layout cases to OUT/lits")
  ap.add_argument("--lits-dicom", action="store_true",
                  help="LiTS cases also as CT DICOM series + DICOM SEG (OUT/lits/dicom/case-N)")
  ap.add_argument("--full-size", action="store_true", help="clinical matrix sizes and slice counts")
  ap.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
  ap.add_argument("--noise-scale", type=float, default=1.0, help="header-noise rates x this (0 = clean)")
  ap.add_argument("--layouts", action="store_true",
                  help="also write the multi-volume vendor layouts to OUT/layouts")
  args = ap.parse_args(argv)
  summary = make_corpus(args.out, n=args.n, seed=args.seed, workers=args.workers,
                        noise=HeaderNoise().scaled(args.noise_scale), full_size=args.full_size)
  print(f"{summary['n_series']} series, {summary['n_patients']} patients, {summary['n_files']} image files, "
        f"{summary['extra_objects']} localizer/non-image objects, {summary['bytes'] / 1e6:.0f} MB, "
        f"{summary['seconds']:.1f} s")
  for task, counts in summary["counts"].items():
    print(f"  {task:13s} " + "  ".join(f"{k}={v}" for k, v in sorted(counts.items())))
  if args.lits:
    res = make_lits(os.path.join(args.out, "lits"), n=args.lits, seed=args.seed, workers=args.workers,
                    dicom=args.lits_dicom, full_size=args.full_size)
    print(f"LiTS: {len(res['cases'])} cases in {res['seconds']:.1f} s: "
          + json.dumps({"with_tumour": sum(c["tumour_voxels"] > 0 for c in res["cases"])}))


  if args.layouts:
    rows = make_layouts(os.path.join(args.out, "layouts"), seed=args.seed)
    print(f"layouts: {len({r['series_uid'] for r in rows})} series, {len(rows)} volumes")


if __name__ == "__main__":
  main()
