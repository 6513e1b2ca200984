"""PHI-free metadata records: a DICOM header -> plain dict of keyword values.

The label rules (``radnet_jax.labels``) read exactly these records, so they
run the same on a DICOM header, a CSV row or a public metadata index. Keys are
DICOM keywords; values are python natives (``str``, ``int``, ``float``,
``list[float]``, ``list[str]`` for multi-valued strings such as ImageType).
Absent tags are absent keys, never ``None``.

Identifiers never leave here raw: PatientID, StudyInstanceUID and
SeriesInstanceUID become ``PatientHash``/``StudyHash``/``SeriesHash``
(``radnet_jax.privacy.hash_id`` with the corpus salt). Names, dates, accession
numbers, institutions and physicians are not copied at all, and the free
text that is (``FREE_TEXT_KEYS``: descriptions, protocol name, ...) is
scrubbed of them (``privacy.scrub_text``: every name component, ID, accession
number and date of the same header, PN-formatted strings, long digit runs).
The raw text of a scrubbed field stays in memory under ``UNSCRUBBED_KEY``
for the label rules and is never stored (``shards.convert.safe_metadata``
drops it).

Anonymised headers: ``SOPClassUID`` falls back to the file meta's
MediaStorageSOPClassUID when blank, missing or not a UID (``sop_class_uid``);
UIDs replaced by other strings are hashed like real ones (they still group
the files); an empty or missing PatientID gives ``PatientHash`` '' (the
shard split then groups by StudyHash).

Enhanced multi-frame objects (Enhanced CT/MR/PET) keep most acquisition
parameters in the shared / per-frame functional groups; ``record_from_dataset``
pulls them up to the classic keywords (EchoTime from MREchoSequence,
ImageOrientationPatient from PlaneOrientationSequence, ...), so that the
rules need not know the object type.

Derived geometry keys (filled by ``scan`` from headers, refined by
``load_volume`` from the assembled volume): ``NumberOfSlices`` (int),
``SliceSpacing`` (mm, measured from slice positions), ``ExtentMM``
([D, H, W] field of view in mm = voxels x spacing), ``ExtentSI`` (extent of the
volume along the patient superior-inferior axis, mm), ``StackKey``; and,
when ``load_volume`` corrected the geometry: ``SliceSpacings`` (the distinct
spacings of a variable-spacing stack, mm, resampled equidistant at the
smallest), ``ResampledSliceSpacing``, ``MissingSlicesInterpolated``,
``GantryTiltCorrected`` (degrees).

Size (~700 lines): the record is built two ways, from a pydicom dataset
(``record_from_dataset``) and from a ``fastread`` header
(``record_from_header``), and the two must give equal records on every file.
They share the field tables and the vendor diffusion-tag readers here, side
by side, so a change to one is made to the other.
"""
from __future__ import annotations

import math
import re
import collections.abc
import struct
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pydicom is imported where a value needs it (its import is slow)
  from pydicom.dataset import Dataset

from radnet_jax.dicom import fastread
from radnet_jax.privacy import hash_id, identifier_tokens, scrub_text

# Plain (non-identifying) tags copied when present; value types follow the VR.
PLAIN_KEYS = (
    "Modality", "SOPClassUID", "Manufacturer", "ManufacturerModelName",
    "MagneticFieldStrength", "BodyPartExamined", "StudyDescription",
    "SeriesDescription", "ProtocolName", "ImageType", "ScanningSequence",
    "SequenceVariant", "ScanOptions", "SequenceName", "MRAcquisitionType",
    "EchoTime", "RepetitionTime", "InversionTime", "FlipAngle",
    "EchoTrainLength", "EchoNumbers", "DiffusionBValue",
    "DiffusionGradientOrientation", "ContrastBolusAgent",
    "ContrastBolusRoute", "ContrastBolusVolume", "ContrastBolusStartTime",
    "ContrastBolusIngredient", "ImageOrientationPatient", "PixelSpacing",
    "SliceThickness", "SpacingBetweenSlices", "KVP", "ConvolutionKernel",
    "Rows", "Columns", "PatientPosition", "PatientSex",
    "PhotometricInterpretation", "Units", "SeriesNumber", "AcquisitionNumber",
    "NumberOfFrames", "BitsStored", "PixelRepresentation",
    "AcquisitionContrast", "PulseSequenceName", "EchoPulseSequence",
    "InversionRecovery", "ComplexImageComponent", "ReconstructionDiameter",
    "ImagedNucleus", "NumberOfTemporalPositions", "TemporalPositionIdentifier",
    "SeriesType", "DecayCorrection", "CorrectedImage", "ContrastBolusAgentPhase",
    "DiffusionDirectionality",
)
# Multi-valued string tags that are always lists (even with one value).
LIST_STR_KEYS = frozenset({
    "ImageType", "ScanningSequence", "SequenceVariant", "ScanOptions",
    "ConvolutionKernel", "SeriesType", "CorrectedImage",
})
# Numeric tags that are always lists of floats.
LIST_FLOAT_KEYS = frozenset({
    "ImageOrientationPatient", "PixelSpacing", "DiffusionGradientOrientation",
})

# Free text kept for the label rules; scrubbed of the header's identifying
# values before it is stored (the raw text stays in memory, UNSCRUBBED_KEY).
FREE_TEXT_KEYS = (
    "StudyDescription", "SeriesDescription", "ProtocolName", "SequenceName",
    "PulseSequenceName", "BodyPartExamined", "ContrastBolusAgent",
    "ContrastBolusRoute", "ContrastBolusIngredient", "Radiopharmaceutical",
)
UNSCRUBBED_KEY = "_unscrubbed"
# Identifying values whose content is removed from the free text (besides
# every person name, date and date-time of the header).
_IDENTIFYING_KEYS = (
    "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "AccessionNumber",
    "StudyID", "RequestedProcedureID", "PerformedProcedureStepID",
    "MedicalRecordLocator", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber",
    "PatientAddress", "PatientTelephoneNumbers", "MilitaryRank",
    "CurrentPatientLocation",
)

_SIEMENS_MR = "SIEMENS MR HEADER"
_GE_PARM = "GEMS_PARM_01"
_GE_ACQU = "GEMS_ACQU_01"
_PHILIPS_DD1 = "Philips Imaging DD 001"
_PHILIPS_MR1 = "Philips MR Imaging DD 001"


_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_uid(value: Any) -> bool:
  """True for a syntactically valid DICOM UID (digits and dots, <= 64).

  Anonymisers sometimes replace UIDs by other strings ("ANON-0001"); those
  still group files (they are kept, hashed, as identifiers) but cannot be
  referenced from a DICOM object such as a SEG."""
  text = str(value or "").strip().strip("\0").strip()
  return bool(text) and len(text) <= 64 and bool(_UID.match(text))


def sop_class_uid(ds: Any) -> str:
  """The object's SOP Class UID: the dataset's SOPClassUID, else the file
  meta's MediaStorageSOPClassUID (anonymisers blank or drop the dataset's;
  dcm2niix and pydicom's own readers fall back the same way); '' when
  neither holds a UID. Works on pydicom datasets and ``fastread`` headers."""
  sources = ((ds, "SOPClassUID"),
             (getattr(ds, "file_meta", None), "MediaStorageSOPClassUID"))
  for src, key in sources:
    if src is None:
      continue
    try:
      value = src.get(key)
    except Exception:  # a malformed value: try the next source
      continue
    if is_uid(value):
      return str(value).strip().strip("\0").strip()
  return ""


def _native(value: Any) -> Any:
  """pydicom value -> python native (str/int/float/list); None when empty."""
  if value is None:
    return None
  if isinstance(value, (bytes, bytearray)):
    return None
  if isinstance(value, collections.abc.Sequence) and not isinstance(value, str):
    # list, tuple, pydicom's MultiValue
    items = [_native(v) for v in value]
    items = [v for v in items if v is not None]
    return items or None
  # pydicom's IS / DSfloat are int / float subclasses; PersonName is neither
  # a str nor a number, so names are never copied (None below).
  if isinstance(value, float):
    return float(value)
  if isinstance(value, int):
    return int(value)
  if isinstance(value, str):
    text = value.strip().strip("\0").strip()
    return text or None
  return None


def _coerce(key: str, value: Any) -> Any:
  """Applies the record's type rules for ``key`` to a native value."""
  value = _native(value)
  if value is None:
    return None
  if key in LIST_STR_KEYS:
    items = value if isinstance(value, list) else [value]
    if len(items) == 1 and isinstance(items[0], str) and "\\" in items[0]:
      items = items[0].split("\\")
    return [str(v).strip().upper() for v in items]
  if key in LIST_FLOAT_KEYS:
    items = value if isinstance(value, list) else [value]
    try:
      return [float(v) for v in items]
    except (TypeError, ValueError):
      return None
  if isinstance(value, list):
    # Multi-valued where one value is expected (e.g. EchoNumbers "1\2").
    value = value[0]
  return value


def _get(ds: Dataset, keyword: str) -> Any:
  try:
    return ds[keyword] if keyword in ds else None
  except Exception:  # a malformed value must not kill the whole record
    return None


def _first_item(ds: Dataset | None, keyword: str) -> Dataset | None:
  if ds is None:
    return None
  try:
    seq = ds.get(keyword)
  except Exception:
    return None
  if (seq is None or isinstance(seq, (str, bytes)) or
      not isinstance(seq, collections.abc.Sequence) or not seq):
    return None
  return seq[0]


def functional_group(ds: Dataset, frame: int, keyword: str) -> Dataset | None:
  """First item of functional-group ``keyword`` for ``frame`` (0-based).

  Looks in the per-frame functional groups first, then the shared ones; None
  when neither holds the group.
  """
  per_frame = ds.get("PerFrameFunctionalGroupsSequence")
  if per_frame is not None and frame < len(per_frame):
    item = _first_item(per_frame[frame], keyword)
    if item is not None:
      return item
  return _first_item(_first_item(ds, "SharedFunctionalGroupsSequence"), keyword)


def uih_vframe_items(ds: Dataset) -> list[Dataset]:
  """Items of UIH's MR VFrame Sequence (0065,1051), one per slice; [] if
  absent. An implicit-VR file whose reader did not know the private tag
  gives it as raw bytes (VR UN): parsed here as the sequence it is."""
  elem = ds.get((0x0065, 0x1051))
  if elem is None:
    return []
  import pydicom.values  # pylint: disable=import-outside-toplevel
  from pydicom.dataset import Dataset  # pylint: disable=import-outside-toplevel,redefined-outer-name
  value = elem.value
  if isinstance(value, bytes):
    try:
      value = pydicom.values.convert_SQ(value, True, True)
    except Exception:  # pylint: disable=broad-except
      return []
  try:
    return [item for item in value if isinstance(item, Dataset)]
  except TypeError:
    return []


_PHILIPS_MR5 = "Philips MR Imaging DD 005"


def vendor_geometry(ds: Dataset) -> tuple[Any, Any]:
  """(ImagePositionPatient, ImageOrientationPatient) of a classic file,
  each from the top level or, where missing, from Philips' private copy of
  the image header (2005,140F) (anonymisers and PACS exports often drop the
  public position and keep that one, which dcm2niix reads); (None, None)
  parts when neither has it. pydicom datasets only."""
  ipp = ds.get("ImagePositionPatient")
  iop = ds.get("ImageOrientationPatient")
  if ipp is not None and iop is not None:
    return ipp, iop
  try:
    seq = _private(ds, 0x2005, _PHILIPS_MR5, 0x0F)
    if isinstance(seq, bytes):
      seq = pydicom.values.convert_SQ(seq, True, True)
    item = seq[0] if seq else None
  except Exception:  # pylint: disable=broad-except
    item = None
  if item is not None:
    ipp = ipp if ipp is not None else item.get("ImagePositionPatient")
    iop = iop if iop is not None else item.get("ImageOrientationPatient")
  return ipp, iop


def _private(ds: Dataset, group: int, creator: str, offset: int) -> Any:
  """Private element (group, creator block, element offset) or None."""
  try:
    block = ds.private_block(group, creator)
    return block[offset].value if offset in block else None
  except (KeyError, ValueError, TypeError):
    return None
  except Exception:
    return None


_BINARY = {"FD": ("d", 8), "FL": ("f", 4)}


def _private_value(ds: Any, group: int, creator: str | None, offset: int,
                   vr: str) -> Any:
  """A vendor private value as a python native (or a list), from a pydicom
  dataset or a ``fastread.Header``; None when absent or unreadable.

  ``creator`` None: the element of block 0x10 whatever its creator (UIH
  documents its tags by number). An implicit-VR file read by pydicom gives
  unknown private elements as raw bytes: binary VRs are unpacked here.
  """
  if isinstance(ds, fastread.Header):
    return ds.private_value(group, creator, offset, vr, multi=True)
  if creator is None:
    try:
      elem = ds.get((group << 16) | 0x1000 | offset)
    except Exception:
      return None
    raw = None if elem is None else elem.value
  else:
    raw = _private(ds, group, creator, offset)
  if isinstance(raw, bytes) and vr in _BINARY:
    code, size = _BINARY[vr]
    if not raw or len(raw) % size:
      return None
    vals = list(struct.unpack(f"<{len(raw) // size}{code}", raw))
    return vals[0] if len(vals) == 1 else vals
  if isinstance(raw, bytes):
    try:
      raw = raw.decode("ascii").strip(" \0")
    except UnicodeDecodeError:
      return None
    if "\\" in raw:
      raw = raw.split("\\")
  return _native(raw)


def _first_float(value: Any) -> float | None:
  if isinstance(value, list):
    value = value[0] if value else None
  try:
    out = float(value)
  except (TypeError, ValueError):
    return None
  return out if math.isfinite(out) else None


def _vector(parts: list) -> list[float] | None:
  vals = []
  for p in parts:
    v = _first_float(p)
    if v is None:
      return None
    vals.append(v)
  return vals if len(vals) == 3 else None


# Canon (ex-Toshiba) newer software: "b=1500(0.445,0.000,0.895)" in ImageComments.
_CANON_COMMENT = re.compile(
    r"b\s*=\s*([0-9.]+)\s*\(\s*([-0-9.eE]+)\s*,\s*([-0-9.eE]+)\s*,\s*([-0-9.eE]+)\s*\)")
_SIEMENS_SEQ_B = re.compile(r"(?:EP|RE|EZ)_?B(\d+)", re.IGNORECASE)


def _canon_comment(ds: Any) -> tuple[float, list[float]] | None:
  text = ds.get("ImageComments")
  if not isinstance(text, str) or "b" not in text:
    return None
  m = _CANON_COMMENT.search(text)
  if not m:
    return None
  return float(m.group(1)), [float(m.group(i)) for i in (2, 3, 4)]


def _siemens_csa(ds: Any) -> dict | None:
  """Siemens CSA image header (pydicom datasets only), or None."""
  if isinstance(ds, fastread.Header) or (0x0029, 0x1010) not in ds and \
     (0x0029, 0x1110) not in ds:
    return None
  try:
    with warnings.catch_warnings():  # nibabel warns that nicom is experimental
      warnings.simplefilter("ignore")
      from nibabel.nicom import csareader  # pylint: disable=import-outside-toplevel
    return csareader.get_csa_header(ds)
  except Exception:
    return None


def _is_siemens_diffusion(ds: Any) -> bool:
  name = ds.get("SequenceName")
  return isinstance(name, str) and bool(_SIEMENS_SEQ_B.search(name))


def vendor_b_value(ds: Any) -> float | None:
  """Diffusion b-value (s/mm^2) of one file, from the first tag that has it.

  Order: DiffusionBValue (0018,9087; Canon/Toshiba write it only where b > 0);
  Siemens (0019,100C); Philips (2001,1003); GE (0043,1039) first value
  (GE adds 1e9 as a flag in some versions); UIH (0065,1009); Canon's
  ImageComments ``b=1500(x,y,z)``; Siemens CSA ``B_value`` (pydicom datasets
  of a diffusion sequence only: parsing CSA costs ~1 ms). ``ds`` is a pydicom
  dataset or a ``fastread.Header``.
  """
  value = _first_float(_native(ds.get("DiffusionBValue")))
  if value is not None:
    return value
  if not _may_have_private(ds):
    return _fallback_b_value(ds)
  for group, creator, off, vr in ((0x0019, _SIEMENS_MR, 0x0C, "IS"),
                                  (0x2001, _PHILIPS_DD1, 0x03, "FL")):
    b = _first_float(_private_value(ds, group, creator, off, vr))
    if b is not None:
      return b
  b = _first_float(_private_value(ds, 0x0043, _GE_PARM, 0x39, "IS"))
  if b is not None:
    return b % 1e9 if b >= 1e9 else b
  b = _first_float(_private_value(ds, 0x0065, None, 0x09, "FD"))
  if b is not None:
    return b
  return _fallback_b_value(ds)


def _may_have_private(ds: Any) -> bool:
  return not isinstance(ds, fastread.Header) or ds.has_private_values


def _fallback_b_value(ds: Any) -> float | None:
  """Canon's ImageComments, then Siemens CSA (``vendor_b_value``)."""
  canon = _canon_comment(ds)
  if canon is not None:
    return canon[0]
  if _is_siemens_diffusion(ds):
    if isinstance(ds, fastread.Header):
      raise fastread.Unsupported("Siemens diffusion without B_value: CSA")
    csa = _siemens_csa(ds)
    if csa is not None:
      return _first_float(_csa_value(csa, "B_value"))
  return None


def _csa_value(csa: dict, key: str) -> Any:
  try:
    items = csa["tags"][key]["items"]
  except (KeyError, TypeError):
    return None
  return items if len(items) > 1 else (items[0] if items else None)


def vendor_diffusion_direction(ds: Any) -> list[float] | None:
  """Diffusion gradient direction of one file (3 floats), if stored.

  Order: DiffusionGradientOrientation (0018,9089); Siemens (0019,100E);
  GE (0019,10BB/BC/BD); Philips (2005,10B0/B1/B2); UIH (0065,1037); Canon's
  ImageComments; Siemens CSA ``DiffusionGradientDirection``. Each vendor's
  own frame (they differ: GE and Canon give it in image space); the value
  tells volumes apart and is kept in the record, not interpreted.
  """
  if "DiffusionGradientOrientation" in ds:
    value = ds.get("DiffusionGradientOrientation")
    vec = _vector(list(value) if isinstance(value, collections.abc.Sequence) and
                  not isinstance(value, str) else [value])
    if vec is not None:
      return vec
  if _may_have_private(ds):
    vec = _private_direction(ds)
    if vec is not None:
      return vec
  canon = _canon_comment(ds)
  if canon is not None:
    return canon[1]
  if _is_siemens_diffusion(ds) and not isinstance(ds, fastread.Header):
    csa = _siemens_csa(ds)
    if csa is not None:
      raw = _csa_value(csa, "DiffusionGradientDirection")
      if isinstance(raw, list) and (vec := _vector(raw)) is not None:
        return vec
  return None


def _private_direction(ds: Any) -> list[float] | None:
  raw = _private_value(ds, 0x0019, _SIEMENS_MR, 0x0E, "FD")
  if isinstance(raw, list) and (vec := _vector(raw)) is not None:
    return vec
  for group, creator, offsets, vr in (
      (0x0019, _GE_ACQU, (0xBB, 0xBC, 0xBD), "DS"),
      (0x2005, _PHILIPS_MR1, (0xB0, 0xB1, 0xB2), "FL")):
    parts = [_private_value(ds, group, creator, off, vr) for off in offsets]
    if all(p is not None for p in parts) and (vec := _vector(parts)) is not None:
      return vec
  raw = _private_value(ds, 0x0065, None, 0x37, "FD")
  if isinstance(raw, list) and (vec := _vector(raw)) is not None:
    return vec
  return None


def _enhanced_fields(ds: Dataset) -> dict[str, Any]:
  """Classic keywords pulled from an enhanced object's functional groups."""
  out: dict[str, Any] = {}
  if "SharedFunctionalGroupsSequence" not in ds and \
     "PerFrameFunctionalGroupsSequence" not in ds:
    return out

  def group(keyword: str) -> Dataset | None:
    return functional_group(ds, 0, keyword)

  def take(item: Dataset | None, src: str, dst: str | None = None) -> None:
    if item is None or src not in item:
      return
    value = _coerce(dst or src, item[src].value)
    if value is not None:
      out.setdefault(dst or src, value)

  take(group("PlaneOrientationSequence"), "ImageOrientationPatient")
  measures = group("PixelMeasuresSequence")
  take(measures, "PixelSpacing")
  take(measures, "SliceThickness")
  take(measures, "SpacingBetweenSlices")
  timing = group("MRTimingAndRelatedParametersSequence")
  take(timing, "RepetitionTime")
  take(timing, "FlipAngle")
  take(timing, "EchoTrainLength")
  take(group("MREchoSequence"), "EffectiveEchoTime", "EchoTime")
  modifier = group("MRModifierSequence")
  take(modifier, "InversionRecovery")
  if modifier is not None and "InversionTimes" in modifier:
    times = _coerce("InversionTimes", modifier["InversionTimes"].value)
    if times is not None:
      out.setdefault("InversionTime", float(times))
  diffusion = group("MRDiffusionSequence")
  take(diffusion, "DiffusionBValue")
  take(diffusion, "DiffusionDirectionality")
  if diffusion is not None:
    direction = _first_item(diffusion, "DiffusionGradientDirectionSequence")
    take(direction, "DiffusionGradientOrientation")
  for frame_type in ("MRImageFrameTypeSequence", "CTImageFrameTypeSequence",
                     "PETFrameTypeSequence"):
    item = group(frame_type)
    take(item, "ComplexImageComponent")
    take(item, "AcquisitionContrast")
  take(group("CTXRayDetailsSequence"), "KVP")
  take(group("CTReconstructionSequence"), "ConvolutionKernel")
  usage = group("ContrastBolusUsageSequence")
  if usage is not None and "ContrastBolusAgentAdministered" in usage:
    out["ContrastBolusAgentAdministered"] = str(
        usage.ContrastBolusAgentAdministered).strip().upper()
  agent = _first_item(ds, "ContrastBolusAgentSequence")
  if agent is not None and "CodeMeaning" in agent:
    meaning = _native(agent.CodeMeaning)
    if meaning:
      out.setdefault("ContrastBolusAgent", meaning)
  # Philips stores the classic header of each frame in a private sequence.
  per_frame = ds.get("PerFrameFunctionalGroupsSequence")
  if per_frame:
    try:
      block = per_frame[0].private_block(0x2005, "Philips MR Imaging DD 005")
      legacy = block[0x0F].value[0] if 0x0F in block else None
    except Exception:
      legacy = None
    if legacy is not None:
      for key in ("ScanningSequence", "SequenceVariant", "ScanOptions",
                  "EchoTime", "InversionTime", "EchoNumbers"):
        take(legacy, key)
      b = vendor_b_value(legacy)
      if b is not None:
        out.setdefault("DiffusionBValue", b)
  return out


def _identifying_values(ds: Dataset | fastread.Header) -> set[str]:
  """Tokens of the header's names, IDs, dates and institution (top level:
  where PS3.15 puts them; the record never copies nested text). A fastread
  header kept the raw identifying elements of its walk
  (``Header.identifying_values``, equal to pydicom's on every test file);
  where it cannot tell (implicit VR, non-ASCII text) the file's full header
  is read with pydicom (once per record, i.e. per series group)."""
  if isinstance(ds, fastread.Header):
    try:
      return identifier_tokens(ds.identifying_values())
    except fastread.Unsupported:
      pass
    import pydicom  # pylint: disable=import-outside-toplevel - slow import, see above
    try:
      ds = pydicom.dcmread(ds.path, stop_before_pixels=True, force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise fastread.Unsupported(f"header for scrubbing unreadable ({e})") from e
  values: list[Any] = []
  for elem in ds:
    try:
      if elem.VR in ("PN", "DA", "DT") or elem.keyword in _IDENTIFYING_KEYS:
        value = elem.value
        # MultiValue is a MutableSequence; PersonName is no str and iterates
        # its characters, so it must not be taken for a list.
        values.append([str(v) for v in value]
                      if isinstance(value, (collections.abc.MutableSequence, tuple))
                      else str(value))
    except Exception:  # pylint: disable=broad-except - malformed: nothing to remove
      continue
  return identifier_tokens(values)


def scrub_record(rec: dict[str, Any], ds: Dataset) -> dict[str, Any]:
  """Scrubs ``FREE_TEXT_KEYS`` of ``rec`` (in place) with ``ds``'s identifying
  values; the raw values that changed go to ``rec[UNSCRUBBED_KEY]``, which
  stays in memory (labels are computed on it; ``safe_metadata`` drops it)."""
  keys = [k for k in FREE_TEXT_KEYS if isinstance(rec.get(k), str)]
  if not keys:
    return rec
  tokens = _identifying_values(ds)
  raw = {}
  for key in keys:
    clean = scrub_text(rec[key], tokens)
    if clean != rec[key]:
      raw[key] = rec[key]
      if clean:
        rec[key] = clean
      else:
        del rec[key]
  if raw:
    rec[UNSCRUBBED_KEY] = raw
  return rec


def record_from_dataset(ds: Dataset, salt: str) -> dict[str, Any]:
  """The PHI-free metadata record of one DICOM header.

  Args:
    ds: a pydicom dataset (a header read with ``stop_before_pixels`` is enough).
    salt: the corpus salt for ``hash_id``.

  Returns:
    dict of DICOM keyword -> python value (see the module docstring), plus
    ``PatientHash``, ``StudyHash``, ``SeriesHash`` and ``SourceFormat="dicom"``.
    Absent tags are absent keys.
  """
  rec: dict[str, Any] = {}
  for key in PLAIN_KEYS:
    elem = _get(ds, key)
    if elem is None:
      continue
    try:
      value = _coerce(key, elem.value)
    except Exception:
      value = None
    if value is not None:
      rec[key] = value
  return _complete_record(rec, ds, ds.get, salt)


# Character sets in which an ASCII byte string means the same ASCII text
# (fastread decodes ASCII only and raises on any other byte): single-byte
# ISO 8859 sets, UTF-8, GB18030 / GBK. Not ISO 2022 (escape sequences) nor
# ISO_IR 13 (JIS X 0201 puts the yen sign at the backslash).
_ASCII_COMPATIBLE = frozenset({
    "ISO_IR 6", "ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110",
    "ISO_IR 126", "ISO_IR 127", "ISO_IR 138", "ISO_IR 144", "ISO_IR 148",
    "ISO_IR 166", "ISO_IR 203", "ISO_IR 192", "GB18030", "GBK"})
# Present in a header, these make its record pydicom's job (sequences).
_HEADER_NEEDS_PYDICOM = ("RadiopharmaceuticalInformationSequence",
                         "SharedFunctionalGroupsSequence",
                         "PerFrameFunctionalGroupsSequence",
                         "ContrastBolusAgentSequence")


def record_from_header(h: fastread.Header, salt: str) -> dict[str, Any]:
  """``record_from_dataset`` of a ``fastread.Header``: the same record
  (the equivalence tests compare the two on every test file), without
  pydicom. Raises ``fastread.Unsupported`` where pydicom must decide
  (sequences, non-ASCII text, odd values), so the caller reads the file
  with pydicom instead."""
  for key in _HEADER_NEEDS_PYDICOM:
    if key in h:
      raise fastread.Unsupported(f"{key} in the header")
  charset = h.get_lenient("SpecificCharacterSet")
  if charset is not None and (not isinstance(charset, str) or
                              charset not in _ASCII_COMPATIBLE):
    raise fastread.Unsupported(f"character set {charset!r}")
  rec: dict[str, Any] = {}
  for key in PLAIN_KEYS:
    value = _coerce(key, h.get_lenient(key))
    if value is not None:
      rec[key] = value
  return _complete_record(rec, h, h.get_lenient, salt)


def _complete_record(rec: dict[str, Any], ds: Any, get, salt: str
                     ) -> dict[str, Any]:
  """The part of a record shared by pydicom datasets and fastread headers
  (``get``: the value getter of either)."""
  for key, value in _enhanced_fields(ds).items():
    rec.setdefault(key, value)
  sop = sop_class_uid(ds)
  if sop:
    rec["SOPClassUID"] = sop
  else:
    rec.pop("SOPClassUID", None)   # blanked / not a UID: absent, not garbage
  if "DiffusionBValue" not in rec:
    b = vendor_b_value(ds)
    if b is not None:
      rec["DiffusionBValue"] = b
  if "DiffusionGradientOrientation" not in rec:
    direction = vendor_diffusion_direction(ds)
    if direction:
      rec["DiffusionGradientOrientation"] = direction
  pharm = _first_item(ds, "RadiopharmaceuticalInformationSequence")
  if pharm is not None:
    name = _native(pharm.get("Radiopharmaceutical"))
    if name is None:
      code = _first_item(pharm, "RadiopharmaceuticalCodeSequence")
      name = _native(code.get("CodeMeaning")) if code is not None else None
    if name is not None:
      rec["Radiopharmaceutical"] = name
    nuclide = _first_item(pharm, "RadionuclideCodeSequence")
    if nuclide is not None and _native(nuclide.get("CodeMeaning")):
      rec["Radionuclide"] = _native(nuclide.get("CodeMeaning"))
  patient = _native(get("PatientID")) or _native(
      str(get("PatientName") or "") or None)
  rec["PatientHash"] = hash_id(patient, salt)
  rec["StudyHash"] = hash_id(_native(get("StudyInstanceUID")), salt)
  rec["SeriesHash"] = hash_id(_native(get("SeriesInstanceUID")), salt)
  rec["SourceFormat"] = "dicom"
  return scrub_record(rec, ds)
