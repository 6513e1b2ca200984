"""Walk a folder tree, read DICOM headers, group series and split them into stacks.

``scan`` reads headers only (``stop_before_pixels``), groups the files by
SeriesInstanceUID and splits each series into 3D stacks the way dcm2niix does:

1. *hard keys* that always split: image size and pixel spacing, echo
   (EchoNumbers / EchoTime), diffusion b-value and gradient direction (the
   standard tags or the vendor's: GE (0043,1039) / (0019,10BB-BD), Philips
   (2001,1003) / (2005,10B0-B2), Siemens (0019,100C/100E) or CSA, UIH
   (0065,1009/1037), Canon's ImageComments; ``metadata.vendor_b_value``),
   image type (ORIGINAL vs DERIVED, magnitude / phase / real / imaginary),
   enhanced Stack ID, and one stack per Siemens mosaic or UIH VFRAME file
   (each is a volume);
2. *orientation*: ImageOrientationPatient clustered with a 1e-3 tolerance;
3. *volumes*, only where slice positions repeat inside a stack: split by the
   first of ``VOLUME_KEYS`` (TemporalPositionIdentifier / Index,
   AcquisitionNumber, TriggerTime, StackID, ImageType, AcquisitionTime),
   then pairs of them, that cuts it into whole volumes, else by InstanceNumber
   order (frame order for enhanced objects) like dcm2niix
   (``_split_volumes``); a CT series whose slices carry different
   AcquisitionNumbers but distinct positions stays one stack. Volumes of one
   series on one grid are numbered in the record (``_number_volumes``:
   VolumeIndex, NumberOfVolumes, VolumeSplitBy, VolumeTimeS,
   VolumeTimeAfterBolusS, SeriesBValues), so labels can tell a b0 from a
   b1000 volume or a DCE phase before the injection from one after;
4. *gaps*: a stack is cut where one step between consecutive positions is
   more than 2.5x the spacing next to it (files missing from an archive,
   separate slabs; ``geometry.classify_spacing``; a change of spacing, as in
   head CTs at two or three spacings, is not a gap), into
   stacks keyed ``part=k``; a part with fewer than ``min_slices`` slices is
   skipped as a fragment. A gap of one missing slice is not cut:
   ``load_volume`` fills it by interpolation.

Rejected, each with a reason in ``ScanResult.skipped``: non-DICOM files,
DICOMDIRs, non-image objects (SR, RT structure sets/plans/doses, presentation
states, SEG, key objects, waveforms, ...), headers without geometry (the
reason names the missing tag and the vendor),
localizers (ImageType LOCALIZER, 3-plane localizers: several orientations in a
series with fewer than ``min_slices`` slices each), stacks with fewer than
``min_slices`` slices, truncated uncompressed pixel data, and unreadable
files. One bad file never stops a scan.

Speed: plain classic images are read with ``fastread`` (only the ~35
grouping / geometry tags and the vendor diffusion values, no pydicom
objects), and the full metadata record
is built (with pydicom) only for the first file of each (series, hard key)
group, which is the only record a stack keeps.

Order is deterministic: files are walked in sorted order, stacks are sorted by
(series hash, stack key) and the files of a stack by position along the slice
normal, oriented in the canonical slice direction (AX: superior first).
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import math
import os
import stat
import warnings
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np

if TYPE_CHECKING:  # pydicom is imported only where a file needs it (slow import)
  from pydicom.dataset import Dataset

from radnet_jax.dicom import fastread, geometry, isolation
from radnet_jax.dicom.errors import DicomError
from radnet_jax.dicom.metadata import (functional_group, record_from_dataset,
                                       record_from_header,
                                       sop_class_uid, uih_vframe_items,
                                       vendor_geometry,
                                       vendor_b_value,
                                       vendor_diffusion_direction)
from radnet_jax.dicom.reader import is_dicomdir, read_dataset
from radnet_jax.dicom.types import ScanResult, Skipped, Stack
from radnet_jax import parallel
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
# resort (``_split_volumes``).
VOLUME_KEYS = ("TemporalPositionIdentifier", "TemporalPositionIndex",
               "AcquisitionNumber", "TriggerTime", "StackID", "ImageType",
               "AcquisitionTime")
_IOP_TOL = 1e-3
_DUP_TOL_MM = 1e-2


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


def _record_of(path: str, salt: str) -> dict[str, Any] | None:
  """Re-reads one file's record (when a worker dropped the first one)."""
  res = read_entries(path, salt)
  return None if isinstance(res, Skipped) else res[0].record


# A header read (one file) that takes longer is skipped as stalled.
READ_TIMEOUT_S = 120.0
_SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
            (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(path: str) -> str | None:
  """Why ``path`` must not be opened (None for a regular file). ``stat``
  only: opening a FIFO blocks forever, reading a device never ends."""
  try:
    mode = os.stat(path).st_mode
  except OSError as e:
    return (f"broken symbolic link ({e.strerror})" if os.path.islink(path)
            else f"cannot stat ({e.strerror})")
  if stat.S_ISREG(mode):
    return None
  kind = next((name for test, name in _SPECIAL if test(mode)), "not a regular file")
  return f"{kind}, not a regular file: skipped without opening it"


def walk_files(root: str) -> Iterator[str | Skipped]:
  """Regular files under ``root`` (or ``root`` itself) in sorted order, and a
  ``Skipped`` for every other entry (FIFOs, sockets, devices, broken links)."""
  if not os.path.isdir(root):
    reason = _not_regular(root)
    yield root if reason is None else Skipped(root, reason)
    return
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      reason = _not_regular(path)
      yield path if reason is None else Skipped(path, reason)


def iter_files(root: str) -> Iterator[str]:
  """All regular files under ``root`` (or ``root`` itself), in sorted order."""
  for item in walk_files(root):
    if isinstance(item, str):
      yield item


def _read_limited(path: str, salt: str, seen: set | None) -> list[_Entry] | Skipped:
  """``read_entries`` with a time limit (``READ_TIMEOUT_S``) on the read."""
  try:
    with isolation.read_deadline(READ_TIMEOUT_S, path):
      return read_entries(path, salt, seen)
  except isolation.ReadStalled as e:
    return Skipped(path, str(e).replace(f"reading {path} ", "reading the header ", 1))


# ---------------------------------------------------------------------------
# Splitting a series into stacks.
# ---------------------------------------------------------------------------


def _cluster_iop(entries: list[_Entry]) -> list[list[_Entry]]:
  clusters: list[tuple[np.ndarray, list[_Entry]]] = []
  for e in entries:
    for rep, members in clusters:
      if np.max(np.abs(rep - e.iop)) < _IOP_TOL:
        members.append(e)
        break
    else:
      clusters.append((e.iop, [e]))
  return [members for _, members in clusters]


def _position_ids(entries: list[_Entry]) -> list[int]:
  """Slice-position index of each entry (positions within ``_DUP_TOL_MM``
  along the normal share one)."""
  n = geometry.slice_normal(entries[0].iop)
  s = np.array([float(e.position @ n) for e in entries])
  order = np.argsort(s, kind="stable")
  ids = [0] * len(entries)
  current, last = -1, None
  for i in order:
    if last is None or s[i] - last >= _DUP_TOL_MM:
      current += 1
    last = s[i]
    ids[i] = current
  return ids


def _sort_value(v: Any) -> tuple:
  return (0, v, "") if isinstance(v, (int, float)) else (1, 0.0, str(v))


def _groups_by(entries, values, pos_ids, k):
  """{value: entries} if the values cut ``entries`` into exactly ``k``
  volumes with every slice position at most once in each, else None."""
  groups: dict[Any, list[int]] = {}
  for i, v in enumerate(values):
    groups.setdefault(v, []).append(i)
  if len(groups) != k:
    return None
  for idx in groups.values():
    if len({pos_ids[i] for i in idx}) != len(idx):
      return None
  return groups


def _split_volumes(entries: list[_Entry]
                   ) -> list[tuple[str, list[_Entry], dict[str, Any]]]:
  """Splits one orientation cluster into 3D volumes when positions repeat.

  Tries, in ``VOLUME_KEYS`` order, each key alone, then each pair of keys: a
  key is taken when it cuts the files into exactly as many volumes as the
  most repeated position has files, with no position twice in a volume (so
  AcquisitionTime, which differs per slice of a 2D acquisition, never
  passes for a volume key). The last resort is InstanceNumber, as dcm2niix
  orders a series (the frame order for the frames of an enhanced object):
  the i-th file of every position (in that order) belongs to volume i when
  every position has the same count, else consecutive blocks of one file per
  position. When nothing orders them, the cluster stays whole and the record
  says which tags were tried (``load_volume`` then keeps identical copies or
  names the mix with that list).

  Returns:
    (split key text, entries, record fields) per volume, in volume order.
  """
  pos_ids = _position_ids(entries)
  counts: dict[int, int] = {}
  for p in pos_ids:
    counts[p] = counts.get(p, 0) + 1
  k = max(counts.values())
  if k < 2:
    return [("", entries, {})]
  present = [key for key in VOLUME_KEYS
             if all(key in e.keys for e in entries)]
  candidates = [(key,) for key in present] + [
      (a, b) for i, a in enumerate(present) for b in present[i + 1:]]
  for keys in candidates:
    values = [tuple(e.keys[key] for key in keys) for e in entries]
    groups = _groups_by(entries, values, pos_ids, k)
    if groups is None:
      continue
    by = "+".join(keys)
    out = []
    for v in sorted(groups, key=lambda t: tuple(_sort_value(x) for x in t)):
      fields = {"VolumeSplitBy": by}
      for key, value in zip(keys, v):
        fields[key] = value
      text = "|".join(f"{key}={value}" for key, value in zip(keys, v))
      out.append((text, [entries[i] for i in groups[v]], fields))
    return out
  # Classic files: InstanceNumber; frames of enhanced objects: frame order.
  order_key = next((key for key in ("InstanceNumber", "FrameOrder")
                    if all(key in e.keys for e in entries)), "InstanceNumber")
  order_name = {"InstanceNumber": "InstanceNumber order",
                "FrameOrder": "frame order"}[order_key]
  inst = [e.keys.get(order_key) for e in entries]
  if all(i is not None for i in inst) and len(set(inst)) == len(inst):
    volume = [0] * len(entries)
    if len(set(counts.values())) == 1:
      by_pos: dict[int, list[int]] = {}
      for i in sorted(range(len(entries)), key=lambda i: inst[i]):
        by_pos.setdefault(pos_ids[i], []).append(i)
      for idx in by_pos.values():
        for rank, i in enumerate(idx):
          volume[i] = rank
      ok = True
    else:
      n_pos = len(counts)
      ordered = sorted(range(len(entries)), key=lambda i: inst[i])
      for rank, i in enumerate(ordered):
        volume[i] = rank // n_pos
      ok = _groups_by(entries, volume, pos_ids, max(volume) + 1) is not None
    if ok:
      groups: dict[int, list[_Entry]] = {}
      for v, e in zip(volume, entries):
        groups.setdefault(v, []).append(e)
      return [(f"{order_name} #{v}", groups[v], {"VolumeSplitBy": order_name})
              for v in sorted(groups)]
  tried = ", ".join(VOLUME_KEYS) + f", {order_name}"
  missing = [key for key in VOLUME_KEYS if key not in present]
  why = (f"slice positions repeat up to {k} times and no tag orders them "
         f"(tried b-value, gradient direction, echo, image type, {tried}")
  if missing:
    why += f"; absent or partial: {', '.join(missing)}"
  return [("", entries, {"VolumeSplitTried": why + ")"})]


def _stack_record(entries: list[_Entry], base: dict[str, Any], key: str
                  ) -> dict[str, Any]:
  """The stack's record: first file's record plus header-level geometry."""
  rec = dict(base)
  first = entries[0]
  n = geometry.slice_normal(first.iop)
  hard = first.hard_key
  # Multi-echo / multi-b enhanced objects: the record came from frame 1, so
  # put this stack's own echo time and b-value in (keeping full precision
  # when the record already agrees with the rounded split key).
  for field, value, tol in (("EchoTime", hard[4], 0.01),
                            ("DiffusionBValue", hard[5], 0.1)):
    if isinstance(value, float) and (
        not isinstance(rec.get(field), (int, float)) or
        abs(rec[field] - value) > tol):
      rec[field] = value
  if isinstance(hard[6], tuple):   # this stack's own gradient direction
    old = rec.get("DiffusionGradientOrientation")
    if not (isinstance(old, list) and len(old) == 3 and
            max(abs(a - b) for a, b in zip(old, hard[6])) <= 1e-3):
      rec["DiffusionGradientOrientation"] = [float(v) for v in hard[6]]
  # Per-file keys shared by the whole stack are its own (the record came
  # from one file or frame of the group): time point, stack, image type.
  for name in VOLUME_KEYS:
    if name == "AcquisitionTime":    # a time of day is not kept
      continue
    values = {e.keys.get(name) for e in entries}
    if len(values) == 1 and None not in values:
      (value,) = values
      rec[name] = [v for v in value.split("\\") if v] if name == "ImageType" else value
  rec["ImageOrientationPatient"] = [float(v) for v in first.iop]
  rec["PixelSpacing"] = [float(v) for v in first.pixel_spacing]
  if first.n_slices > 1:  # mosaic: slices inside one file
    count = first.n_slices
    spacing = float(rec.get("SpacingBetweenSlices") or rec.get("SliceThickness") or 1.0)
  else:
    count = len(entries)
    s = np.sort([e.position @ n for e in entries])
    diffs = np.diff(s)
    if len(diffs):
      spacing = float(np.median(diffs))
    else:
      spacing = float(rec.get("SpacingBetweenSlices") or rec.get("SliceThickness") or 1.0)
  dr, dc = first.pixel_spacing
  r, c = first.iop[:3], first.iop[3:]
  affine = np.eye(4)
  affine[:3, 0], affine[:3, 1], affine[:3, 2] = n * spacing, c * dr, r * dc
  shape = (count, first.rows, first.cols)
  transpose, _ = geometry.canonical_transform(
      np.stack([n, c, r]), geometry.plane_of(n))
  vox = np.array([spacing, dr, dc])
  if transpose:
    shape, vox = (shape[0], shape[2], shape[1]), vox[[0, 2, 1]]
  rec["NumberOfSlices"] = int(count)
  rec["SliceSpacing"] = float(spacing)
  rec["ExtentMM"] = geometry.extent_mm(vox, shape)
  rec["ExtentSI"] = geometry.extent_si(affine, (count, first.rows, first.cols))
  rec["StackKey"] = key
  return rec


def _series_stacks(entries: list[_Entry], records: dict[tuple, dict],
                   salt: str, min_slices: int
                   ) -> tuple[list[Stack], list[Skipped]]:
  series_uid = entries[0].series_uid
  series = hash_id(series_uid, salt)
  stacks: list[Stack] = []
  skipped: list[Skipped] = []

  def skip(group: list[_Entry], reason: str) -> None:
    for path in sorted({e.path for e in group}):
      skipped.append(Skipped(path, reason, series))

  localizers = [e for e in entries if e.localizer]
  if localizers:
    skip(localizers, "localizer/scout (ImageType LOCALIZER)")
  entries = [e for e in entries if not e.localizer]
  if not entries:
    return stacks, skipped

  hard_groups: dict[tuple, list[_Entry]] = {}
  for e in entries:
    hard_groups.setdefault(e.hard_key, []).append(e)
  all_iop = _cluster_iop(entries)
  mixed = len(all_iop) > 1
  for hard in sorted(hard_groups, key=repr):
    for cluster in _cluster_iop(hard_groups[hard]):
      for rank, (tkey, group, fields) in enumerate(_split_volumes(cluster)):
        count = group[0].n_slices if group[0].n_slices > 1 else len(group)
        if count < min_slices:
          if mixed:
            skip(group, f"mixed orientations in series ({len(all_iop)} "
                        f"orientations; this one has {count} slice(s)): "
                        "localizer/scout")
          else:
            skip(group, _size_outlier(hard, hard_groups, min_slices) or
                 f"too few slices ({count} < {min_slices})")
          continue
        n = geometry.stack_direction(group[0].iop)
        group.sort(key=lambda e: (float(e.position @ n), e.path, e.frame or 0))
        parts = _split_gaps(group, n)
        for part_no, (part, gap) in enumerate(parts):
          if len(parts) > 1 and len(part) < min_slices:
            skip(part, f"fragment of {len(part)} slice(s) cut off by a gap "
                       f"of {gap:.1f} mm in the stack (fewer than "
                       f"{min_slices}; missing files?)")
            continue
          iop_txt = ",".join(f"{v:.3f}" for v in part[0].iop)
          split = f"{hard!r}|{iop_txt}|{tkey}"
          if len(parts) > 1:
            split += f"|part={part_no}"
          stacks.append(_make_stack(part, records[hard],
                                    hash_id(f"{series_uid}|{split}", salt),
                                    fields, rank))
  _number_volumes(stacks, entries)
  return stacks, skipped


def _size_outlier(hard: tuple, hard_groups: dict[tuple, list[_Entry]],
                  min_slices: int) -> str | None:
  """The reason for a group too small to be a stack whose only difference
  from a full stack of its series is the image size (one file with a wrong
  Rows or Columns), else None."""
  for other, group in hard_groups.items():
    if other != hard and other[2:] == hard[2:] and len(group) >= min_slices:
      return (f"image size {hard[0]}x{hard[1]} (Rows x Columns) differs from the "
              f"{other[0]}x{other[1]} of the other {len(group)} files of the series "
              "(wrong Rows/Columns in this file?)")
  return None


def _volume_order(stack: Stack) -> tuple:
  """InstanceNumber order (dcm2niix's order of the volumes of a 4D series),
  then AcquisitionTime, then the order of the split key's values."""
  rec = stack.record
  t = rec.get("_FirstTime")
  return (rec.get("_FirstInstance", math.inf), math.inf if t is None else t,
          rec.get("_SplitRank", 0), rec.get("StackKey", ""))


def _number_volumes(stacks: list[Stack], entries: list[_Entry]) -> None:
  """Series-level volume fields of each stack's record.

  Stacks of one series on the same grid (orientation, matrix, slice count)
  are the volumes of one 4D acquisition (b-values / directions split by the
  hard keys, time points by ``_split_volumes``, one mosaic per file):
  ``VolumeIndex`` (0-based, in acquisition order: ``_volume_order``),
  ``NumberOfVolumes``, ``VolumeTimeS`` (start of this volume after the
  first one, s, from AcquisitionTime), ``VolumeTimeAfterBolusS`` (after
  ContrastBolusStartTime, s; negative = before the injection) and
  ``SeriesBValues`` (the b-values of a series with some b > 0; a file
  without one there counts as b=0, as on Canon and in dcm2niix).
  """
  b_values = {e.hard_key[5] for e in entries}
  if any(isinstance(b, float) and b > 0 for b in b_values):
    series_b = sorted({b if isinstance(b, float) else 0.0 for b in b_values})
  else:
    series_b = None
  grids: dict[tuple, list[Stack]] = {}
  for st in stacks:
    rec = st.record
    sig = (tuple(np.round(rec["ImageOrientationPatient"], 3).tolist()),
           rec.get("Rows"), rec.get("Columns"), rec["NumberOfSlices"])
    grids.setdefault(sig, []).append(st)
    if series_b is not None:
      rec["SeriesBValues"] = series_b
      if not isinstance(rec.get("DiffusionBValue"), (int, float)):
        rec["DiffusionBValue"] = 0.0
        rec["DiffusionBValueInferred"] = True
  for group in grids.values():
    group.sort(key=_volume_order)
    hard_by = _hard_split_names([st.record.get("_Hard") for st in group])
    times = [st.record.get("_FirstTime") for st in group]
    t0 = min((t for t in times if t is not None), default=None)
    for i, st in enumerate(group):
      rec = st.record
      if len(group) > 1:
        rec["VolumeIndex"], rec["NumberOfVolumes"] = i, len(group)
        if hard_by:
          by = rec.get("VolumeSplitBy")
          rec["VolumeSplitBy"] = "+".join(hard_by + ([by] if by else []))
        if t0 is not None and rec.get("_FirstTime") is not None:
          rec["VolumeTimeS"] = round(rec["_FirstTime"] - t0, 3)
      bolus = _tm_seconds(rec.get("ContrastBolusStartTime"))
      if bolus is not None and rec.get("_FirstTime") is not None:
        rec["VolumeTimeAfterBolusS"] = round(rec["_FirstTime"] - bolus, 3)
  for st in stacks:
    st.record.pop("_FirstInstance", None)
    st.record.pop("_FirstTime", None)
    st.record.pop("_Hard", None)
    st.record.pop("_SplitRank", None)


# What each position of the hard key means, for ``VolumeSplitBy``.
_HARD_NAMES = (None, None, None, "EchoNumbers", "EchoTime", "DiffusionBValue",
               "DiffusionGradientOrientation", "ImageType", "file")


def _hard_split_names(keys: list) -> list[str]:
  """Names of the hard-key parts that differ between the volumes of a grid."""
  keys = [k for k in keys if k is not None]
  if len(keys) < 2:
    return []
  return [name for i, name in enumerate(_HARD_NAMES)
          if name and len({k[i] for k in keys}) > 1]


def _split_gaps(group: list[_Entry], n: np.ndarray
                ) -> list[tuple[list[_Entry], float]]:
  """Cuts a position-sorted stack where ``geometry.classify_spacing`` finds
  a cut: a single step wider than ``GAP_FILL_FACTOR`` times the spacing next
  to it (missing files, separate slabs); each part with the widest gap next
  to it. Narrower gaps (one missing slice) and changes of spacing (variable
  spacing) are left to ``load_volume``, which interpolates them."""
  if len(group) < 3 or group[0].n_slices > 1:
    return [(group, 0.0)]
  s = np.array([float(e.position @ n) for e in group])
  diffs = np.diff(s)
  cuts = [i + 1 for i in geometry.classify_spacing(diffs).cuts]
  if not cuts:
    return [(group, 0.0)]
  bounds = [0] + cuts + [len(group)]
  out = []
  for a, b in zip(bounds[:-1], bounds[1:]):
    near = [diffs[a - 1]] if a else []
    near += [diffs[b - 1]] if b < len(group) else []
    out.append((group[a:b], float(max(near))))
  return out


def _make_stack(group: list[_Entry], record: dict[str, Any], key: str,
                fields: dict[str, Any] | None = None, rank: int = 0) -> Stack:
  files: list[str] = []
  index: dict[str, int] = {}
  for e in group:
    if e.path not in index:
      index[e.path] = len(files)
      files.append(e.path)
  frames = None
  if group[0].frame is not None:
    frames = tuple((index[e.path], int(e.frame)) for e in group)
  rec = _stack_record(group, record, key)
  for field, value in (fields or {}).items():
    if field == "ImageType":
      rec[field] = [v for v in str(value).split("\\") if v]
    elif field != "AcquisitionTime":   # a time of day is not kept
      rec[field] = value
  if group[0].layout:
    rec["MosaicLayout"] = group[0].layout
  # Series-level numbering (``_number_volumes``) reads these, then drops them.
  inst = [e.keys.get("InstanceNumber", e.keys.get("FrameOrder"))
          for e in group]
  inst = [i for i in inst if i is not None]
  times = [e.keys["AcquisitionTime"] for e in group if "AcquisitionTime" in e.keys]
  rec["_FirstInstance"] = min(inst) if inst else math.inf
  rec["_FirstTime"] = min(times) if times else None
  rec["_Hard"] = group[0].hard_key
  rec["_SplitRank"] = rank
  return Stack(key=key, files=tuple(files), record=rec, frames=frames)


def group_entries(results: Iterable[list[_Entry] | Skipped], salt: str,
                  min_slices: int = 3) -> ScanResult:
  """Groups per-file results (from ``read_entries``) into stacks."""
  by_series: dict[str, list[_Entry]] = {}
  # One record per (series, hard key): the first file in walk order. Records
  # of the other files are dropped at once (bounded memory on big archives).
  records: dict[str, dict[tuple, dict]] = {}
  skipped: list[Skipped] = []
  for res in results:
    if isinstance(res, Skipped):
      skipped.append(res)
      continue
    record = next((e.record for e in res if e.record is not None), None)
    for e in res:
      by_series.setdefault(e.series_uid, []).append(e)
      e.record = None
      recs = records.setdefault(e.series_uid, {})
      if e.hard_key not in recs:
        if record is None:
          # The reader skipped the record of a group it had seen, but this is
          # the group's first file here (parallel readers): read it again.
          record = _record_of(e.path, salt)
        if record is not None:
          recs[e.hard_key] = record
  stacks: list[Stack] = []
  for uid in by_series:
    s, k = _series_stacks(by_series[uid], records[uid], salt, min_slices)
    stacks.extend(s)
    skipped.extend(k)
  stacks.sort(key=lambda st: (st.record.get("SeriesHash", ""), st.key))
  skipped.sort(key=lambda k: (k.path, k.reason))
  return ScanResult(stacks=stacks, skipped=skipped)


_WORKER_SEEN: set = set()


def _init_worker(parent: int | None = None) -> None:
  isolation.die_with_parent(parent)
  _WORKER_SEEN.clear()


def _read_entries_star(args: tuple[str, str]) -> list[_Entry] | Skipped:
  # Each worker reads its files in walk order (chunks are handed out in
  # order), so its first file of a group is the earliest one it holds.
  return _read_limited(*args, seen=_WORKER_SEEN)


def scan(root: str, *, salt: str, workers: int = 1, progress: bool = False,
         min_slices: int = 3) -> ScanResult:
  """Finds the 3D stacks under ``root`` (a folder or one file).

  Args:
    root: folder tree (or single file) with DICOM files, any names, ``.gz`` ok.
    salt: corpus salt for the PHI-free hashes.
    workers: processes reading headers (1 = in this process).
    progress: show a tqdm progress bar over files.
    min_slices: stacks with fewer slices are skipped (localizers, single
      images); a Siemens mosaic counts its images.

  Returns:
    ScanResult(stacks, skipped), both in a deterministic order.
  """
  if not os.path.exists(root):
    raise DicomError(root, "no such file or directory")
  paths, special = [], []
  for item in walk_files(root):
    (paths if isinstance(item, str) else special).append(item)
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=len(paths), desc="scan", unit="file")

  def tick(items):
    for item in items:
      if bar is not None:
        bar.update(1)
      yield item

  try:
    if workers > 1 and len(paths) > 1:
      with cf.ProcessPoolExecutor(max_workers=workers,
                                  mp_context=parallel.context(),
                                  initializer=_init_worker,
                                  initargs=(os.getpid(),)) as pool:
        chunk = max(1, min(256, len(paths) // (workers * 8) or 1))
        return group_entries(itertools.chain(special, tick(
            pool.map(_read_entries_star, [(p, salt) for p in paths],
                     chunksize=chunk))), salt, min_slices)
    seen: set = set()
    return group_entries(itertools.chain(special, tick(
        _read_limited(p, salt, seen) for p in paths)), salt, min_slices)
  finally:
    if bar is not None:
      bar.close()
