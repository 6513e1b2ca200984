"""Liver segmentation of a new CT with a trained run: NIfTI in -> NIfTI mask,
DICOM series in -> DICOM SEG (optionally also a NIfTI mask).

  python -m radnet_jax.cli.predict_seg --workdir RUN --input PATH --out PATH \
      [--prefer best|latest] [--nifti_out MASK.nii.gz] [--series N]

PATH is a ``.nii``/``.nii.gz`` CT (HU) -> ``--out`` is the uint8 mask NIfTI
on the input's grid; or a folder (or one file) holding a CT DICOM series ->
``--out`` is a DICOM SEG (``.dcm``) that references the series' images, with
one segment per class the run predicts (Liver; Tumour for 3-class runs), so
OHIF / 3D Slicer overlay it on the CT. ``--series N`` picks the CT series
with SeriesNumber N when the folder holds several. RUN is a workdir written
by ``python run.py --config=experiments/transfer_liver.py``.

DICOM input: the NIfTI mask is written before the SEG; if the SEG cannot be
written (anonymised headers whose UIDs are not UIDs, ...) the command says
why, keeps the mask (``--nifti_out``, else ``--out`` with ``.nii.gz`` for
``.dcm``) and exits with status 2 (1: nothing written).
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys

import numpy as np

log = logging.getLogger(__name__)


def _is_nifti(path: str) -> bool:
  return path.endswith((".nii", ".nii.gz"))


def select_ct_stack(input_path: str, series_number: int | None = None):
  """The one CT stack under ``input_path`` (folder or file).

  Raises ValueError naming the folder when there is none, or several and
  ``series_number`` (SeriesNumber) does not pick exactly one.
  """
  from radnet_jax import dicom  # pylint: disable=import-outside-toplevel
  # The salt only ties stacks to series inside this call; nothing is stored.
  res = dicom.scan(input_path, salt=secrets.token_hex(8))
  cts = [s for s in res.stacks if str(s.record.get("Modality", "")).upper() == "CT"]
  if series_number is not None:
    cts = [s for s in cts if _int(s.record.get("SeriesNumber")) == series_number]
  if len(cts) == 1:
    return cts[0]
  if not cts:
    reasons = sorted({k.reason for k in res.skipped})[:3]
    raise ValueError(f"{input_path}: no CT series"
                     + (f" with SeriesNumber {series_number}" if series_number is not None
                        else "")
                     + (f" (skipped files: {'; '.join(reasons)})" if reasons else ""))
  root = input_path if os.path.isdir(input_path) else os.path.dirname(input_path)
  listing = "; ".join(f"{os.path.relpath(os.path.dirname(s.files[0]), root)}: SeriesNumber "
                      f"{s.record.get('SeriesNumber', '?')}, "
                      f"{s.record.get('NumberOfSlices', len(s.files))} slices" for s in cts)
  raise ValueError(f"{input_path}: {len(cts)} CT stacks ({listing}); pass --series N "
                   f"or a folder with one series")


def _int(v) -> int | None:
  try:
    return int(v)
  except (TypeError, ValueError):
    return None


def predict_dicom(workdir: str, input_path: str, out_path: str, *, prefer: str = "best",
                  nifti_out: str | None = None, series_number: int | None = None,
                  predictor=None) -> dict:
  """Segments a CT DICOM series and writes a DICOM SEG on its images.

  Args:
    workdir: trained segmentation run (``config.json`` + checkpoints).
    input_path: folder (or file) with the CT series.
    out_path: SEG file to write.
    prefer: "best" or "latest" checkpoint.
    nifti_out: also write the mask as NIfTI (on the ``load_volume`` grid).
    series_number: SeriesNumber of the series when the folder holds several.
    predictor: ``(predict_fn, config)`` already loaded (reuse across calls).

  Returns {"seg": out_path, "nifti": path or None, "voxels": {label: count}}
  with voxel counts on the CT grid. The NIfTI mask is written first; when
  the SEG cannot be written (e.g. an anonymiser replaced the images' UIDs by
  strings that are not UIDs) "seg" is None, "seg_error" says why, and the
  mask is saved all the same (at ``nifti_out``, else ``fallback_mask_path``).
  """
  from radnet_jax.shards import seg as segdata
  from radnet_jax.dicom import nifti
  from radnet_jax.dicom import seg as segdicom
  from radnet_jax.tasks import segment  # pylint: disable=import-outside-toplevel
  stack = select_ct_stack(input_path, series_number)
  predict_fn, config = predictor or segment.load_seg_predictor(workdir, prefer)
  hu, affine, geometry, vol = segdicom.load_ct_canonical(stack)
  pred, geometry = segment.predict_canonical(predict_fn, config, hu, affine, geometry)
  labels = nifti.to_original_grid(pred, geometry)
  values = (segdicom.LIVER,) if int(config.num_classes) == 2 else (
      segdicom.LIVER, segdicom.TUMOUR)
  counts = np.bincount(labels.ravel(), minlength=3)
  out = {"seg": out_path, "nifti": nifti_out or None,
         "voxels": {"liver": int(counts[1]), "tumour": int(counts[2])}}
  # The mask first: an output that can be written never waits on one that
  # may fail (the SEG needs UIDs and headers that anonymisers break).
  if nifti_out:
    nifti.save_nifti(pred, geometry, nifti_out)
  try:
    segdicom.write_seg(labels, vol.affine, stack.files, out_path, label_values=values)
  except Exception as e:  # noqa: BLE001 - highdicom rejects headers in many ways
    reason = f"{type(e).__name__}: {e}"
    log.warning("SEG not written (%s)", reason)
    if os.path.exists(out_path):
      os.remove(out_path)   # never leave a partial SEG behind
    if not nifti_out:
      out["nifti"] = fallback_mask_path(out_path)
      nifti.save_nifti(pred, geometry, out["nifti"])
    out["seg"] = None
    out["seg_error"] = reason
  return out


def fallback_mask_path(seg_path: str) -> str:
  """Where the mask goes when the SEG cannot be written and no --nifti_out
  was given: beside the SEG, ``X.dcm`` -> ``X.nii.gz``."""
  root = seg_path[:-4] if seg_path.lower().endswith(".dcm") else seg_path
  return root + ".nii.gz"


def predict_path(workdir: str, input_path: str, out_path: str, *, prefer: str = "best",
                 nifti_out: str | None = None, series_number: int | None = None) -> dict:
  """NIfTI in -> NIfTI mask; anything else -> DICOM series -> SEG."""
  from radnet_jax.tasks import segment  # pylint: disable=import-outside-toplevel
  if not os.path.exists(input_path):
    raise FileNotFoundError(f"{input_path}: no such file or directory")
  if _is_nifti(input_path):
    return {"nifti": segment.predict_nifti(workdir, input_path, out_path, prefer)}
  return predict_dicom(workdir, input_path, out_path, prefer=prefer, nifti_out=nifti_out,
                       series_number=series_number)


def build_parser() -> argparse.ArgumentParser:
  """The command-line parser (``tests/test_docs.py`` checks docs against it)."""
  p = argparse.ArgumentParser(prog="python -m radnet_jax.cli.predict_seg",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("--workdir", required=True, help="trained segmentation run")
  p.add_argument("--input", required=True, help="CT NIfTI file or DICOM series folder")
  p.add_argument("--out", required=True, help="mask NIfTI (NIfTI input) or SEG .dcm "
                                              "(DICOM input)")
  p.add_argument("--prefer", default="best", choices=("best", "latest"),
                 help="checkpoint (best falls back to latest when the run has none)")
  p.add_argument("--nifti_out", default="", help="DICOM input: also write a NIfTI mask")
  p.add_argument("--series", type=int, default=None, help="SeriesNumber to segment")
  return p


def main(argv: list[str] | None = None) -> int:
  a = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  logging.getLogger("highdicom").setLevel(logging.WARNING)   # per-module chatter
  from radnet_jax.dicom.errors import DicomError  # pylint: disable=import-outside-toplevel
  try:
    res = predict_path(a.workdir, a.input, a.out, prefer=a.prefer,
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
