"""CT and MR series with awkward geometry or anonymised headers, with truth.

``make_geometry_layouts(out_dir)`` writes one folder per style, one slice per
file, and ``out_dir/truth.csv`` with one row per expected 3D volume:

===================  =====================================================
style                what the series does (as real archives do it)
===================  =====================================================
ct_spacing_two       GE head CT at two spacings: 2.5 mm through the
                     posterior fossa, 5 mm above (dcm2niix writes ``_Eq_``)
ct_spacing_three     three spacings, 1.25 / 2.5 / 7 mm (GE's 1.1-7 mm kind)
ct_spacing_uneven    5 mm steps with one 7 mm and one 1.1 mm step (odd
                     steps, no second spacing run; dcm2niix still ``_Eq_``)
ct_missing_slice     regular 2 mm stack with one file missing (a gap, not a
                     change of spacing)
ct_tilt_pos          Philips head CT, gantry tilt +16 degrees
ct_tilt_neg          Philips head CT, gantry tilt -18 degrees
ct_tilt_spacing      tilt +12 degrees and two spacings at once
ct_anonymised        empty SOPClassUID (the file meta keeps it), empty
                     PatientID and PatientName, no InstanceNumber, no
                     SliceThickness, no birth date / accession / study ID
ct_anon_text_uids    as ct_anonymised, and Study / Series / SOP UIDs
                     replaced by non-UID strings ("ANON-SERIES-...")
mr_anonymised        SOPClassUID and PatientID absent, no InstanceNumber
===================  =====================================================

Geometry follows the scanner: the table moves along the patient z axis by a
step per slice, and a tilted gantry tilts the image plane about x (rows run
along (0, cos t, -sin t)), so slice corners drift in-plane off the normal.
The pixels are an analytic function of the LPS position (``field``: a smooth
head, or a linear ramp for exact interpolation checks), so any converter's
output can be checked voxel by voxel at its own grid (``field_value``).

Instance numbers increase from the inferior-most slice (as most CT scanners
number a caudo-cranial series). Everything derives from ``seed``.
"""
from __future__ import annotations

import csv
import math
import os
import warnings
from typing import Any, Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from radnet_jax.phantom.acquisition import SOP, uid

STYLES = ("ct_spacing_two", "ct_spacing_three", "ct_spacing_uneven",
          "ct_missing_slice",
          "ct_tilt_pos", "ct_tilt_neg", "ct_tilt_spacing", "ct_anonymised",
          "ct_anon_text_uids", "mr_anonymised")
TRUTH_COLUMNS = ("folder", "style", "modality", "n_files", "spacing_kind",
                 "spacings", "min_spacing", "span_mm", "tilt_deg", "rows",
                 "columns", "pixel_spacing", "anonymised", "field")
_VENDOR = {"GE": "GE MEDICAL SYSTEMS", "Philips": "Philips"}


def field_value(world: np.ndarray, field: str = "head") -> np.ndarray:
  """Image value (HU for CT) at LPS positions ``world`` (..., 3) in mm.

  ``head``: air, a soft-tissue ellipsoid head with a 6 mm bone shell and a
  darker central blob, edges smoothed over ~2 mm, plus a gentle ramp so
  that flips and shifts show; ``linear``: 0.5 x - 0.25 y + 2 z + 100 (linear
  interpolation reproduces it exactly).
  """
  world = np.asarray(world, float)
  x, y, z = world[..., 0], world[..., 1], world[..., 2]
  if field == "linear":
    return 0.5 * x - 0.25 * y + 2.0 * z + 100.0
  if field != "head":
    raise ValueError(f"unknown field {field!r}")
  q = np.sqrt((x / 70.0) ** 2 + (y / 85.0) ** 2 + ((z - 40.0) / 75.0) ** 2)
  edge = lambda t: 0.5 * (1 + np.tanh(t))  # noqa: E731 - smooth step
  head = edge((1.0 - q) * 35.0)
  brain = edge((0.92 - q) * 35.0)
  blob = edge(1.0 - np.sqrt(x ** 2 + (y / 1.5) ** 2 + (z - 45) ** 2) / 12.0)
  hu = -1000.0 + 1040.0 * head + 860.0 * (head - brain) - 5.0 * brain
  return hu - 25.0 * blob * brain + 0.2 * z


def _iop(tilt_deg: float) -> np.ndarray:
  t = math.radians(tilt_deg)
  return np.array([1.0, 0.0, 0.0, 0.0, math.cos(t), -math.sin(t)])


def _steps(style: str) -> tuple[list[float], float]:
  """Table steps between consecutive slices (mm, inferior to superior) and
  the gantry tilt (degrees) of a style."""
  if style == "ct_spacing_two":
    return [2.5] * 11 + [5.0] * 8, 0.0
  if style == "ct_spacing_three":
    return [1.25] * 8 + [2.5] * 6 + [7.0] * 5, 0.0
  if style == "ct_spacing_uneven":
    return [5.0] * 6 + [7.0] + [5.0] * 4 + [1.1] + [5.0] * 5, 0.0
  if style == "ct_missing_slice":
    steps = [2.0] * 15
    steps[6:8] = [4.0]  # the file of slice 7 is lost
    return steps, 0.0
  if style == "ct_tilt_pos":
    return [2.0] * 15, 16.0
  if style == "ct_tilt_neg":
    return [2.0] * 15, -18.0
  if style == "ct_tilt_spacing":
    return [2.0] * 8 + [4.0] * 6, 12.0
  return [3.0] * 11, 0.0


def _slice(ds_base: Dataset, stored: np.ndarray, position, instance: int | None,
           sop_uid: str) -> Dataset:
  ds = Dataset()
  ds.update(ds_base)
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = ds_base.file_meta.MediaStorageSOPClassUID
  meta.MediaStorageSOPInstanceUID = sop_uid
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds.file_meta = meta
  if "SOPInstanceUID" in ds_base:
    ds.SOPInstanceUID = sop_uid
  if instance is not None:
    ds.InstanceNumber = instance
  ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
  ds.SliceLocation = f"{float(position[2]):.4f}"
  ds.PixelData = stored.astype(np.int16).tobytes()
  return ds


def write_ct_series(folder: str, style: str, *, seed: int = 0, rows: int = 48,
                    cols: int = 48, pixel_spacing: float = 4.0,
                    field: str = "head") -> dict[str, Any]:
  """Writes one style's series into ``folder``; returns its truth row."""
  with warnings.catch_warnings():  # pydicom warns about the text UIDs (on purpose)
    warnings.simplefilter("ignore")
    return _write_ct_series(folder, style, seed, rows, cols, pixel_spacing, field)


def _write_ct_series(folder: str, style: str, seed: int, rows: int, cols: int,
                     pixel_spacing: float, field: str) -> dict[str, Any]:
  steps, tilt = _steps(style)
  modality = "MR" if style.startswith("mr_") else "CT"
  anonymised = "anon" in style
  text_uids = style == "ct_anon_text_uids"
  iop = _iop(tilt)
  r, c = iop[:3], iop[3:]
  # Centred on the head, the plane's corner at the top-left of the FOV.
  z = np.concatenate([[0.0], np.cumsum(steps)]) - 10.0
  half = np.array([(cols - 1) * pixel_spacing, (rows - 1) * pixel_spacing]) / 2
  positions = [np.array([0.0, 0.0, zk]) - half[0] * r - half[1] * c
               for zk in z]
  ids = {k: uid(seed, style, k) for k in ("study", "series")}
  if text_uids:
    ids = {"study": f"ANON-STUDY-{seed}-{style}",
           "series": f"ANON-SERIES-{seed}-{style}"}
  ds = Dataset()
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = SOP[modality]
  ds.file_meta = meta
  if style.startswith("ct_anon"):
    ds.SOPClassUID = ""            # blanked, the file meta still has it
  elif style != "mr_anonymised":
    ds.SOPClassUID = SOP[modality]
  ds.SOPInstanceUID = ""           # replaced per slice
  ds.Modality = modality
  ds.PatientName = "" if anonymised else "Phantom^Geometry"
  if style.startswith("ct_anon"):
    ds.PatientID = ""
  elif style != "mr_anonymised":
    ds.PatientID = f"PHANTOM-{seed}"
  if not anonymised:
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20200101", "120000", "1"
    ds.AccessionNumber = ""
  ds.StudyInstanceUID = ids["study"]
  ds.SeriesInstanceUID = ids["series"]
  ds.FrameOfReferenceUID = (f"ANON-FOR-{seed}-{style}" if text_uids else
                            uid(seed, style, "for"))
  ds.SeriesNumber = 2 + STYLES.index(style) if style in STYLES else 2
  vendor = "Philips" if "tilt" in style else "GE"
  ds.Manufacturer = _VENDOR[vendor]
  ds.BodyPartExamined = "HEAD"
  ds.StudyDescription = "CT HEAD" if modality == "CT" else "MR HEAD"
  ds.SeriesDescription = style.replace("_", " ")
  ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
  if modality == "CT":
    ds.KVP = "120"
    ds.ConvolutionKernel = "H30s"
    ds.GantryDetectorTilt = f"{tilt:g}"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
  else:
    ds.ScanningSequence = ["SE"]
    ds.SequenceVariant = ["SK"]
    ds.EchoTime = "90"
    ds.RepetitionTime = "4000"
    ds.MagneticFieldStrength = "1.5"
  if not anonymised:
    ds.SliceThickness = f"{min(steps) * math.cos(math.radians(tilt)):.3f}"
  ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
  ds.PixelSpacing = [f"{pixel_spacing:g}", f"{pixel_spacing:g}"]
  ds.Rows, ds.Columns = rows, cols
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.BitsAllocated = ds.BitsStored = 16
  ds.HighBit = 15
  ds.PixelRepresentation = 1  # signed, as most CT (dcm2niix resamples only int16)
  os.makedirs(folder, exist_ok=True)
  h, w = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
  offset = -1024.0 if modality == "CT" else 0.0
  for k, pos in enumerate(positions):
    world = pos + h[..., None] * pixel_spacing * c + w[..., None] * pixel_spacing * r
    value = field_value(world, field)
    if modality == "MR":
      value = np.clip(value + 1000.0, 0, None)
    stored = np.clip(np.round(value - offset), -32768, 32767)
    sop_uid = (f"ANON-IMAGE-{seed}-{style}-{k}" if text_uids else
               uid(seed, style, "image", k))
    out = _slice(ds, stored, pos, None if anonymised else k + 1, sop_uid)
    out.save_as(os.path.join(folder, f"IM{k:04d}"), enforce_file_format=True)
  diffs = np.array(steps) * math.cos(math.radians(tilt))
  distinct = sorted({round(float(v), 3) for v in diffs})
  kind = ("gaps" if style == "ct_missing_slice" else
          "variable" if len(distinct) > 1 else "uniform")
  return {
      "folder": os.path.basename(folder), "style": style, "modality": modality,
      "n_files": len(positions), "spacing_kind": kind,
      "spacings": ";".join(f"{v:g}" for v in (
          distinct if kind != "gaps" else [min(distinct)])),
      "min_spacing": f"{min(diffs):.4f}", "span_mm": f"{float(np.sum(diffs)):.4f}",
      "tilt_deg": f"{tilt:g}", "rows": rows, "columns": cols,
      "pixel_spacing": f"{pixel_spacing:g}", "anonymised": int(anonymised),
      "field": field,
  }


def make_geometry_layouts(out_dir: str, *, seed: int = 0,
                          styles: Sequence[str] = STYLES, rows: int = 48,
                          cols: int = 48, field: str = "head"
                          ) -> list[dict[str, Any]]:
  """Writes every style under ``out_dir/<style>/`` and ``out_dir/truth.csv``.

  Returns the truth rows (one per expected 3D volume; every style is one).
  """
  os.makedirs(out_dir, exist_ok=True)
  rows_out = [write_ct_series(os.path.join(out_dir, style), style, seed=seed,
                              rows=rows, cols=cols, field=field)
              for style in styles]
  with open(os.path.join(out_dir, "truth.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=TRUTH_COLUMNS)
    writer.writeheader()
    writer.writerows(rows_out)
  return rows_out
