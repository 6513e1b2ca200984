"""One DICOM file's header -> its slice entries, or the reason it is skipped.

``read_entries(path, salt)`` reads headers only (``stop_before_pixels``) and
returns one ``_Entry`` per slice (a classic file, one frame of an enhanced
object, a Siemens mosaic or UIH VFRAME file as one entry with its image
count), or a ``Skipped``. ``scan`` groups the entries into stacks and
``split`` cuts them into volumes. Each entry carries:

* its *hard key*, the values that always split: image size and pixel
  spacing, echo (EchoNumbers / EchoTime), diffusion b-value and gradient
  direction (the standard tags or the vendor's: GE (0043,1039) /
  (0019,10BB-BD), Philips (2001,1003) / (2005,10B0-B2), Siemens
  (0019,100C/100E) or CSA, UIH (0065,1009/1037), Canon's ImageComments;
  ``metadata.vendor_b_value``), image type (ORIGINAL vs DERIVED, magnitude /
  phase / real / imaginary), enhanced Stack ID, and the file for a Siemens
  mosaic or UIH VFRAME file (each is a volume);
* its geometry (orientation, position, pixel spacing), from the classic
  tags, the per-frame functional groups or the vendor's private tags;
* the per-file ``VOLUME_KEYS`` values (TemporalPositionIdentifier / Index,
  AcquisitionNumber, TriggerTime, StackID, ImageType, AcquisitionTime) and
  InstanceNumber / frame order, which ``split._split_volumes`` uses where
  slice positions repeat.

Rejected here, each with a reason: non-DICOM files, DICOMDIRs, non-image
objects (SR, RT structure sets/plans/doses, presentation states, SEG, key
objects, waveforms, ...), headers without geometry (the reason names the
missing tag and the vendor), truncated uncompressed pixel data, and
unreadable files. Localizers (ImageType LOCALIZER) are marked, and skipped
by ``scan``.

Speed: plain classic images are read with ``fastread`` (only the ~35
grouping / geometry tags and the vendor diffusion values, no pydicom
objects), and the full metadata record
is built (with pydicom) only for the first file of each (series, hard key)
group, which is the only record a stack keeps.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pydicom is imported only where a file needs it (slow import)
  from pydicom.dataset import Dataset

from radnet_jax.dicom import fastread
from radnet_jax.dicom.errors import DicomError
from radnet_jax.dicom.metadata import (functional_group, record_from_dataset,
                                       record_from_header,
                                       sop_class_uid, uih_vframe_items,
                                       vendor_geometry,
                                       vendor_b_value,
                                       vendor_diffusion_direction)
from radnet_jax.dicom.reader import is_dicomdir, read_dataset
from radnet_jax.dicom.types import Skipped
from radnet_jax.privacy import hash_id

# SOP classes (prefix match) that are not images to learn from.
NON_IMAGE_SOP = (
    ("1.2.840.10008.5.1.4.1.1.88.", "structured report (SR)"),
    ("1.2.840.10008.5.1.4.1.1.481.3", "RT structure set"),
    ("1.2.840.10008.5.1.4.1.1.481.5", "RT plan"),
    ("1.2.840.10008.5.1.4.1.1.481.8", "RT ion plan"),
    ("1.2.840.10008.5.1.4.1.1.481.2", "RT dose grid"),
    ("1.2.840.10008.5.1.4.1.1.481.", "RT object"),
    ("1.2.840.10008.5.1.4.1.1.11.", "presentation state"),
    ("1.2.840.10008.5.1.4.1.1.66.4", "segmentation (SEG)"),
    ("1.2.840.10008.5.1.4.1.1.66", "raw data / registration / fiducials"),
    ("1.2.840.10008.5.1.4.1.1.9.", "waveform"),
    ("1.2.840.10008.5.1.4.1.1.104.", "encapsulated document"),
    ("1.2.840.10008.5.1.4.1.1.4.2", "MR spectroscopy"),
    ("1.2.840.10008.5.1.4.1.1.67", "real world value mapping"),
    ("1.2.840.10008.5.1.4.1.1.68.", "surface"),
    ("1.2.840.10008.5.1.4.1.1.91.", "content assessment"),
)
# Cross-sectional image storage classes (CT, MR, PET, enhanced and legacy).
_IMAGE_SOP = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4",
              "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130",
              "1.2.840.10008.5.1.4.1.1.20")
NON_IMAGE_MODALITY = {
    "SR": "structured report (SR)", "KO": "key object selection (KO)",
    "PR": "presentation state (PR)", "RTSTRUCT": "RT structure set",
    "RTPLAN": "RT plan", "RTDOSE": "RT dose grid", "RTRECORD": "RT record",
    "SEG": "segmentation (SEG)", "REG": "registration", "DOC": "document",
    "ECG": "waveform", "HD": "waveform", "PLAN": "plan",
}
_COMPLEX = {"M": "MAGNITUDE", "MAG": "MAGNITUDE", "MAGNITUDE": "MAGNITUDE",
            "P": "PHASE", "PHA": "PHASE", "PHASE": "PHASE", "R": "REAL",
            "REAL": "REAL", "I": "IMAGINARY", "IMAGINARY": "IMAGINARY"}
# Per-file keys that tell apart the 3D volumes of a series whose slice
# positions repeat (after the hard keys: b-value, gradient direction, echo,
# image kind), in the order of evidence; InstanceNumber order is the last
# resort (``split._split_volumes``).
VOLUME_KEYS = ("TemporalPositionIdentifier", "TemporalPositionIndex",
               "AcquisitionNumber", "TriggerTime", "StackID", "ImageType",
               "AcquisitionTime")


@dataclasses.dataclass
class _Entry:
  """One slice (a classic file, one frame of an enhanced file, or a mosaic)."""
  path: str
  frame: int | None
  series_uid: str
  hard_key: tuple
  iop: np.ndarray
  position: np.ndarray
  rows: int
  cols: int
  pixel_spacing: tuple[float, float]
  keys: dict[str, Any]        # VOLUME_KEYS values + InstanceNumber / FrameOrder
  n_slices: int = 1           # > 1 for a mosaic (images in the mosaic)
  localizer: bool = False
  record: dict[str, Any] | None = None
  layout: str | None = None   # "UIH VFRAME": slices tiled in one file


def _floats(value: Any, n: int) -> np.ndarray | None:
  try:
    vals = [float(v) for v in value]
  except (TypeError, ValueError):
    return None
  if len(vals) != n or not all(math.isfinite(v) for v in vals):
    return None
  return np.array(vals)


def _check_normal(iop: np.ndarray, path: str) -> None:
  """``geometry.slice_normal``'s degenerate-orientation check, in plain
  floats (np.cross costs ~40 us a call, once per file here)."""
  rx, ry, rz, cx, cy, cz = (float(v) for v in iop)
  nx, ny, nz = ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx
  if math.sqrt(nx * nx + ny * ny + nz * nz) < 1e-6:
    raise DicomError(path, f"degenerate ImageOrientationPatient {iop.tolist()}")


def _image_type_key(image_type: Any, complex_component: Any = None) -> str:
  """ORIGINAL/DERIVED and the complex component: the parts that split."""
  items = [str(v).strip().upper() for v in (image_type or [])]
  kind = items[0] if items else ""
  comp = str(complex_component or "").strip().upper()
  if not comp:
    for token in items[2:]:
      if token in _COMPLEX:
        comp = _COMPLEX[token]
        break
  return f"{kind}/{_COMPLEX.get(comp, comp)}"


def _round(value: Any, ndigits: int = 3) -> Any:
  if value is None:
    return None
  try:
    return round(float(value), ndigits)
  except (TypeError, ValueError):
    return str(value)


def _non_image_reason(ds: Dataset) -> str | None:
  sop = sop_class_uid(ds)
  for prefix, what in NON_IMAGE_SOP:
    if sop.startswith(prefix):
      return f"non-image object: {what}"
  modality = str(ds.get("Modality", "")).upper()
  if modality in NON_IMAGE_MODALITY:
    return f"non-image object: {NON_IMAGE_MODALITY[modality]}"
  if "Rows" not in ds or "Columns" not in ds:
    at_eof = getattr(ds, "_radnet_pixel_offset", -1) >= getattr(
        ds, "_radnet_file_size", 0)
    if at_eof and sop.startswith(_IMAGE_SOP):
      return "truncated file: the header ends before the pixel data"
    return "no pixel data (no Rows/Columns): not an image"
  return None


def _truncation_reason(ds: Dataset, frames: int) -> str | None:
  """Checks that uncompressed pixel data fits in the file (cheap, no read)."""
  meta = getattr(ds, "file_meta", None)
  syntax = meta.get("TransferSyntaxUID") if meta is not None else None
  offset = getattr(ds, "_radnet_pixel_offset", None)
  size = getattr(ds, "_radnet_file_size", None)
  if offset is None or size is None:
    return None
  if syntax is not None and getattr(syntax, "is_compressed", False):
    return None if size > offset else "no pixel data"
  try:
    need = (int(ds.Rows) * int(ds.Columns) * frames *
            int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8)
  except (AttributeError, TypeError, ValueError):
    return None
  have = size - offset - 8  # minus the element header (at least 8 bytes)
  if have <= 0:
    return "no pixel data"
  if have < need:
    return f"truncated pixel data ({have} of {need} bytes)"
  return None


def _mosaic_images(ds: Dataset) -> int | None:
  """Images in a Siemens mosaic, or None if ``ds`` is not a mosaic."""
  image_type = [str(v).upper() for v in ds.get("ImageType", [])]
  if "MOSAIC" not in image_type:
    return None
  if isinstance(ds, fastread.Header):
    raise fastread.Unsupported("Siemens mosaic")
  try:
    block = ds.private_block(0x0019, "SIEMENS MR HEADER")
    if 0x0A in block:
      return int(block[0x0A].value)
  except Exception:
    pass
  try:
    with warnings.catch_warnings():  # nibabel warns that nicom is experimental
      warnings.simplefilter("ignore")
      from nibabel.nicom import csareader  # pylint: disable=import-outside-toplevel
    return int(csareader.get_n_mosaic(csareader.get_csa_header(ds)))
  except Exception:
    return 0


def _tm_seconds(value: Any) -> float | None:
  """DICOM TM ('HHMMSS.ffffff' or 'HH:MM:SS.ffffff') -> seconds of the day."""
  text = str(value or "").strip().replace(":", "")
  if len(text) < 2 or not text[:2].isdigit():
    return None
  try:
    hh = int(text[:2])
    mm = int(text[2:4]) if len(text) >= 4 else 0
    ss = float(text[4:]) if len(text) > 4 else 0.0
  except ValueError:
    return None
  return hh * 3600.0 + mm * 60.0 + ss


def _volume_keys(ds: Any) -> dict[str, Any]:
  """The per-file values that may tell volumes apart (see ``VOLUME_KEYS``)."""
  keys: dict[str, Any] = {}
  for k in VOLUME_KEYS:
    if k not in ds:
      continue
    value = ds.get(k)
    if k == "ImageType":
      value = "\\".join(str(v).strip().upper() for v in (value or []))
    elif k == "StackID":
      value = str(value).strip()
    elif k == "AcquisitionTime":
      value = _tm_seconds(value)
    elif not isinstance(value, int):   # IS / UL values stay integers
      value = _round(value, 3)
    if value not in (None, ""):
      keys[k] = value
  if "InstanceNumber" in ds:
    inst = _round(ds.get("InstanceNumber"), 0)
    if isinstance(inst, float):
      keys["InstanceNumber"] = int(inst)
  return keys


def _uih_vframe(path: str, ds: Any, iop: np.ndarray | None
                ) -> tuple[np.ndarray, int, np.ndarray] | None:
  """(first slice position, slice count, orientation) of a UIH VFRAME file
  (one volume per file, its slices tiled like a Siemens mosaic, the slice
  positions in the private MR VFrame Sequence (0065,1051); the orientation
  from the top level, else from that sequence), or None if ``ds`` is not one.
  """
  image_type = [str(v).upper() for v in ds.get("ImageType", [])]
  if "VFRAME" not in image_type:
    return None
  if isinstance(ds, fastread.Header):
    raise fastread.Unsupported("UIH VFRAME")
  items = uih_vframe_items(ds)
  if not items:
    raise DicomError(path, "UIH VFRAME image without its MR VFrame Sequence "
                           "(0065,1051): no slice positions (vendor UIH)")
  first = _floats(items[0].get("ImagePositionPatient", []), 3)
  if iop is None:
    iop = _floats(items[0].get("ImageOrientationPatient", []), 6)
  if first is None or iop is None:
    missing = ("ImageOrientationPatient (0020,0037)" if iop is None else
               "ImagePositionPatient (0020,0032) in the MR VFrame Sequence")
    raise DicomError(path, f"UIH VFRAME image without {missing} (vendor UIH)")
  return first, len(items), iop


def _missing_geometry(path: str, ds: Any, iop, ipp) -> DicomError:
  missing = [name for name, v in (("ImagePositionPatient (0020,0032)", ipp),
                                  ("ImageOrientationPatient (0020,0037)", iop))
             if v is None]
  vendor = str(ds.get("Manufacturer") or "").strip() or "unknown"
  return DicomError(path, f"no {' or '.join(missing)} (vendor {vendor}): "
                          "not a cross-sectional image")


def _classic_entries(path: str, ds: Dataset) -> list[_Entry]:
  iop = _floats(ds.get("ImageOrientationPatient", []), 6)
  ipp = _floats(ds.get("ImagePositionPatient", []), 3)
  if iop is None or ipp is None:
    if isinstance(ds, fastread.Header):
      raise fastread.Unsupported("geometry outside the classic tags")
    if "VFRAME" not in [str(v).upper() for v in ds.get("ImageType", [])]:
      vendor_ipp, vendor_iop = vendor_geometry(ds)
      ipp = _floats(vendor_ipp or [], 3)
      iop = _floats(vendor_iop or [], 6)
  spacing = _floats(ds.get("PixelSpacing", []), 2)
  # UIH VFRAME first: its top-level position (if any) is not the slices'.
  vframe = _uih_vframe(path, ds, iop)
  if vframe is not None:
    ipp, iop = vframe[0], vframe[2]
  if iop is None or ipp is None:
    raise _missing_geometry(path, ds, iop, ipp)
  if spacing is None or np.any(spacing <= 0):
    raise DicomError(path, "no valid PixelSpacing")
  _check_normal(iop, path)
  image_type = [str(v).upper() for v in ds.get("ImageType", [])]
  mosaic = vframe[1] if vframe is not None else _mosaic_images(ds)
  if mosaic is not None and mosaic <= 0:
    raise DicomError(path, "Siemens mosaic without NumberOfImagesInMosaic")
  b = vendor_b_value(ds)
  direction = vendor_diffusion_direction(ds)
  hard = (
      int(ds.Rows), int(ds.Columns),
      tuple(np.round(spacing, 4).tolist()),
      _round(ds.get("EchoNumbers")), _round(ds.get("EchoTime"), 2),
      _round(b, 1),
      tuple(np.round(direction, 3).tolist()) if direction else None,
      _image_type_key(image_type, ds.get("ComplexImageComponent")),
      path if mosaic else None,
  )
  entry = _Entry(path=path, frame=None,
                 series_uid=str(ds.get("SeriesInstanceUID", "")),
                 hard_key=hard, iop=iop, position=ipp, rows=int(ds.Rows),
                 cols=int(ds.Columns), pixel_spacing=tuple(spacing.tolist()),
                 keys=_volume_keys(ds), n_slices=mosaic or 1,
                 localizer="LOCALIZER" in image_type,
                 layout="UIH VFRAME" if vframe is not None else None)
  return [entry]


def _enhanced_entries(path: str, ds: Dataset, frames: int) -> list[_Entry]:
  if "PerFrameFunctionalGroupsSequence" not in ds:
    raise DicomError(path, f"multi-frame object ({frames} frames) without "
                           "per-frame functional groups (no frame geometry)")
  image_type = [str(v).upper() for v in ds.get("ImageType", [])]
  series_uid = str(ds.get("SeriesInstanceUID", ""))
  entries = []
  for f in range(frames):
    orient = functional_group(ds, f, "PlaneOrientationSequence")
    pos = functional_group(ds, f, "PlanePositionSequence")
    meas = functional_group(ds, f, "PixelMeasuresSequence")
    iop = _floats(orient.get("ImageOrientationPatient", []), 6) if orient else None
    ipp = _floats(pos.get("ImagePositionPatient", []), 3) if pos else None
    spacing = _floats(meas.get("PixelSpacing", []), 2) if meas else None
    if iop is None or ipp is None or spacing is None:
      raise DicomError(path, f"frame {f + 1}: missing plane position, "
                             "orientation or pixel spacing")
    content = functional_group(ds, f, "FrameContentSequence") or {}
    keys: dict[str, Any] = {}
    echo = functional_group(ds, f, "MREchoSequence")
    diff = functional_group(ds, f, "MRDiffusionSequence")
    ftype = None
    for key in ("MRImageFrameTypeSequence", "CTImageFrameTypeSequence",
                "PETFrameTypeSequence"):
      ftype = ftype or functional_group(ds, f, key)
    frame_type = list(ftype.get("FrameType", [])) if ftype else image_type
    keys["ImageType"] = "\\".join(str(v).strip().upper() for v in frame_type)
    direction = None
    b = None
    if diff is not None:
      b = diff.get("DiffusionBValue")
      d_item = diff.get("DiffusionGradientDirectionSequence")
      if d_item:
        direction = _floats(d_item[0].get("DiffusionGradientOrientation", []), 3)
    hard = (
        int(ds.Rows), int(ds.Columns), tuple(np.round(spacing, 4).tolist()),
        None, _round(echo.get("EffectiveEchoTime"), 2) if echo else None,
        _round(b, 1),
        tuple(np.round(direction, 3).tolist()) if direction is not None else None,
        _image_type_key(frame_type,
                        ftype.get("ComplexImageComponent") if ftype else None),
        str(content.get("StackID", "")),
    )
    if "TemporalPositionIndex" in content:
      keys["TemporalPositionIndex"] = int(content.TemporalPositionIndex)
    if "FrameAcquisitionNumber" in content:
      keys["AcquisitionNumber"] = int(content.FrameAcquisitionNumber)
    keys["FrameOrder"] = f
    if "FrameAcquisitionDateTime" in content:
      dt = str(content.FrameAcquisitionDateTime)
      seconds = _tm_seconds(dt[8:]) if len(dt) > 8 else None
      if seconds is not None:
        keys["AcquisitionTime"] = seconds
    entries.append(_Entry(
        path=path, frame=f, series_uid=series_uid, hard_key=hard, iop=iop,
        position=ipp, rows=int(ds.Rows), cols=int(ds.Columns),
        pixel_spacing=tuple(spacing.tolist()), keys=keys,
        localizer="LOCALIZER" in [str(v).upper() for v in frame_type]))
  return entries


def _file_record(ds: Dataset | fastread.Header, entries: list[_Entry],
                 salt: str) -> dict[str, Any]:
  """The metadata record of one file (plus its mosaic image count); from a
  fastread header without pydicom (``record_from_header``, which raises
  Unsupported where pydicom must decide)."""
  if isinstance(ds, fastread.Header):
    record = record_from_header(ds, salt)
  else:
    record = record_from_dataset(ds, salt)
  if entries[0].n_slices > 1:
    record["NumberOfImagesInMosaic"] = int(entries[0].n_slices)
  return record


def read_entries(path: str, salt: str, seen: set | None = None
                 ) -> list[_Entry] | Skipped:
  """Header of one file -> its slice entries, or the reason it is skipped.

  Building the metadata record is the costly part of a header (~60 tags), and
  a stack keeps only the record of its first file (per series and hard key),
  so with ``seen`` (the (series UID, hard key) pairs met so far, updated
  here) the record is built only by the first file of each group; the other
  files carry only their grouping and geometry keys (``record`` None).

  Plain classic images are read with ``fastread`` (the ~25 tags scan needs);
  everything else, and every file that needs its record, goes through pydicom.
  """
  try:
    header = fastread.read_header(path)
  except OSError:
    header = None  # the pydicom path reports the reason
  if header is not None:
    try:
      return _entries(path, header, salt, seen)
    except Exception:  # pylint: disable=broad-except
      pass  # anything unusual: pydicom decides (same values, same reasons)
  try:
    return _entries(path, read_dataset(path, stop_before_pixels=True), salt,
                    seen)
  except DicomError as e:
    return Skipped(path, e.reason)
  except Exception as e:  # never let one file stop a scan
    return Skipped(path, f"unreadable header ({type(e).__name__}: {e})")


def _entries(path: str, ds: Dataset | fastread.Header, salt: str,
             seen: set | None) -> list[_Entry] | Skipped:
  fast = isinstance(ds, fastread.Header)
  if is_dicomdir(ds):
    return Skipped(path, "DICOMDIR (media directory), not an image")
  if not sop_class_uid(ds) and not str(ds.get("Modality", "") or "").strip():
    return Skipped(path, "corrupt or empty header (no SOPClassUID/Modality)")
  series = hash_id(ds.get("SeriesInstanceUID"), salt)
  reason = _non_image_reason(ds)
  if reason:
    return Skipped(path, reason, series)
  if "SeriesInstanceUID" not in ds:
    return Skipped(path, "no SeriesInstanceUID")
  frames = int(ds.get("NumberOfFrames", 1) or 1)
  trunc = _truncation_reason(ds, frames)
  if trunc:
    return Skipped(path, trunc, series)
  enhanced = frames > 1 or "PerFrameFunctionalGroupsSequence" in ds
  if fast and enhanced:
    raise fastread.Unsupported("enhanced multi-frame object")
  try:
    if enhanced:
      entries = _enhanced_entries(path, ds, frames)
    else:
      entries = _classic_entries(path, ds)
  except DicomError as e:
    return Skipped(path, e.reason, series)
  keys = {(e.series_uid, e.hard_key) for e in entries}
  if seen is None or not keys <= seen:
    entries[0].record = _file_record(ds, entries, salt)
    if seen is not None:
      seen |= keys
  return entries
