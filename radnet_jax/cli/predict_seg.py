"""Liver segmentation of a new CT with a trained run: NIfTI in -> NIfTI mask,
DICOM series in -> DICOM SEG (optionally also a NIfTI mask).

  python -m radnet_jax.cli.predict_seg --workdir RUN --input PATH --out PATH \
      [--prefer best|latest] [--nifti-out MASK.nii.gz] [--series N]

PATH is a ``.nii``/``.nii.gz`` CT (HU) -> ``--out`` is the uint8 mask NIfTI
on the input's grid; or a folder (or one file) holding a CT DICOM series ->
``--out`` is a DICOM SEG (``.dcm``) that references the series' images, with
one segment per class the run predicts (Liver; Tumour for 3-class runs), so
OHIF / 3D Slicer overlay it on the CT. ``--series N`` picks the CT series
with SeriesNumber N when the folder holds several. RUN is a workdir written
by ``python run.py --config=experiments/transfer_liver.py``; its
preprocessing (spacing, HU window, orientation, labels) is the run's
``contract.json``.

DICOM input: the NIfTI mask is written before the SEG; if the SEG cannot be
written (anonymised headers whose UIDs are not UIDs, ...) the command says
why, keeps the mask (``--nifti-out``, else ``--out`` with ``.nii.gz`` for
``.dcm``) and exits with status 2 (1: nothing written).
"""
from __future__ import annotations

import logging
import sys

from radnet_jax.cli import flags
from radnet_jax.dicom.errors import DicomError

log = logging.getLogger(__name__)


def build_parser() -> flags.Parser:
  """The command-line parser (``tests/test_docs.py`` checks docs against it)."""
  p = flags.Parser(prog="python -m radnet_jax.cli.predict_seg",
                   description=__doc__.split("\n\n")[0],
                   formatter_class=flags.RawDescriptionHelpFormatter,
                   epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("--workdir", required=True, help="trained segmentation run")
  p.add_argument("--input", required=True, help="CT NIfTI file or DICOM series folder")
  p.add_argument("--out", required=True, help="mask NIfTI (NIfTI input) or SEG .dcm "
                                              "(DICOM input)")
  p.add_argument("--prefer", default="best", choices=("best", "latest"),
                 help="checkpoint (best falls back to latest when the run has none)")
  p.add_argument("--nifti-out", default="", help="DICOM input: also write a NIfTI mask")
  p.add_argument("--series", type=int, default=None, help="SeriesNumber to segment")
  return p


def main(argv: list[str] | None = None) -> int:
  a = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  logging.getLogger("highdicom").setLevel(logging.WARNING)   # per-module chatter
  # jax loads with the network, after the arguments parsed (--help stays instant).
  from radnet_jax.inference import segment  # pylint: disable=import-outside-toplevel
  try:
    res = segment.predict_path(a.workdir, a.input, a.out, prefer=a.prefer,
                               nifti_out=a.nifti_out or None, series_number=a.series)
  except (ValueError, FileNotFoundError, DicomError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for k, v in res.items():
    print(f"{k}: {v}")
  if res.get("seg_error"):
    print(f"warning: the DICOM SEG was not written ({res['seg_error']}); "
          f"the mask is saved as NIfTI: {res['nifti']}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
