"""Scan planning (grid geometry), image simulation and DICOM writing.

A series is a ``Grid`` in LPS mm chosen from the plan's region (scan range
along Z from the patient's own landmarks), plane, obliquity, matrix and slice
spacing; the image is simulated on that grid and written slice by slice as a
CT Image / MR Image / PET Image Storage series with pydicom.
"""
from __future__ import annotations

import hashlib
import os
import struct

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
from pydicom.valuerep import IS, DSfloat

from radnet_jax.phantom import ct, physics
from radnet_jax.phantom.anatomy import Grid, Patient, _rot, render_labels

SOP = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
       "PT": "1.2.840.10008.5.1.4.1.1.128"}
SR_SOP = "1.2.840.10008.5.1.4.1.1.88.11"      # Basic Text SR
GSPS_SOP = "1.2.840.10008.5.1.4.1.1.11.1"     # Grayscale Softcopy Presentation State
_AXES = {"AX": ((1, 0, 0), (0, 1, 0)), "COR": ((1, 0, 0), (0, 0, -1)), "SAG": ((0, 1, 0), (0, 0, -1))}


def uid(*parts) -> str:
  """Deterministic UID (2.25 form) from ``parts`` (seed, patient, series, ...)."""
  h = hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:30]
  return "2.25." + str(int(h, 16))


def scan_range(patient: Patient, region: str, rng: np.random.Generator) -> tuple:
  """(z_low, z_high) mm of the planned scan range for ``region``."""
  b, u = patient.bands, rng.uniform
  if region == "brain":
    return b["brain"][0] - u(0, 8), patient.z_vertex + u(3, 12)
  if region == "headneck":
    return b["neck"][0] - u(5, 20), b["head"][1] + u(0, 15)
  if region == "chest":
    return b["lung"][0] - u(20, 45), b["lung"][1] + u(0, 15)
  if region == "abdomen":
    return b["pelvis"][1] - u(0, 25), b["lung"][0] + u(10, 30)
  if region == "abdpelvis":   # dome of the liver to below the symphysis
    return b["pelvis"][0] - u(10, 30), b["lung"][0] + u(10, 30)
  if region == "pelvis":
    return b["pelvis"][0] - u(10, 30), b["pelvis"][1] + u(-10, 10)
  if region == "cap":
    return b["pelvis"][0] - u(10, 30), b["lung"][1] + u(0, 15)
  if region == "wholebody":
    return b["pelvis"][0] - u(30, 100), patient.z_vertex + u(0, 10)
  raise ValueError(f"unknown region {region!r}")


def plan_grid(patient: Patient, plan, rng: np.random.Generator, max_slices: int = 120) -> Grid:
  """The voxel grid of a series: plane axes (+ tilt), FOV around the target.

  Head series with a protocol FOV (``plan.fov``: brain MR, head CT) are
  centred on the head with that square (or ``phase_ratio`` rectangular)
  FOV, whatever the head's size, as head protocols are; the slab covers the
  brain band (axial), the head width (sagittal) or its depth (coronal), or
  ``plan.slab`` (3D). Other series size the FOV from the body.
  """
  if plan.fov and patient.head is not None:
    return _head_grid(patient, plan, rng, max_slices)
  zlo, zhi = scan_range(patient, plan.region, rng)
  head = plan.region in ("brain", "headneck")
  hw = 80.0 if head else patient.half_width
  hd = 100.0 if head else patient.half_depth
  center = np.array([rng.normal(0, 3), (rng.normal(0, 3) + (8 if not head else 0)), (zlo + zhi) / 2])
  r0, c0 = (np.array(v, float) for v in _AXES[plan.plane])
  rot = _rot(rng, plan.tilt_deg) if plan.tilt_deg > 0 else np.eye(3)
  r, c = rot @ r0, rot @ c0
  n = np.cross(r, c)
  ext = {"x": 2 * hw * 1.08, "y": 2 * hd * 1.15, "z": zhi - zlo}
  axis_ext = lambda v: ext["xyz"[int(np.argmax(np.abs(v)))]]
  if plan.plane == "AX" and plan.modality == "CT" and not head:
    # Body CT: the clinical display FOV, 350-450 mm (500 for the largest patients).
    fov_r = fov_c = ct.abdominal_fov(rng, patient.half_width, patient.half_depth)
  elif plan.plane == "AX":
    fov = max(ext["x"], ext["y"]) * rng.uniform(1.0, 1.1)
    fov_r = fov_c = fov
  else:
    fov_r, fov_c = axis_ext(r), axis_ext(c)
  slab = axis_ext(n)
  if plan.plane == "SAG" and not head and plan.modality == "MR":
    slab = min(slab, rng.uniform(160, 260))   # body sagittals cover the midline slab
  return _grid(plan, center, r, c, n, fov_r, fov_c, slab, max_slices)


def _grid(plan, center, r, c, n, fov_r, fov_c, slab, max_slices) -> Grid:
  ps = max(fov_r, fov_c) / plan.matrix
  cols, rows = int(round(fov_r / ps / 2) * 2), int(round(fov_c / ps / 2) * 2)
  sp = plan.spacing
  k = int(np.floor(slab / sp + 1e-6)) + 1
  if k > max_slices:
    sp = float(np.round(slab / (max_slices - 1), 2))
    plan.spacing = sp
    plan.thickness = min(plan.thickness, sp) if plan.modality == "MR" else sp
    k = int(np.floor(slab / sp)) + 1
  k = max(k, 8)
  origin = center - (k - 1) / 2 * sp * n - (rows - 1) / 2 * ps * c - (cols - 1) / 2 * ps * r
  return Grid(origin=origin, r=r, c=c, n=n, spacing=(sp, ps, ps), shape=(k, rows, cols))


def _head_grid(patient: Patient, plan, rng: np.random.Generator, max_slices: int) -> Grid:
  """Grid of a head protocol: FOV ``plan.fov`` on the head, slab by plane."""
  head, u = patient.head, rng.uniform
  blo, bhi = patient.bands["brain"]
  mid = 0.5 * (head.lo + head.hi)
  # The FOV centre: the middle of the brain, as the technologist places it on the localizer.
  center = np.array([mid[0] + rng.normal(0, 2), mid[1] + rng.normal(-5, 4), 0.5 * (blo + bhi) + rng.normal(-5, 5)])
  r0, c0 = (np.array(v, float) for v in _AXES[plan.plane])
  rot = np.eye(3)
  if plan.tilt_deg > 0:   # mostly an AC-PC-like pitch about the left-right axis, a little random
    rot = _rot_axis(np.array([1.0, 0, 0]), np.deg2rad(plan.tilt_deg) * rng.choice([-1, 1])) @ _rot(rng, 3.0)
  r, c = rot @ r0, rot @ c0
  n = np.cross(r, c)
  fov_r = plan.fov * plan.phase_ratio   # a reduced phase FOV across the narrower head width
  fov_c = plan.fov
  if plan.slab:
    slab = plan.slab
  elif plan.plane == "AX":
    zlo = blo - u(0, 12) if plan.modality == "MR" else blo - u(0, 25)
    zhi = bhi + u(-2, 8)
    slab = (zhi - zlo) / max(abs(n[2]), 0.5)
    center[2] = 0.5 * (zlo + zhi)
  elif plan.plane == "SAG":
    slab = (head.hi[0] - head.lo[0]) * u(0.75, 1.0)
  else:
    slab = (head.hi[1] - head.lo[1]) * u(0.7, 0.95)
  if plan.modality == "MR" and not plan.slab and rng.random() < _partial_slab_prob(plan):
    # A slab through part of the brain: research fMRI / DTI slabs, and the
    # targeted 2D series of a work-up (temporal lobes, posterior fossa,
    # pituitary, vertex). 35-70% of the full extent, anywhere along the
    # slice normal inside it; the coverage is still the brain.
    full = slab
    slab = full * u(0.35, 0.7)
    center = center + n * u(-0.5, 0.5) * (full - slab)
  return _grid(plan, center, r, c, n, fov_r, fov_c, slab, max_slices)


def _partial_slab_prob(plan) -> float:
  """How often a head MR series covers only part of the brain: echo-planar
  series (BOLD, diffusion) often, other 2D series sometimes."""
  return 0.3 if (plan.bold or plan.epi) else 0.1


def _rot_axis(axis: np.ndarray, ang: float) -> np.ndarray:
  k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
  return np.eye(3) + np.sin(ang) * k + (1 - np.cos(ang)) * k @ k


def grid_z_range(grid: Grid) -> tuple:
  """(z_low, z_high) mm spanned by the grid's voxel centres."""
  K, I, J = grid.shape
  corners = np.array([grid.origin + a * (K - 1) * grid.spacing[0] * grid.n + b * (I - 1) * grid.spacing[1] * grid.c
                      + d * (J - 1) * grid.spacing[2] * grid.r for a in (0, 1) for b in (0, 1) for d in (0, 1)])
  return float(corners[:, 2].min()), float(corners[:, 2].max())


def simulate(patient: Patient, plan, grid: Grid, rng: np.random.Generator, randomise: bool = False
             ) -> np.ndarray:
  """Image float32 (K, I, J): HU (CT), scanner units (MR), SUV (PT).

  randomise: domain randomisation of MR intensities on top of the physics
  (``physics.mr_image``).
  """
  lab = render_labels(patient, grid)
  if plan.modality == "CT":
    # Phase, kernel and dose from the plan; HU offsets and enhancement
    # factors of this patient (``Patient.ct``); noise from the dose and the
    # patient's diameter (head: its width), or a fixed level without a dose.
    if patient.head is not None and plan.region in ("brain", "headneck"):
      ext = patient.head.hi - patient.head.lo
      diameter = float(np.sqrt(ext[0] * ext[1]))
    else:
      diameter = 2.0 * float(np.sqrt(patient.half_width * patient.half_depth))
    return physics.ct_image(lab, plan.contrast == "yes", rng, spacing=grid.spacing,
                            thickness=plan.thickness,
                            noise_hu=None if plan.mas else float(rng.uniform(6, 18)),
                            phase=plan.phase or "portal", kernel=plan.kernel, mas=plan.mas or None,
                            kvp=plan.kvp, diameter_mm=diameter, patient_ct=patient.ct)
  if plan.modality == "PT":
    return physics.pet_image(lab, rng, spacing=grid.spacing)
  gd = 1.0 if plan.contrast == "yes" else 0.0
  field = plan.field_t
  coil = None
  if plan.region == "brain" and patient.head is not None:
    # Brain MR is received with a head coil whose elements end around C2,
    # 10-50 mm above the chin (head-neck and body studies use coils that
    # cover the neck).
    z = grid.points(tuple((0, n) for n in grid.shape))[..., 2]
    coil = physics.head_coil_profile(z, patient.head.z_chin + float(rng.uniform(10, 50)),
                                     float(rng.uniform(10, 25)), float(rng.uniform(0.1, 0.4)))
  common = dict(spacing=grid.spacing, thickness=plan.thickness, gd=gd, fat_sat=plan.fat_sat, field_t=field,
                randomise=randomise, coil=coil)
  if plan.epi or plan.bold:
    # Echo-planar, fat suppressed, displaced near air along the phase axis
    # (2-5 mm at 1.5 T, twice that at 3 T, either polarity). Diffusion:
    # a spin echo (flow voids, no T2* dropout); BOLD: a gradient echo (T2*,
    # dropout near the sinuses and mastoids, dark deoxygenated veins).
    shift = float(rng.uniform(2.0, 5.0) * plan.field_t / 1.5 * rng.choice([-1.0, 1.0]))
    return physics.mr_image(lab, rng, tr=plan.tr, te=plan.te, b_value=plan.b_value,
                            snr=float(rng.uniform(12, 30) if plan.epi else rng.uniform(25, 60)),
                            spin_echo=plan.epi, t2star=plan.bold, epi_shift_mm=shift,
                            **dict(common, fat_sat=True))
  if plan.iso3d and plan.ti is not None:   # MPRAGE / IR-FSPGR: IR-prepared GRE
    return physics.mr_image(lab, rng, tr=plan.tr, te=plan.te, ti=plan.ti, **common)
  if plan.gre:   # spoiled gradient echo T1: steady state with flip angle
    return physics.mr_image(lab, rng, tr=plan.tr * 4 + 400, te=plan.te, **common)
  # SE / FSE / FLAIR: flowing blood is a flow void (physics.FLOW_VOID).
  return physics.mr_image(lab, rng, tr=plan.tr, te=plan.te, ti=plan.ti, spin_echo=True, **common)


def _base(ids: dict, plan, patient: Patient, date: str) -> Dataset:
  ds = Dataset()
  ds.SpecificCharacterSet = "ISO_IR 100"
  ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
  ds.StudyTime = "%02d%02d00" % (8 + ids["study_no"] % 9, (ids["study_no"] * 7) % 60)
  ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = ds.StudyTime
  ds.AccessionNumber = "PHA%07d" % (ids["study_no"] + 1)
  ds.Manufacturer = plan.vendor
  ds.InstitutionName = "RadNet Phantom Hospital"
  ds.ReferringPhysicianName = ""
  ds.PatientName = "PHANTOM^%s" % ids["patient_id"]
  ds.PatientID = ids["patient_id"]
  ds.PatientBirthDate = "%04d0101" % (int(date[:4]) - patient.age)
  ds.PatientSex = patient.sex
  ds.PatientAge = "%03dY" % patient.age
  ds.PatientWeight = round(patient.weight, 1)
  ds.PatientSize = round(patient.height / 1000.0, 2)
  ds.StudyInstanceUID = ids["study_uid"]
  ds.StudyID = str(ids["study_no"] + 1)
  ds.StudyDescription = plan.study_description
  ds.FrameOfReferenceUID = ids["for_uid"]
  ds.PatientPosition = "HFS"
  ds.PositionReferenceIndicator = ""
  return ds


def write_series(folder: str, names: list, plan, patient: Patient, grid: Grid, img: np.ndarray,
                 tags: dict, ids: dict, date: str, order: np.ndarray) -> list:
  """Writes one image series (one file per slice) -> list of written paths.

  tags: series-level DICOM keyword -> value (None deletes; '' writes empty).
  order: InstanceNumber order of the slices (ascending or descending along n).
  """
  ds = _base(ids, plan, patient, date)
  ds.Modality = plan.modality
  ds.SOPClassUID = SOP[plan.modality]
  ds.SeriesInstanceUID = ids["series_uid"]
  ds.SeriesNumber = ids["series_no"]
  ds.ImageOrientationPatient = [round(float(v), 6) for v in (*grid.r, *grid.c)]
  ds.PixelSpacing = [round(grid.spacing[1], 6), round(grid.spacing[2], 6)]
  ds.SliceThickness = round(plan.thickness, 4)
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.Rows, ds.Columns = int(grid.shape[1]), int(grid.shape[2])
  ds.BitsAllocated = 16
  ds.HighBit = 15 if plan.modality != "MR" else 11
  ds.BitsStored = ds.HighBit + 1
  if plan.modality == "CT":
    ds.PixelRepresentation = 0 if plan.vendor in ("SIEMENS", "TOSHIBA") else 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.KVP, ds.WindowCenter, ds.WindowWidth = 120, 40, 400
    stored = np.round(img + 1024).astype(np.int32)
    stored = np.clip(stored, 0, 4095).astype(np.uint16 if ds.PixelRepresentation == 0 else np.int16)
  elif plan.modality == "MR":
    ds.PixelRepresentation = 0
    ds.MagneticFieldStrength = float(plan.field_t)
    ds.ImagingFrequency = round(42.577 * ds.MagneticFieldStrength, 3)
    stored = np.clip(np.round(img), 0, 4095).astype(np.uint16)
  else:
    ds.PixelRepresentation = 1
    ds.Units, ds.DecayCorrection, ds.CorrectedImage = "BQML", "START", ["ATTN", "DECY"]
    ds.SeriesType = ["WHOLE BODY", "IMAGE"]
    bqml = img * (370e6 / (patient.weight * 1000.0))  # SUV -> Bq/ml for 370 MBq FDG
    rp = Dataset()
    rp.Radiopharmaceutical = "Fluorodeoxyglucose"
    rp.RadionuclideTotalDose = 370e6
    rp.RadionuclideHalfLife = 6586.2
    ds.RadiopharmaceuticalInformationSequence = [rp]
    stored = None
  for k, v in tags.items():
    if v is None:
      if k in ds:
        del ds[k]
    else:
      setattr(ds, k, v)
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = ds.SOPClassUID
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
  ds.file_meta = meta
  # Encode the series-level elements once; per slice only the few varying
  # elements are encoded and spliced in tag order (pydicom's dcmwrite per file
  # re-encodes everything and dominated the corpus build time).
  varying = {0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010}
  if stored is None:   # PET: per-slice rescale
    varying |= {0x00281052, 0x00281053}
  fixed = [(int(e.tag), _enc(e)) for e in ds if int(e.tag) not in varying]
  # The file meta likewise: once through pydicom (which adds the standard's
  # elements and the group length), then only the instance UID and the group
  # length per slice.
  meta.MediaStorageSOPInstanceUID = uid(ids["series_uid"], 0)
  write_file_meta_info(DicomBytesIO(), meta, enforce_standard=True)
  meta_fixed = [(int(e.tag), _enc(e)) for e in meta if int(e.tag) not in (0x00020000, 0x00020003)]
  paths = []
  for inst, k in enumerate(order):
    pos = grid.origin + k * grid.spacing[0] * grid.n
    sop = uid(ids["series_uid"], int(k))
    per = [(0x00080018, "UI", sop), (0x00200013, "IS", [inst + 1]),
           (0x00200032, "DS", [round(float(v), 4) for v in pos]), (0x00201041, "DS", [round(float(pos @ grid.n), 4)])]
    if stored is None:   # PET: per-slice rescale slope, int16 storage
      sl = bqml[k]
      slope = DSfloat(round(max(float(sl.max()) / 32000.0, 1e-3), 6))
      per += [(0x00281052, "DS", [0]), (0x00281053, "DS", [slope])]
      arr = np.round(sl / float(slope)).clip(0, 32767).astype(np.int16)
    else:
      arr = stored[k]
    per.append((0x7FE00010, "OW", np.ascontiguousarray(arr).tobytes()))
    elems = sorted(fixed + [(t, _elem(t, vr, v)) for t, vr, v in per], key=lambda te: te[0])
    head = sorted(meta_fixed + [(0x00020003, _elem(0x00020003, "UI", sop))], key=lambda te: te[0])
    head_bytes = b"".join(b for _, b in head)
    path = os.path.join(folder, names[inst])
    with open(path, "wb") as f:
      f.write(b"\0" * 128 + b"DICM" + _elem(0x00020000, "UL", len(head_bytes)) + head_bytes)
      f.write(b"".join(b for _, b in elems))
    paths.append(path)
  return paths


def _elem(tag: int, vr: str, value) -> bytes:
  """One data element as explicit VR little endian bytes, encoded as pydicom writes it.

  value: bytes (OW), a str (UI), an int (UL) or a list of numbers (IS, DS;
  pydicom's IS / DSfloat text, backslash-separated).
  """
  if vr == "UL":
    raw = struct.pack("<I", value)
  elif vr == "OW":
    raw = value
  else:
    text = value if vr == "UI" else "\\".join(str(IS(v) if vr == "IS" else DSfloat(v)) for v in value)
    raw = text.encode("ascii")
    if len(raw) % 2:
      raw += b"\0" if vr == "UI" else b" "
  if vr == "OW":   # a 4-byte length after 2 reserved bytes
    return struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr.encode(), len(raw)) + raw
  return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(raw)) + raw


def _enc(elem) -> bytes:
  """One data element encoded as explicit VR little endian bytes."""
  fp = DicomBytesIO()
  fp.is_little_endian, fp.is_implicit_VR = True, False
  write_data_element(fp, elem)
  return fp.getvalue()


def write_extras(folder: str, names: list, kind: str, plan, patient: Patient, ids: dict, date: str) -> list:
  """Writes a localizer series ('localizer') or a non-image object ('sr'/'gsps')."""
  ds = _base(ids, plan, patient, date)
  meta = FileMetaDataset()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
  ds.SeriesInstanceUID = ids["series_uid"]
  ds.SeriesNumber = ids["series_no"]
  paths = []
  if kind == "localizer":
    ds.Modality = plan.modality if plan.modality != "PT" else "CT"
    ds.SOPClassUID = SOP[ds.Modality]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesDescription = "Topogram 0.6 T20f" if ds.Modality == "CT" else "localizer"
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [6.0, 6.0]
    ds.SliceThickness = 10.0
    axes = [_AXES["COR"]] if ds.Modality == "CT" else [_AXES["AX"], _AXES["COR"], _AXES["SAG"]]
    for i, (r, c) in enumerate(axes):
      ds.ImageOrientationPatient = [float(v) for v in (*r, *c)]
      ds.ImagePositionPatient = [-192.0, -192.0, float(patient.z_vertex)]
      ds.InstanceNumber = i + 1
      ds.SOPInstanceUID = uid(ids["series_uid"], i)
      yy, xx = np.mgrid[:64, :64]
      ds.PixelData = (((xx - 32) ** 2 / 400 + (yy - 32) ** 2 / 900 < 1) * 800).astype(np.uint16).tobytes()
      meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
      ds.file_meta = meta
      path = os.path.join(folder, names[i])
      pydicom.dcmwrite(path, ds, enforce_file_format=True)
      paths.append(path)
    return paths
  if kind == "sr":
    ds.Modality, ds.SOPClassUID = "SR", SR_SOP
    ds.SeriesDescription = "Dose Report" if plan.modality == "CT" else "Technologist notes"
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    ds.ContinuityOfContent = "SEPARATE"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "121070", "DCM", "Findings"
    ds.ConceptNameCodeSequence = [concept]
    item = Dataset()
    item.RelationshipType, item.ValueType, item.TextValue = "CONTAINS", "TEXT", "Synthetic phantom study."
    item.ConceptNameCodeSequence = [concept]
    ds.ContentSequence = [item]
  else:
    ds.Modality, ds.SOPClassUID = "PR", GSPS_SOP
    ds.SeriesDescription = "Presentation State"
    ds.ContentLabel, ds.ContentDescription = "SAVED", "window"
    ds.PresentationCreationDate, ds.PresentationCreationTime = date, "120000"
  ds.InstanceNumber = 1
  ds.SOPInstanceUID = uid(ids["series_uid"], 0)
  meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
  ds.file_meta = meta
  path = os.path.join(folder, names[0])
  pydicom.dcmwrite(path, ds, enforce_file_format=True)
  return [path]
