"""DICOM CT + DICOM SEG for the segmentation transfer: read and discover.

Input side (``segdata.build_shards`` with DICOM cases):

* ``find_dicom_cases(root, salt)``: every CT stack under ``root`` (via
  ``radnet_jax.dicom.scan``) paired with the SEG object that references it
  (ReferencedSeriesSequence, else the referenced SOP instances, else a shared
  FrameOfReferenceUID). Case ids are the salted series hash: no raw UID or
  name ever reaches a record, a log or a file name.
* ``rasterise(seg_path, affine, shape)``: a SEG's segments painted onto the
  voxel grid of the referenced CT (``dicom.load_volume`` grid), frame by frame
  from each frame's *physical* position (PlanePositionSequence) and the
  shared or per-frame PlaneOrientation / PixelMeasures, never from frame
  order. BINARY, FRACTIONAL (>= half of MaximumFractionalValue) and LABELMAP
  segmentations. Segments become LiTS labels (1 liver, 2 tumour) from their
  SegmentLabel / SegmentedPropertyType (``segment_values``); overlaps keep
  the larger label (tumour inside liver).
* ``load_ct_canonical(stack)``: the CT in the same axial canonical layout and
  geometry dict as ``nifti.load_nifti_canonical``, so ``segdata.preprocess``
  and ``nifti.to_original_grid`` work unchanged; the "original grid" of a
  DICOM case is the ``load_volume`` grid (sorted slices, slice axis first).

Output side: ``seg_write.write_seg(labels, affine, ct_files, out_path)``, a
label map as a SEG on the CT images; it shares ``_frame_geometry`` and
``_axis_step`` with the reader here.

Coordinates are DICOM LPS mm; volumes ``(D, H, W)`` voxels.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import struct
from typing import Mapping, Sequence

import numpy as np
from pydicom.dataset import Dataset

from radnet_jax import dicom as dicom_lib
from radnet_jax.dicom import nifti
from radnet_jax.dicom.errors import DicomError
from radnet_jax.dicom.metadata import functional_group, sop_class_uid
from radnet_jax.dicom.reader import read_dataset
from radnet_jax.labels.lits import LIVER, TUMOUR  # the one LiTS vocabulary
from radnet_jax.privacy import hash_id

log = logging.getLogger(__name__)

SEG_SOP = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_SOP = "1.2.840.10008.5.1.4.1.1.66.7"
# SNOMED CT codes that identify a segment's meaning (SegmentedPropertyType).
_LIVER_CODES = {"10200004"}                       # Liver
_TUMOUR_CODES = {"108369006", "86049000", "52988006", "4147007", "14799000",
                 "109355002", "25370001", "187769009"}  # neoplasm, lesion, mass, ...
_TUMOUR_WORDS = re.compile(r"tumou?r|lesion|neoplasm|\bmass|cancer|carcinoma|"
                           r"metasta|\bhcc\b|nodule")
_LIVER_WORDS = re.compile(r"\bliver\b|\bhepar\b")
# Liver sub-structures that are not the organ label (MSD hepatic vessels,
# Couinaud segments, bile ducts): never silently trained as "liver".
_OTHER_WORDS = re.compile(r"vessel|vein|arter|duct|portal|bile|couinaud|segment [ivx1-8]")
# Unit-vector and slice-position tolerances when matching SEG frames to the
# CT grid: orientation / pixel spacing in voxel units, slice position in
# fractions of the slice spacing.
_AXIS_TOL = 2e-3
SLICE_TOL = 0.25


# ------------------------------------------------------------------ reading


@dataclasses.dataclass(frozen=True)
class SegmentInfo:
  """One item of a SEG's SegmentSequence (no identifiers)."""
  number: int
  label: str
  property_type: str          # CodeMeaning of SegmentedPropertyType
  property_code: str          # its CodeValue
  category: str               # CodeMeaning of SegmentedPropertyCategory


def _code(item: Dataset, keyword: str) -> tuple[str, str]:
  seq = item.get(keyword)
  if not seq:
    return "", ""
  return str(seq[0].get("CodeMeaning", "")), str(seq[0].get("CodeValue", ""))


def _is_seg(ds: Dataset) -> bool:
  sop = sop_class_uid(ds)
  return sop in (SEG_SOP, LABELMAP_SEG_SOP) or str(ds.get("Modality", "")).upper() == "SEG"


def read_segments(ds: Dataset, path: str) -> list[SegmentInfo]:
  """The SegmentSequence of a SEG dataset; DicomError naming ``path`` if absent."""
  seq = ds.get("SegmentSequence")
  if not seq:
    raise DicomError(path, "SEG without a SegmentSequence")
  out = []
  for item in seq:
    try:
      number = int(item.SegmentNumber)
    except (AttributeError, TypeError, ValueError) as e:
      raise DicomError(path, "segment without a valid SegmentNumber") from e
    ptype, pcode = _code(item, "SegmentedPropertyTypeCodeSequence")
    cat, _ = _code(item, "SegmentedPropertyCategoryCodeSequence")
    out.append(SegmentInfo(number, str(item.get("SegmentLabel", "")), ptype, pcode, cat))
  return out


def segment_values(segments: Sequence[SegmentInfo], path: str,
                   label_map: Mapping[str | int, int] | None = None) -> dict[int, int]:
  """Segment number -> LiTS label value (1 liver, 2 tumour, 0 ignored).

  ``label_map`` (SegmentLabel, case-insensitive, or segment number -> value)
  takes precedence; otherwise tumour / lesion / neoplasm / mass words or
  SNOMED codes -> 2, liver -> 1 (tumour is checked first: "liver tumour" is a
  tumour; vessels, ducts and Couinaud segments are not "liver"). A segment that none of these name raises a ValueError naming the
  file and the segment, so a kidney is never trained as liver by accident.
  """
  lm = {(k.strip().lower() if isinstance(k, str) else int(k)): int(v)
        for k, v in (label_map or {}).items()}
  out = {}
  for s in segments:
    if s.number in lm:
      out[s.number] = lm[s.number]
      continue
    if s.label.strip().lower() in lm:
      out[s.number] = lm[s.label.strip().lower()]
      continue
    text = f"{s.label} {s.property_type}".lower()
    if s.property_code in _TUMOUR_CODES or _TUMOUR_WORDS.search(text):
      out[s.number] = TUMOUR
    elif _OTHER_WORDS.search(text):
      raise ValueError(
          f"{path}: segment {s.number} ({s.label!r}, type {s.property_type!r}) is a "
          f"liver sub-structure, not the liver; pass label_map={{'{s.label}': 0|1|2}}")
    elif s.property_code in _LIVER_CODES or _LIVER_WORDS.search(text):
      out[s.number] = LIVER
    else:
      raise ValueError(
          f"{path}: segment {s.number} ({s.label!r}, type {s.property_type!r}) is "
          f"neither liver nor tumour; pass label_map={{'{s.label}': 0|1|2}} "
          f"(--label-map on the command line) to map or ignore it")
  bad = {k: v for k, v in out.items() if v not in (0, LIVER, TUMOUR)}
  if bad:
    raise ValueError(f"{path}: label_map values must be 0, 1 or 2, got {bad}")
  return out


@dataclasses.dataclass(frozen=True)
class CTReference:
  """Identifiers of a CT series, held in memory only to match a SEG to it."""
  series_uid: str
  frame_of_reference_uid: str
  sop_uids: frozenset[str]


def ct_reference(files: Sequence[str]) -> CTReference:
  """Reads the UIDs that a SEG may reference from the CT files' headers."""
  series, for_uid, sops = "", "", set()
  for f in files:
    ds = read_dataset(f, stop_before_pixels=True)
    series = series or str(ds.get("SeriesInstanceUID", ""))
    for_uid = for_uid or str(ds.get("FrameOfReferenceUID", ""))
    if "SOPInstanceUID" in ds:
      sops.add(str(ds.SOPInstanceUID))
  return CTReference(series, for_uid, frozenset(sops))


def _referenced(ds: Dataset) -> tuple[set[str], set[str]]:
  """(referenced series UIDs, referenced SOP instance UIDs) of a SEG."""
  series, sops = set(), set()
  for item in ds.get("ReferencedSeriesSequence", []) or []:
    if "SeriesInstanceUID" in item:
      series.add(str(item.SeriesInstanceUID))
    for inst in item.get("ReferencedInstanceSequence", []) or []:
      if "ReferencedSOPInstanceUID" in inst:
        sops.add(str(inst.ReferencedSOPInstanceUID))
  for item in ds.get("SourceImageSequence", []) or []:
    if "ReferencedSOPInstanceUID" in item:
      sops.add(str(item.ReferencedSOPInstanceUID))
  for fg in ds.get("PerFrameFunctionalGroupsSequence", []) or []:
    for der in fg.get("DerivationImageSequence", []) or []:
      for src in der.get("SourceImageSequence", []) or []:
        if "ReferencedSOPInstanceUID" in src:
          sops.add(str(src.ReferencedSOPInstanceUID))
  return series, sops


def check_reference(ds: Dataset, ct: CTReference, path: str) -> None:
  """Raises ValueError naming ``path`` unless the SEG belongs to the CT series.

  The SEG must reference the series (or some of its instances) and share its
  frame of reference; a SEG without any reference must at least share the
  FrameOfReferenceUID.
  """
  series, sops = _referenced(ds)
  seg_for = str(ds.get("FrameOfReferenceUID", ""))
  if seg_for and ct.frame_of_reference_uid and seg_for != ct.frame_of_reference_uid:
    raise ValueError(f"{path}: SEG is in a different frame of reference than the CT "
                     f"series (FrameOfReferenceUID differs)")
  if series and ct.series_uid not in series:
    raise ValueError(f"{path}: SEG does not reference this CT series "
                     f"(ReferencedSeriesSequence names {len(series)} other series)")
  if not series and sops and not sops & ct.sop_uids:
    raise ValueError(f"{path}: SEG references none of this CT series' images")
  if not series and not sops and not seg_for:
    raise ValueError(f"{path}: SEG has no referenced series, images or frame of "
                     f"reference to tie it to a CT series")


def _frame_geometry(ds: Dataset, frame: int, where: str
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(position (3,), row direction r, column direction c, spacing (dr, dc))."""
  pos = functional_group(ds, frame, "PlanePositionSequence")
  ori = functional_group(ds, frame, "PlaneOrientationSequence")
  meas = functional_group(ds, frame, "PixelMeasuresSequence")
  if pos is None or "ImagePositionPatient" not in pos:
    raise ValueError(f"{where}: frame {frame + 1} has no PlanePositionSequence "
                     f"(ImagePositionPatient)")
  iop = ori.get("ImageOrientationPatient") if ori is not None else None
  iop = iop if iop is not None else ds.get("ImageOrientationPatient")
  spacing = meas.get("PixelSpacing") if meas is not None else None
  spacing = spacing if spacing is not None else ds.get("PixelSpacing")
  if iop is None or spacing is None:
    raise ValueError(f"{where}: frame {frame + 1} has no plane orientation or "
                     f"pixel spacing")
  try:
    p = np.array([float(v) for v in pos.ImagePositionPatient], float)
    o = np.array([float(v) for v in iop], float)
    s = np.array([float(v) for v in spacing], float)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: frame {frame + 1} has invalid geometry values") from e
  if p.shape != (3,) or o.shape != (6,) or s.shape != (2,) or not (s > 0).all():
    raise ValueError(f"{where}: frame {frame + 1} has invalid geometry values")
  return p, o[:3], o[3:], s


def _axis_step(vec: np.ndarray) -> tuple[int, int] | None:
  """(axis, +-1) when ``vec`` (index units) is one voxel along one axis."""
  ax = int(np.argmax(np.abs(vec)))
  sign = 1 if vec[ax] > 0 else -1
  unit = np.zeros(3)
  unit[ax] = sign
  return (ax, sign) if np.max(np.abs(vec - unit)) < _AXIS_TOL else None


def rasterise(seg: str | Dataset, affine: np.ndarray, shape: Sequence[int], *,
              ct: CTReference | None = None,
              label_map: Mapping[str | int, int] | None = None,
              slice_tol: float = SLICE_TOL) -> np.ndarray:
  """Paints a DICOM SEG onto a CT voxel grid.

  Args:
    seg: SEG file path (or an already read dataset with pixels).
    affine: ``(4, 4)`` voxel index (d, h, w, 1) -> LPS mm of the CT grid (e.g.
      ``dicom.load_volume(stack).affine``).
    shape: ``(D, H, W)`` of that grid.
    ct: the CT series' identifiers; when given the SEG must reference it
      (``check_reference``).
    label_map: see ``segment_values``.
    slice_tol: largest distance (fraction of the slice spacing) between a
      frame's plane and the nearest CT slice.

  Returns:
    uint8 ``(D, H, W)``: 0 background, 1 liver, 2 tumour.

  Raises:
    ValueError (or DicomError) naming the file: not a SEG, unreadable
    pixels, SEG of another series, frames whose orientation / pixel spacing
    differ from the CT grid's or that lie between CT slices, labelled pixels
    outside the CT volume, unknown segment names.
  """
  if isinstance(seg, Dataset):
    ds, path = seg, str(getattr(seg, "filename", None) or "SEG")
  else:
    path = seg
    ds = read_dataset(path, stop_before_pixels=False)
    try:   # pydicom parses sequences on first access: a truncated file fails there
      ds.walk(lambda d, e: None)
    except (struct.error, EOFError, ValueError, TypeError) as e:
      raise ValueError(f"{path}: truncated or corrupt DICOM file ({type(e).__name__}: {e})") from e
  if not _is_seg(ds):
    raise ValueError(f"{path}: not a DICOM SEG (SOPClassUID "
                     f"{ds.get('SOPClassUID', '?')}, Modality {ds.get('Modality', '?')})")
  if ct is not None:
    check_reference(ds, ct, path)
  values = segment_values(read_segments(ds, path), path, label_map)
  seg_type = str(ds.get("SegmentationType", "")).upper()
  labelmap = seg_type == "LABELMAP" or str(ds.get("SOPClassUID", "")) == LABELMAP_SEG_SOP
  if seg_type not in ("BINARY", "FRACTIONAL") and not labelmap:
    raise ValueError(f"{path}: unsupported SegmentationType {seg_type!r}")
  try:
    pix = np.asarray(ds.pixel_array)
  except Exception as e:  # decoder errors, truncated or missing pixel data
    raise ValueError(f"{path}: cannot decode the SEG pixel data "
                     f"({type(e).__name__}: {e})") from e
  n_frames = int(ds.get("NumberOfFrames", 1) or 1)
  if pix.ndim == 2:
    pix = pix[None]
  if pix.shape[0] != n_frames:
    raise ValueError(f"{path}: pixel data holds {pix.shape[0]} frames, header "
                     f"says {n_frames}")
  if labelmap:
    lut = np.zeros(max(int(pix.max()), max(values, default=0)) + 1, np.uint8)
    for num, val in values.items():
      lut[num] = val
  max_frac = float(ds.get("MaximumFractionalValue", 255) or 255)
  shape = tuple(int(s) for s in shape)
  out = np.zeros(shape, np.uint8)
  inv = np.linalg.inv(np.asarray(affine, np.float64))
  for f in range(n_frames):
    where = f"{path} frame {f + 1}"
    if labelmap:
      lab = lut[pix[f]]
    else:
      ident = functional_group(ds, f, "SegmentIdentificationSequence")
      if ident is None or "ReferencedSegmentNumber" not in ident:
        raise ValueError(f"{where}: no SegmentIdentificationSequence")
      num = int(ident.ReferencedSegmentNumber)
      if num not in values:
        raise ValueError(f"{where}: references segment {num}, which the "
                         f"SegmentSequence does not describe")
      on = pix[f] * 2 >= max_frac if seg_type == "FRACTIONAL" else pix[f] > 0
      lab = on.astype(np.uint8) * np.uint8(values[num])
    pos, r, c, (dr, dc) = _frame_geometry(ds, f, path)
    base = inv[:3, :3] @ pos + inv[:3, 3]
    down = _axis_step(inv[:3, :3] @ (c * dr))     # one row down the frame
    right = _axis_step(inv[:3, :3] @ (r * dc))    # one column along the frame
    if down is None or right is None or down[0] == right[0]:
      raise ValueError(f"{where}: frame orientation / pixel spacing does not match "
                       f"the CT grid (frames must lie on CT slices with the CT's "
                       f"pixel spacing)")
    ax_s = 3 - down[0] - right[0]
    k = float(base[ax_s])
    ki = int(np.rint(k))
    if abs(k - ki) > slice_tol:
      raise ValueError(f"{where}: frame lies between CT slices ({k:.3f} in slice "
                       f"units): frames are off the CT grid")
    if not lab.any():
      continue
    if not 0 <= ki < shape[ax_s]:
      raise ValueError(f"{where}: labelled frame lies outside the CT volume "
                       f"(slice {ki} of {shape[ax_s]})")
    rows = int(np.rint(base[down[0]])) + down[1] * np.arange(lab.shape[0])
    cols = int(np.rint(base[right[0]])) + right[1] * np.arange(lab.shape[1])
    ok_r = (rows >= 0) & (rows < shape[down[0]])
    ok_c = (cols >= 0) & (cols < shape[right[0]])
    if lab[~ok_r].any() or lab[:, ~ok_c].any():
      raise ValueError(f"{where}: labelled pixels fall outside the CT volume")
    lab = lab[np.ix_(ok_r, ok_c)]
    view = np.moveaxis(out, ax_s, 0)[ki]          # remaining axes, ascending
    if down[0] > right[0]:
      lab = lab.T
      idx = np.ix_(cols[ok_c], rows[ok_r])
    else:
      idx = np.ix_(rows[ok_r], cols[ok_c])
    view[idx] = np.maximum(view[idx], lab)
  return out


# ------------------------------------------------------------------ cases


@dataclasses.dataclass(frozen=True)
class DicomCase:
  """A CT stack and the SEG that labels it (None: unlabelled).

  case: the salted series hash (PHI-free case id); patient: salted patient
  hash (splits are by patient); stack: the ``dicom.Stack``; more_segs:
  further SEGs of the same series (e.g. liver and lesions in separate
  objects), merged into one label map (the larger label wins).
  """
  case: str
  patient: str
  stack: dicom_lib.Stack
  seg_path: str | None
  more_segs: tuple[str, ...] = ()


def _seg_headers(paths: Sequence[str]) -> list[tuple[str, Dataset]]:
  out = []
  for p in paths:
    try:
      ds = read_dataset(p, stop_before_pixels=True)
    except DicomError:
      continue
    if _is_seg(ds):
      out.append((p, ds))
  return out


def find_dicom_cases(root: str, salt: str, workers: int = 1
                     ) -> tuple[list[DicomCase], list[dict]]:
  """CT stacks under ``root`` paired with the SEG referencing each.

  Returns (cases sorted by case id, problems): problems are
  ``{"file", "reason"}`` rows for SEGs that match no (or several) CT
  stacks. Several SEGs of one series are all used (``DicomCase.more_segs``).
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{root}: not a directory")
  res = dicom_lib.scan(root, salt=salt, workers=workers)
  cts = [s for s in res.stacks if str(s.record.get("Modality", "")).upper() == "CT"]
  segs = _seg_headers(sorted({k.path for k in res.skipped if "non-image" in k.reason}))
  problems: list[dict] = []
  by_series: dict[str, list[dicom_lib.Stack]] = {}
  for s in cts:
    by_series.setdefault(s.record.get("SeriesHash", ""), []).append(s)
  chosen: dict[str, list[str]] = {}
  refs_cache: dict[str, CTReference] = {}

  def ref_of(stack):
    if stack.key not in refs_cache:
      refs_cache[stack.key] = ct_reference(stack.files[:1])
    return refs_cache[stack.key]

  for path, ds in segs:
    series, sops = _referenced(ds)
    targets = [s for uid in series for s in by_series.get(hash_id(uid, salt), [])]
    if not targets and not series:
      seg_for = str(ds.get("FrameOfReferenceUID", ""))
      targets = [s for s in cts if seg_for and ref_of(s).frame_of_reference_uid == seg_for]
    if len(targets) > 1 and sops:
      targets = [s for s in targets if sops & ct_reference(s.files).sop_uids] or targets
    rel = os.path.relpath(path, root)
    if not targets:
      problems.append({"file": rel, "reason": "SEG references no CT series found "
                                              "under the input folder"})
      continue
    if len(targets) > 1:
      problems.append({"file": rel, "reason": f"SEG matches {len(targets)} CT "
                                              f"stacks; not used"})
      continue
    chosen.setdefault(targets[0].key, []).append(path)
  cases = []
  for s in cts:
    segs_of = chosen.get(s.key, [])
    case = s.record.get("SeriesHash") or s.key
    if len(by_series.get(s.record.get("SeriesHash", ""), [])) > 1:
      case = s.key   # a series split into stacks: one case per stack
    cases.append(DicomCase(case=case, patient=s.record.get("PatientHash", "") or case,
                           stack=s, seg_path=segs_of[0] if segs_of else None,
                           more_segs=tuple(segs_of[1:])))
  cases.sort(key=lambda c: c.case)
  return cases, problems


def load_ct_canonical(stack: dicom_lib.Stack) -> tuple[np.ndarray, np.ndarray, dict,
                                                       dicom_lib.Volume]:
  """A CT stack in the axial canonical layout of ``segdata``.

  Returns:
    voxels float32 ``(D, H, W)`` HU (axial canonical), affine ``(4, 4)`` ->
    LPS mm, geometry (``nifti.canonicalise``: ``orig_*`` describe the
    ``load_volume`` grid, plus ``source: "dicom"``), and the Volume itself
    (its grid is where SEG masks are rasterised and predictions written).
  """
  vol = dicom_lib.load_volume(stack)
  hu, affine, geometry = nifti.canonicalise(vol.voxels, nifti.RAS_TO_LPS @ vol.affine,
                                              f"stack {stack.key}")
  geometry["source"] = "dicom"
  return hu, affine, geometry, vol


def load_case(case: DicomCase, label_map: Mapping[str | int, int] | None = None
              ) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray | None]:
  """(HU, affine, geometry, mask or None), canonical, for ``segdata.make_record``."""
  hu, affine, geometry, vol = load_ct_canonical(case.stack)
  if case.seg_path is None:
    return hu, affine, geometry, None
  ref = ct_reference(case.stack.files)
  mask = rasterise(case.seg_path, vol.affine, vol.voxels.shape, ct=ref,
                   label_map=label_map)
  for extra in case.more_segs:
    np.maximum(mask, rasterise(extra, vol.affine, vol.voxels.shape, ct=ref,
                               label_map=label_map), out=mask)
  canon, _, _ = nifti.canonicalise(mask, nifti.RAS_TO_LPS @ vol.affine, case.seg_path)
  return hu, affine, geometry, np.rint(canon).astype(np.uint8)
