"""Multi-volume MR series stored the way real archives store them.

``make_layouts(out_dir)`` writes DWI/DTI (b0 + b-values x gradient
directions), fMRI, perfusion and DCE series, one slice per file, in the tag
conventions of five vendors, plus UIH's VFRAME layout (one file per volume,
slices tiled, positions only in a private sequence), and
``out_dir/truth.csv`` with one row per expected 3D volume:

==================  ====================================================
style               what tells the volumes apart (as the vendor writes it)
==================  ====================================================
ge_dti              b-value in (0043,1039) (+1e9 flag), direction in
                    (0019,10BB/BC/BD); no temporal tags
ge_fmri             nothing but InstanceNumber (volume after volume)
ge_dce              TemporalPositionIdentifier, TriggerTime, AcquisitionTime;
                    ContrastBolusStartTime between phases 1 and 2
philips_dwi         b-value (2001,1003), direction (2005,10B0/B1/B2);
                    InstanceNumber slice after slice
philips_fmri        TemporalPositionIdentifier; InstanceNumber slice-major
siemens_dwi         (0019,100C) B_value, (0019,100E) direction, SequenceName
                    ``*ep_b1000#2`` (non-mosaic)
siemens_perf        AcquisitionNumber per time point (DSC perfusion)
canon_dwi           DiffusionBValue / DiffusionGradientOrientation only on
                    b > 0 files, ``b=..(x,y,z)`` in ImageComments
uih_dwi             (0065,1009) b-value, (0065,1037) direction, by slice
uih_dti_vframe      ImageType VFRAME: one file per volume, tiles
                    ceil(sqrt(n)) wide, no top-level ImagePositionPatient;
                    slice positions in (0065,1051)
==================  ====================================================

Pixels: a small ellipsoid phantom whose signal follows each volume's
physics (diffusion attenuation exp(-b D) with one anisotropic region, a BOLD
block, a perfusion bolus dip, a DCE enhancement curve), so the volumes of a
series differ and a wrong split shows up as mixed pixels. Everything derives
from ``seed``; no PHI-like values beyond synthetic names.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from radnet_jax.phantom.acquisition import SOP, uid

STYLES = ("ge_dti", "ge_fmri", "ge_dce", "philips_dwi", "philips_fmri",
          "siemens_dwi", "siemens_perf", "canon_dwi", "uih_dwi",
          "uih_dti_vframe")
TRUTH_COLUMNS = ("series_uid", "style", "vendor", "kind", "volume_index",
                 "b_value", "direction", "time_index", "time_s", "n_slices", "rows",
                 "columns", "sequence", "contrast")
_VENDOR = {"ge": "GE MEDICAL SYSTEMS", "philips": "Philips Medical Systems",
           "siemens": "SIEMENS", "canon": "CANON_MEC", "uih": "UIH"}
_FIBRE = (0.0, 0.6, 0.8)
_DIRS = ((1.0, 0.0, 0.0), (0.0, 0.70710678, 0.70710678),
         (0.0, 0.70710678, -0.70710678))


@dataclasses.dataclass(frozen=True)
class _Volume:
  b: float | None = None             # s/mm^2 (None: not a diffusion volume)
  direction: tuple | None = None
  time_index: int | None = None      # 0-based time point
  time_s: float = 0.0                # acquisition start after the series start


def _directions(n: int) -> list[tuple]:
  """``_DIRS`` first, then more unit vectors on a golden-angle spiral."""
  out = list(_DIRS[:n])
  golden = math.pi * (3.0 - math.sqrt(5.0))
  for i in range(n - len(out)):
    z = 1.0 - 2.0 * (i + 0.5) / (n - len(_DIRS))
    r = math.sqrt(max(0.0, 1.0 - z * z))
    out.append((round(r * math.cos(golden * i), 6),
                round(r * math.sin(golden * i), 6), round(z, 6)))
  return out


def _volumes(style: str, n_volumes: int | None = None
             ) -> tuple[str, list[_Volume]]:
  """(kind, volumes) of a style; ``n_volumes`` overrides the small default
  count (b0 + directions at b=1000 for diffusion, time points otherwise)."""
  kind = style.split("_", 1)[1].replace("_vframe", "")
  if kind in ("dti", "dwi"):
    if n_volumes is None:
      pairs = [(0.0, (0.0, 0.0, 0.0))] + [(1000.0, d) for d in _DIRS]
      if style == "ge_dti":
        pairs += [(2000.0, d) for d in _DIRS[:2]]
    else:
      pairs = [(0.0, (0.0, 0.0, 0.0))] + [
          (1000.0, d) for d in _directions(n_volumes - 1)]
    return "dwi", [_Volume(b, d, time_s=4.0 * i) for i, (b, d) in enumerate(pairs)]
  n = n_volumes or {"fmri": 5, "perf": 6, "dce": 4}[kind]
  tr = {"fmri": 2.0, "perf": 1.5, "dce": 20.0}[kind]
  return kind, [_Volume(time_index=t, time_s=t * tr) for t in range(n)]


def _phantom(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
  """(tissue mask, anisotropic-fibre mask) of an ellipsoid, (D, H, W)."""
  d, h, w = (np.linspace(-1, 1, n) for n in shape)
  zz, yy, xx = np.meshgrid(d * 0.8, h, w, indexing="ij")
  body = (xx ** 2 / 0.8 + yy ** 2 / 0.6 + zz ** 2) < 0.9
  fibre = body & (np.abs(yy) < 0.25)
  return body, fibre


def _signal(kind: str, vol: _Volume, n_vol: int, body, fibre) -> np.ndarray:
  s0 = np.where(body, 800.0, 20.0)
  if kind == "dwi":
    b = vol.b or 0.0
    diff = np.full(body.shape, 0.0008)      # mm^2/s, isotropic tissue
    if b and vol.direction is not None:
      # fibres along _FIBRE: fast diffusion along them, slow across
      cos2 = float(np.dot(vol.direction, _FIBRE)) ** 2
      diff = np.where(fibre, 0.0003 + 0.0014 * cos2, diff)
    return s0 * np.exp(-b * diff)
  t = vol.time_index or 0
  if kind == "fmri":
    # scanner drift (+1% per volume) plus a BOLD block in the "cortex"
    return s0 * (1.0 + 0.01 * t + 0.03 * ((t // 2) % 2) * fibre)
  if kind == "perf":
    dip = math.exp(-((t - n_vol / 2) ** 2) / 2.0)
    return s0 * (1.0 + 0.01 * t - 0.4 * dip * body)
  # dce: phase 0 before the injection, then enhancement
  return s0 * (1.0 + (0.0 if t == 0 else 0.8 * (1 - math.exp(-t))) * fibre)


def _tm(seconds: float) -> str:
  h, rem = divmod(seconds, 3600.0)
  m, s = divmod(rem, 60.0)
  return "%02d%02d%09.6f" % (int(h), int(m), s)


def _base(style: str, ids: dict, kind: str) -> Dataset:
  vendor = style.split("_")[0]
  ds = Dataset()
  ds.SOPClassUID = SOP["MR"]
  ds.Modality = "MR"
  ds.Manufacturer = _VENDOR[vendor]
  ds.PatientName = "PHANTOM^LAYOUT"
  ds.PatientID = ids["patient_id"]
  ds.StudyInstanceUID = ids["study_uid"]
  ds.SeriesInstanceUID = ids["series_uid"]
  ds.FrameOfReferenceUID = ids["for_uid"]
  ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = "20200101"
  ds.SeriesNumber = ids["series_no"]
  ds.StudyID = "1"
  ds.BodyPartExamined = "BRAIN"
  ds.MagneticFieldStrength = 3.0
  desc = {"dwi": "DWI b0 b1000", "fmri": "BOLD resting fMRI",
          "perf": "ep2d_perf DSC", "dce": "DCE dynamic T1 multiphase"}[kind]
  ds.SeriesDescription = ds.ProtocolName = f"{desc} {style}"
  if kind == "dce":
    ds.ScanningSequence, ds.SequenceVariant = "GR", ["SP", "SS"]
    ds.EchoTime, ds.RepetitionTime, ds.FlipAngle = 1.8, 4.5, 12.0
    ds.MRAcquisitionType = "3D"
    ds.ContrastBolusAgent = "GADAVIST"
    ds.ContrastBolusRoute = "IV"
  else:
    ds.ScanningSequence = ["EP", "SE"] if kind == "dwi" else ["EP", "GR"]
    ds.SequenceVariant = "NONE"
    ds.EchoTime = 80.0 if kind == "dwi" else 30.0
    ds.RepetitionTime = 4000.0 if kind == "dwi" else 2000.0
    ds.FlipAngle = 90.0
    ds.MRAcquisitionType = "2D"
  ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
  ds.EchoNumbers = 1
  ds.SliceThickness = 4.0
  ds.SpacingBetweenSlices = 4.0
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
  ds.PixelRepresentation = 0
  return ds


def _diffusion_tags(ds: Dataset, vendor: str, vol: _Volume, n_dir: int,
                    v_idx: int) -> None:
  """The vendor's own diffusion tags of one file."""
  b, d = vol.b, vol.direction
  if vendor == "ge":
    ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(
        0x39, "IS", [int(1e9 + b), 8, 0, 0])
    blk = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
    for off, v in zip((0xBB, 0xBC, 0xBD), d):
      blk.add_new(off, "DS", f"{v:.6f}")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
  elif vendor == "philips":
    blk = ds.private_block(0x2001, "Philips Imaging DD 001", create=True)
    blk.add_new(0x03, "FL", float(b))
    blk.add_new(0x0B, "CS", "TRANSVERSAL")   # (2001,100B) slice orientation
    blk = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
    for off, v in zip((0xB0, 0xB1, 0xB2), d):
      blk.add_new(off, "FL", float(v))
    # (2005,1413) gradient orientation number: block 0x14 (creator DD 005).
    ds.add_new((0x2005, 0x0014), "LO", "Philips MR Imaging DD 005")
    ds.private_block(0x2005, "Philips MR Imaging DD 005").add_new(
        0x13, "IS", v_idx + 1)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"]
    ds.DiffusionBValue = float(b)
  elif vendor == "siemens":
    blk = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    blk.add_new(0x0C, "IS", int(b))
    blk.add_new(0x0D, "CS", "DIRECTIONAL" if b else "NONE")
    if b:
      blk.add_new(0x0E, "FD", [float(v) for v in d])
    ds.SequenceName = f"*ep_b{int(b)}" + (f"#{n_dir}" if b else "")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]
  elif vendor == "canon":
    if b:   # Canon writes the public tags only where a gradient is applied
      ds.DiffusionBValue = float(b)
      ds.DiffusionGradientOrientation = [float(v) for v in d]
      ds.ImageComments = "b=%d(%.3f,%.3f,%.3f)" % (b, *d)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "MR", "DIFFUSION"]
  elif vendor == "uih":
    blk = ds.private_block(0x0065, "Image Private Header", create=True)
    blk.add_new(0x09, "FD", float(b))
    blk.add_new(0x37, "FD", [float(v) for v in d])


def _meta(ds: Dataset, implicit: bool) -> None:
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = ds.SOPClassUID
  meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
  meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
  ds.file_meta = meta


def _write(ds: Dataset, path: str) -> None:
  ds.save_as(path, enforce_file_format=True)


def _geometry(n_slices: int, rows: int, cols: int):
  """Axial stack: IOP, pixel spacing and slice positions (LPS mm)."""
  iop = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
  spacing = (1.5, 1.75)          # row spacing, column spacing (mm)
  origin = np.array([-cols * spacing[1] / 2, -rows * spacing[0] / 2, -10.0])
  positions = [origin + np.array([0.0, 0.0, 4.0 * k]) for k in range(n_slices)]
  return iop, spacing, positions


def _write_series(folder: str, style: str, ids: dict, n_slices: int,
                  rows: int, cols: int, n_volumes: int | None) -> list[dict]:
  vendor = style.split("_")[0]
  kind, vols = _volumes(style, n_volumes)
  iop, spacing, positions = _geometry(n_slices, rows, cols)
  body, fibre = _phantom((n_slices, rows, cols))
  start = 8 * 3600.0 + 15 * 60.0
  # The injection starts 15 s before the second phase: phase 1 is the
  # pre-contrast mask, the others follow the bolus arrival.
  bolus = start + vols[1].time_s - 15.0 if kind == "dce" else None
  truth = []
  n_dir = {}
  os.makedirs(folder, exist_ok=True)
  vframe = style == "uih_dti_vframe"
  for v_idx, vol in enumerate(vols):
    img = np.round(_signal(kind, vol, len(vols), body, fibre)).astype(np.uint16)
    if vol.b:
      n_dir[vol.b] = n_dir.get(vol.b, 0) + 1
    if vframe:
      _write_vframe(folder, style, ids, vol, v_idx, img, iop, spacing,
                    positions, start)
    for k in range(0 if not vframe else n_slices, n_slices):
      ds = _base(style, ids, kind)
      # Instance numbering: volume after volume, except Philips (slice-major).
      inst = (k * len(vols) + v_idx if vendor == "philips"
              else v_idx * n_slices + k) + 1
      ds.SOPInstanceUID = uid(ids["series_uid"], v_idx, k)
      ds.InstanceNumber = inst
      ds.ImageOrientationPatient = [f"{x:.6f}" for x in iop]
      ds.ImagePositionPatient = [f"{x:.6f}" for x in positions[k]]
      ds.PixelSpacing = [f"{x:.4f}" for x in spacing]
      ds.SliceLocation = f"{positions[k][2]:.4f}"
      ds.Rows, ds.Columns = rows, cols
      # Each slice of a 2D acquisition has its own acquisition time.
      t = start + vol.time_s + k * 0.05
      ds.AcquisitionTime = ds.ContentTime = _tm(t)
      if kind == "dwi":
        _diffusion_tags(ds, vendor, vol, n_dir.get(vol.b, 0), v_idx)
      elif kind in ("fmri", "dce") and style != "ge_fmri":
        ds.TemporalPositionIdentifier = vol.time_index + 1
        ds.NumberOfTemporalPositions = len(vols)
      if kind == "dce":
        ds.TriggerTime = f"{vol.time_s * 1000:.1f}"
        ds.ContrastBolusStartTime = _tm(bolus)
      if kind == "perf":
        ds.AcquisitionNumber = vol.time_index + 1
      elif vendor != "ge":
        ds.AcquisitionNumber = 1
      ds.PixelData = img[k].tobytes()
      _meta(ds, implicit=vendor in ("ge", "philips"))
      _write(ds, os.path.join(folder, f"IM{inst:05d}"))
    truth.append({
        "series_uid": ids["series_uid"], "style": style,
        "vendor": _VENDOR[vendor], "kind": kind, "volume_index": v_idx,
        "b_value": "" if vol.b is None else vol.b,
        "direction": "" if vol.direction is None else
        " ".join(f"{x:.4f}" for x in vol.direction),
        "time_index": "" if vol.time_index is None else vol.time_index,
        "time_s": vol.time_s,
        "n_slices": n_slices, "rows": rows, "columns": cols,
        "sequence": _expected_sequence(kind, vol),
        "contrast": ("no" if vol.time_index == 0 else "yes") if kind == "dce" else "",
    })
  return truth


def _expected_sequence(kind: str, vol: _Volume) -> str:
  """Extended-taxonomy sequence class of one volume (``other`` = decided,
  outside the taxonomy: fMRI and perfusion)."""
  return {"dwi": "DWI", "dce": "T1", "fmri": "other", "perf": "other"}[kind]


def _write_vframe(folder, style, ids, vol, v_idx, img, iop, spacing,
                  positions, start) -> None:
  """UIH VFRAME: the volume's slices tiled in one image, ceil(sqrt(n))
  tiles wide and ceil(n / cols) high; per-slice positions only in the MR
  VFrame Sequence (0065,1051); no top-level ImagePositionPatient."""
  n, rows, cols = img.shape
  gc = int(math.ceil(math.sqrt(n)))
  gr = int(math.ceil(n / gc))
  tiled = np.zeros((gr * rows, gc * cols), np.uint16)
  for k in range(n):
    r0, c0 = (k // gc) * rows, (k % gc) * cols
    tiled[r0:r0 + rows, c0:c0 + cols] = img[k]
  ds = _base(style, ids, "dwi")
  ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "VFRAME", "MAGNITUDE"]
  ds.SOPInstanceUID = uid(ids["series_uid"], v_idx, "vframe")
  ds.InstanceNumber = v_idx + 1
  ds.ImageOrientationPatient = [f"{x:.6f}" for x in iop]
  ds.PixelSpacing = [f"{x:.4f}" for x in spacing]
  ds.Rows, ds.Columns = tiled.shape
  ds.AcquisitionTime = _tm(start + vol.time_s)
  blk = ds.private_block(0x0065, "Image Private Header", create=True)
  blk.add_new(0x09, "FD", float(vol.b))
  blk.add_new(0x37, "FD", [float(v) for v in vol.direction])
  blk.add_new(0x50, "DS", str(n))
  items = []
  for k in range(n):
    item = Dataset()
    item.ImagePositionPatient = [f"{x:.6f}" for x in positions[k]]
    item.SliceLocation = f"{positions[k][2]:.4f}"
    item.AcquisitionTime = _tm(start + vol.time_s + k * 0.05)
    items.append(item)
  blk.add_new(0x51, "SQ", Sequence(items))
  ds.PixelData = tiled.tobytes()
  _meta(ds, implicit=False)
  _write(ds, os.path.join(folder, f"VF{v_idx + 1:05d}"))


def make_layouts(out_dir: str, *, seed: int = 0, styles: tuple = STYLES,
                 n_slices: int = 4, rows: int = 12, cols: int = 10,
                 n_volumes: int | None = None) -> list[dict]:
  """Writes one series per style under ``out_dir/dicom/<style>/`` and
  ``out_dir/truth.csv`` (one row per expected 3D volume, ``TRUTH_COLUMNS``).

  Args:
    out_dir: output folder.
    seed: UIDs derive from it.
    styles: subset of ``STYLES``.
    n_slices, rows, cols: size of every volume (UIH VFRAME tiles them).
    n_volumes: volumes per series (None: 4-6, see ``_volumes``); a diffusion
      series is b0 + (n_volumes - 1) directions at b=1000.
  Returns:
    the truth rows.
  """
  truth = []
  for s_no, style in enumerate(styles):
    if style not in STYLES:
      raise ValueError(f"unknown layout style {style!r}; one of {STYLES}")
    ids = {"patient_id": "LAYOUT%02d" % s_no,
           "study_uid": uid(seed, "layouts", "study"),
           "series_uid": uid(seed, "layouts", style),
           "for_uid": uid(seed, "layouts", "for"), "series_no": 100 + s_no}
    truth += _write_series(os.path.join(out_dir, "dicom", style), style, ids,
                           n_slices, rows, cols, n_volumes)
  with open(os.path.join(out_dir, "truth.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=TRUTH_COLUMNS)
    w.writeheader()
    w.writerows(truth)
  return truth
