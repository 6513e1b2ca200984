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

Enhanced multi-frame objects (Enhanced CT/MR/PET) keep most acquisition
parameters in the shared / per-frame functional groups; ``record_from_dataset``
pulls them up to the classic keywords (EchoTime from MREchoSequence,
ImageOrientationPatient from PlaneOrientationSequence, ...), so that the
rules need not know the object type.

Derived geometry keys (filled by ``scan`` from headers, refined by
``load_volume`` from the assembled volume): ``NumberOfSlices`` (int),
``SliceSpacing`` (mm, measured from slice positions), ``ExtentMM``
([D, H, W] field of view in mm = voxels x spacing), ``ExtentSI`` (extent of the
volume along the patient superior-inferior axis, mm), ``StackKey``.
"""
from __future__ import annotations

from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DSfloat, IS, PersonName

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
_PHILIPS_DD1 = "Philips Imaging DD 001"


def _native(value: Any) -> Any:
  """pydicom value -> python native (str/int/float/list); None when empty."""
  if value is None:
    return None
  if isinstance(value, (MultiValue, list, tuple)):
    items = [_native(v) for v in value]
    items = [v for v in items if v is not None]
    return items or None
  if isinstance(value, PersonName):
    return None  # never copy names
  if isinstance(value, bytes):
    return None
  if isinstance(value, IS):
    return int(value)
  if isinstance(value, DSfloat):
    return float(value)
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
  if seq is None or not isinstance(seq, (list, pydicom.Sequence)) or not seq:
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


def _private(ds: Dataset, group: int, creator: str, offset: int) -> Any:
  """Private element (group, creator block, element offset) or None."""
  try:
    block = ds.private_block(group, creator)
    return block[offset].value if offset in block else None
  except (KeyError, ValueError, TypeError):
    return None
  except Exception:
    return None


def vendor_b_value(ds: Dataset) -> float | None:
  """Diffusion b-value (s/mm^2) from the standard or vendor private tags."""
  value = _native(ds["DiffusionBValue"].value) if "DiffusionBValue" in ds else None
  if value is not None:
    return float(value[0] if isinstance(value, list) else value)
  for group, creator, off in ((0x0019, _SIEMENS_MR, 0x0C),
                              (0x2001, _PHILIPS_DD1, 0x03)):
    raw = _native(_private(ds, group, creator, off))
    if raw is not None:
      try:
        return float(raw[0] if isinstance(raw, list) else raw)
      except (TypeError, ValueError):
        pass
  raw = _native(_private(ds, 0x0043, _GE_PARM, 0x39))
  if raw is not None:
    try:
      b = float(raw[0] if isinstance(raw, list) else raw)
      # GE adds 1e9 (or multiples) as a flag to the b-value in some versions.
      return b % 1e9 if b >= 1e9 else b
    except (TypeError, ValueError):
      pass
  return None


def vendor_diffusion_direction(ds: Dataset) -> list[float] | None:
  """Diffusion gradient direction (unit vector) if stored, else None."""
  if "DiffusionGradientOrientation" in ds:
    return _coerce("DiffusionGradientOrientation",
                   ds["DiffusionGradientOrientation"].value)
  raw = _private(ds, 0x0019, _SIEMENS_MR, 0x0E)
  if raw is not None:
    return _coerce("DiffusionGradientOrientation", raw)
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


def _identifying_values(ds: Dataset) -> set[str]:
  """Tokens of the header's names, IDs, dates and institution (top level:
  where PS3.15 puts them; the record never copies nested text)."""
  values: list[Any] = []
  for elem in ds:
    try:
      if elem.VR in ("PN", "DA", "DT") or elem.keyword in _IDENTIFYING_KEYS:
        value = elem.value
        values.append([str(v) for v in value] if isinstance(value, (MultiValue, list))
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
  for key, value in _enhanced_fields(ds).items():
    rec.setdefault(key, value)
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
  patient = _native(ds.get("PatientID")) or _native(
      str(ds.get("PatientName", "")) or None)
  rec["PatientHash"] = hash_id(patient, salt)
  rec["StudyHash"] = hash_id(_native(ds.get("StudyInstanceUID")), salt)
  rec["SeriesHash"] = hash_id(_native(ds.get("SeriesInstanceUID")), salt)
  rec["SourceFormat"] = "dicom"
  return scrub_record(rec, ds)
