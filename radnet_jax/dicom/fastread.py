"""A minimal DICOM header reader for the common case, equal to pydicom's values.

pydicom parses every element of a header into Python objects and converts each
accessed value through its generic value pipeline (~0.3 ms + ~15 us per
accessed tag); ``scan`` and ``load_volume`` only need ~25 top-level tags of
each file. ``read_header`` walks the element stream with ``struct`` and
decodes just those tags, and records where the pixel data sits so that
``load_volume`` can read the pixels straight into its buffer.

It is a *fast path only*: anything outside the plain case raises
``Unsupported`` (or ``read_header`` returns None) and the caller uses pydicom.
Unsupported are: no ``DICM`` preamble, gzip, big-endian or deflated transfer
syntaxes, a dataset whose encoding disagrees with its transfer syntax, any
structural oddity (lengths past the end of the file, bad VRs), and, per
value, anything that is not clean (empty, non-ASCII, padded items,
non-finite numbers, several values where one is expected). For the values it
does return, the Python value equals what ``pydicom.Dataset.get`` returns
(str / int / float, a list where pydicom returns a MultiValue), which the
equivalence tests check on every test file.

Size (~545 lines): one self-contained parser (byte reader, element walk,
value conversion); its parts share the rules of what counts as "plain", so
they are read and changed together.
"""
from __future__ import annotations

import math
import struct
from typing import Any



class UID(str):
  """A transfer syntax / SOP class UID string (what ``Header.file_meta``
  holds): the two properties the callers use, without importing pydicom
  (whose import costs more than converting a small archive)."""

  _UNCOMPRESSED = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1",
                             "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"})

  @property
  def is_compressed(self) -> bool:
    return str(self) not in self._UNCOMPRESSED

  @property
  def is_implicit_VR(self) -> bool:  # pylint: disable=invalid-name
    return str(self) == "1.2.840.10008.1.2"

# keyword -> (tag, VR, multi): multi False = one value expected.
_TAGS: dict[str, tuple[int, str, bool]] = {
    "SOPClassUID": (0x00080016, "UI", False),
    "ImageType": (0x00080008, "CS", True),
    "Manufacturer": (0x00080070, "LO", False),
    "SequenceName": (0x00180024, "SH", False),
    "DiffusionDirectionality": (0x00189075, "CS", False),
    "InstanceNumber": (0x00200013, "IS", False),
    "StackID": (0x00209056, "SH", False),
    "InStackPositionNumber": (0x00209057, "UL", False),
    "ImageComments": (0x00204000, "LT", False),
    "Modality": (0x00080060, "CS", False),
    "AcquisitionTime": (0x00080032, "TM", False),
    "EchoTime": (0x00180081, "DS", False),
    "EchoNumbers": (0x00180086, "IS", False),
    "TriggerTime": (0x00181060, "DS", False),
    "DiffusionBValue": (0x00189087, "FD", False),
    "DiffusionGradientOrientation": (0x00189089, "FD", True),
    "ComplexImageComponent": (0x00089208, "CS", False),
    "SeriesInstanceUID": (0x0020000E, "UI", False),
    "AcquisitionNumber": (0x00200012, "IS", False),
    "ImagePositionPatient": (0x00200032, "DS", True),
    "ImageOrientationPatient": (0x00200037, "DS", True),
    "TemporalPositionIdentifier": (0x00200100, "IS", False),
    "TemporalPositionIndex": (0x00209128, "UL", False),
    "SamplesPerPixel": (0x00280002, "US", False),
    "NumberOfFrames": (0x00280008, "IS", False),
    "Rows": (0x00280010, "US", False),
    "Columns": (0x00280011, "US", False),
    "PixelSpacing": (0x00280030, "DS", True),
    "BitsAllocated": (0x00280100, "US", False),
    "BitsStored": (0x00280101, "US", False),
    "PixelRepresentation": (0x00280103, "US", False),
    "RescaleIntercept": (0x00281052, "DS", False),
    "RescaleSlope": (0x00281053, "DS", False),
    "PerFrameFunctionalGroupsSequence": (0x52009230, "SQ", False),
    "SharedFunctionalGroupsSequence": (0x52009229, "SQ", False),
    "DirectoryRecordSequence": (0x00041220, "SQ", False),
    # The rest of the metadata record (``metadata.PLAIN_KEYS`` and the
    # identifiers that are hashed), read by ``metadata.record_from_header``.
    "ManufacturerModelName": (0x00081090, "LO", False),
    "MagneticFieldStrength": (0x00180087, "DS", False),
    "BodyPartExamined": (0x00180015, "CS", False),
    "StudyDescription": (0x00081030, "LO", False),
    "SeriesDescription": (0x0008103E, "LO", False),
    "ProtocolName": (0x00181030, "LO", False),
    "ScanningSequence": (0x00180020, "CS", True),
    "SequenceVariant": (0x00180021, "CS", True),
    "ScanOptions": (0x00180022, "CS", True),
    "MRAcquisitionType": (0x00180023, "CS", False),
    "RepetitionTime": (0x00180080, "DS", False),
    "InversionTime": (0x00180082, "DS", False),
    "FlipAngle": (0x00181314, "DS", False),
    "EchoTrainLength": (0x00180091, "IS", False),
    "ContrastBolusAgent": (0x00180010, "LO", False),
    "ContrastBolusRoute": (0x00181040, "LO", False),
    "ContrastBolusVolume": (0x00181041, "DS", False),
    "ContrastBolusStartTime": (0x00181042, "TM", False),
    "ContrastBolusIngredient": (0x00181048, "CS", False),
    "SliceThickness": (0x00180050, "DS", False),
    "SpacingBetweenSlices": (0x00180088, "DS", False),
    "KVP": (0x00180060, "DS", False),
    "ConvolutionKernel": (0x00181210, "SH", True),
    "PatientPosition": (0x00185100, "CS", False),
    "PatientSex": (0x00100040, "CS", False),
    "PhotometricInterpretation": (0x00280004, "CS", False),
    "Units": (0x00541001, "CS", False),
    "SeriesNumber": (0x00200011, "IS", False),
    "AcquisitionContrast": (0x00089209, "CS", False),
    "PulseSequenceName": (0x00189005, "SH", False),
    "EchoPulseSequence": (0x00189008, "CS", False),
    "InversionRecovery": (0x00189009, "CS", False),
    "ReconstructionDiameter": (0x00181100, "DS", False),
    "ImagedNucleus": (0x00180085, "SH", False),
    "NumberOfTemporalPositions": (0x00200105, "IS", False),
    "SeriesType": (0x00541000, "CS", True),
    "DecayCorrection": (0x00541102, "CS", False),
    "CorrectedImage": (0x00280051, "CS", True),
    "ContrastBolusAgentPhase": (0x00189344, "CS", False),
    "PatientID": (0x00100020, "LO", False),
    "PatientName": (0x00100010, "PN", False),
    "StudyInstanceUID": (0x0020000D, "UI", False),
    "RadiopharmaceuticalInformationSequence": (0x00540016, "SQ", False),
    "ContrastBolusAgentSequence": (0x00180012, "SQ", False),
    "SpecificCharacterSet": (0x00080005, "CS", True),
}
_BY_TAG = {tag: (kw, vr, multi) for kw, (tag, vr, multi) in _TAGS.items()}
# Vendor private elements whose values are kept (diffusion b-value and
# gradient direction of GE, Philips, Siemens and UIH): (group, element offset
# inside the creator's block). Other private elements are kept as presence
# only. ``Header.private_value`` decodes them.
PRIVATE_VALUES = frozenset({
    (0x0019, 0x0C), (0x0019, 0x0E),                  # Siemens B_value, direction
    (0x0019, 0xBB), (0x0019, 0xBC), (0x0019, 0xBD),  # GE direction x, y, z
    (0x0043, 0x39),                                  # GE b-value (slop_int_6..9)
    (0x2001, 0x03),                                  # Philips b-value
    (0x2005, 0xB0), (0x2005, 0xB1), (0x2005, 0xB2),  # Philips direction
    (0x0065, 0x09), (0x0065, 0x37),                  # UIH b-value, direction
})
_PIXEL_TAGS = (0x7FE00010, 0x7FE00009, 0x7FE00008)
# Identifying elements, kept raw for ``Header.identifying_values`` (the
# tokens the PHI scrubber removes from free text, ``metadata``): every
# top-level element with a person-name or date VR, and these keywords'
# tags (``metadata._IDENTIFYING_KEYS``; a test keeps the two equal).
IDENTIFYING_VRS = frozenset({"PN", "DA", "DT"})
IDENTIFYING_TAGS = {
    "PatientID": 0x00100020, "OtherPatientIDs": 0x00101000, "IssuerOfPatientID": 0x00100021,
    "AccessionNumber": 0x00080050, "StudyID": 0x00200010, "RequestedProcedureID": 0x00401001,
    "PerformedProcedureStepID": 0x00400253, "MedicalRecordLocator": 0x00101090,
    "InstitutionName": 0x00080080, "InstitutionAddress": 0x00080081,
    "InstitutionalDepartmentName": 0x00081040, "StationName": 0x00081010,
    "DeviceSerialNumber": 0x00181000, "PatientAddress": 0x00101040,
    "PatientTelephoneNumbers": 0x00102154, "MilitaryRank": 0x00101080,
    "CurrentPatientLocation": 0x00380300,
}
_IDENTIFYING_TAG_SET = frozenset(IDENTIFYING_TAGS.values())
_SINGLE_TEXT_VRS = frozenset({"ST", "LT", "UT"})   # never split at backslashes
_LONG_VR = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV",
                      b"UC", b"UN", b"UR", b"UT", b"UV"})
_SHORT_VR = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD",
                       b"FL", b"IS", b"LO", b"LT", b"PN", b"SH", b"SL", b"SS",
                       b"ST", b"TM", b"UI", b"UL", b"US"})
_LONG_VR_NAME = {code: code.decode() for code in _LONG_VR}
_SHORT_VR_NAME = {code: code.decode() for code in _SHORT_VR}
_IMPLICIT = "1.2.840.10008.1.2"
_BINARY_VRS = frozenset({"US", "UL", "SS", "SL", "FD", "FL"})
_UNDEFINED = 0xFFFFFFFF
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_TAG = struct.Struct("<HH")
_FIRST_READ = 8192


_UIDS: dict[str, UID] = {}


def _uid(text: str) -> UID:
  """``UID(text)``, shared: building one runs pydicom's regex validation
  (~30 us), and a series repeats the same few UIDs in every file."""
  uid = _UIDS.get(text)
  if uid is None:
    if len(_UIDS) >= 4096:   # bounded over an archive of many series
      _UIDS.clear()
    uid = _UIDS[text] = UID(text)
  return uid


class Unsupported(Exception):
  """The fast reader does not handle this file or value: use pydicom."""


class _Buffer:
  """The file's bytes, read on demand (headers only, not the pixels)."""

  def __init__(self, fp, size: int):
    self.fp, self.size = fp, size
    self.data = fp.read(min(size, _FIRST_READ))

  def need(self, end: int) -> bytes:
    if end > self.size:
      raise Unsupported("element runs past the end of the file")
    if end > len(self.data):
      self.data += self.fp.read(max(end, 2 * len(self.data)) - len(self.data))
      if end > len(self.data):
        raise Unsupported("short read")
    return self.data


class Header:
  """Top-level elements of one file: ``get``/``in``/attributes like pydicom.

  Attributes:
    path: the file.
    file_meta: {'TransferSyntaxUID': UID, 'MediaStorageSOPClassUID': UID}.
    has_private_values: False when no element of ``PRIVATE_VALUES`` is
      present (``private_value`` would answer None for all).
    pixel_tag_offset: byte offset of the pixel data element's tag (or the
      file size when there is none), as pydicom's ``fp.tell()`` after
      ``stop_before_pixels``.
    pixel_value_offset, pixel_length: where the native pixel bytes are
      (None when absent or encapsulated).
  """

  def __init__(self, path: str, values: dict[int, tuple[str, bytes]],
               creators: dict[tuple[int, int], bytes], meta: dict[str, UID],
               implicit: bool, file_size: int, pixel_tag_offset: int,
               pixel_value_offset: int | None, pixel_length: int | None):
    self.path = path
    self._values = values
    self._creators = creators
    self._cache: dict[str, Any] = {}
    self.file_meta = meta
    self.implicit = implicit
    self._radnet_file_size = file_size
    self._radnet_pixel_offset = pixel_tag_offset
    self.pixel_value_offset = pixel_value_offset
    self.pixel_length = pixel_length
    # Whether any element of PRIVATE_VALUES was kept (most files: none, so
    # the vendor diffusion look-ups stop at once).
    self.has_private_values = True
    # (vr, raw bytes) of the identifying elements, in file order; None when
    # the file's VRs are implicit or an element's VR is UN (which elements
    # are names or dates is then unknown here).
    self.identifying: list[tuple[str, bytes]] | None = None

  def identifying_values(self) -> list:
    """The values of the identifying elements as pydicom gives them (``str``,
    a list for multi-valued ones), for the PHI scrubber; ``Unsupported``
    where pydicom must read the file (implicit VR, non-ASCII text)."""
    if self.identifying is None:
      raise Unsupported("identifying elements of an implicit VR / UN file")
    out: list = []
    for vr, raw in self.identifying:
      try:
        text = raw.decode("ascii")
      except UnicodeDecodeError as e:
        raise Unsupported("non-ASCII identifying value") from e
      text = text.rstrip(" \0")
      if vr not in _SINGLE_TEXT_VRS and "\\" in text:
        out.append([v.rstrip(" \0") for v in text.split("\\")])
      else:
        out.append(text)
    return out

  def __contains__(self, keyword: str) -> bool:
    return _TAGS[keyword][0] in self._values

  def get(self, keyword: str, default: Any = None) -> Any:
    if keyword in self._cache:
      return self._cache[keyword]
    tag, vr, multi = _TAGS[keyword]
    item = self._values.get(tag)
    if item is None:
      return default
    value = _decode(item[0], vr, item[1], multi)
    self._cache[keyword] = value
    return value

  def get_lenient(self, keyword: str) -> Any:
    """``get`` for the metadata record: None when absent or empty (pydicom's
    empty value, which the record drops), several values as a list even
    where one is expected (the record keeps the first, as it does with
    pydicom's values); anything else unusual raises Unsupported."""
    tag, vr, _ = _TAGS[keyword]
    item = self._values.get(tag)
    if item is None or not item[1]:
      return None
    if vr not in _BINARY_VRS and not item[1].strip(b" \0"):
      return None   # blank text
    return _decode(item[0], vr, item[1], True)

  def __getattr__(self, keyword: str) -> Any:
    if keyword.startswith("_") or keyword not in _TAGS:
      raise AttributeError(keyword)
    if _TAGS[keyword][0] not in self._values:
      raise AttributeError(keyword)
    return self.get(keyword)

  def has_private(self, group: int, creator: str, offset: int) -> bool:
    """Whether private element ``offset`` of ``creator``'s block is present."""
    for (g, element), raw in self._creators.items():
      if g != group:
        continue
      try:
        text = raw.decode("ascii")
      except UnicodeDecodeError as e:
        raise Unsupported("non-ASCII private creator") from e
      text = text.rstrip(" \0")
      if text != text.strip() or "\\" in text:
        raise Unsupported("unusual private creator")
      if text == creator and ((group << 16) | (element << 8) | offset) in self._values:
        return True
    return False

  def private_value(self, group: int, creator: str | None, offset: int,
                    vr: str, multi: bool = False) -> Any:
    """Value of a private element in ``PRIVATE_VALUES`` (pydicom's value), or
    None when absent. ``creator`` None: the element of block 0x10 whatever
    its creator (UIH's tags are documented by number only)."""
    blocks = []
    if creator is None:
      blocks = [0x10]
    else:
      for (g, element), raw in self._creators.items():
        if g != group:
          continue
        try:
          text = raw.decode("ascii").rstrip(" \0")
        except UnicodeDecodeError as e:
          raise Unsupported("non-ASCII private creator") from e
        if text == creator:
          blocks.append(element)
    for block in blocks:
      item = self._values.get((group << 16) | (block << 8) | offset)
      if item is not None:
        return _decode(item[0], vr, item[1], multi)
    return None


def _decode(actual_vr: str, vr: str, raw: bytes, multi: bool) -> Any:
  """pydicom's value of a clean element, else Unsupported."""
  if actual_vr not in (vr, "") or not raw:
    raise Unsupported(f"VR {actual_vr} or empty value")
  if vr in ("US", "UL", "FD", "FL"):
    fmt, size = {"US": ("<H", 2), "UL": ("<I", 4), "FD": ("<d", 8),
                 "FL": ("<f", 4)}[vr]
    if len(raw) % size:
      raise Unsupported("odd binary length")
    values = list(struct.unpack(f"<{len(raw) // size}{fmt[1]}", raw))
    if vr in ("FD", "FL") and not all(math.isfinite(v) for v in values):
      raise Unsupported(f"non-finite {vr}")
  elif vr == "SQ":
    raise Unsupported("sequence value")
  else:
    try:
      text = raw.decode("ascii")
    except UnicodeDecodeError as e:
      raise Unsupported("non-ASCII value") from e
    items = text.rstrip(" \0").split("\\")
    if any(not s or s != s.strip() for s in items):
      raise Unsupported("empty or padded item")
    if vr == "DS":
      try:
        values = [float(s) for s in items]
      except ValueError as e:
        raise Unsupported("invalid DS") from e
      if not all(math.isfinite(v) for v in values):
        raise Unsupported("non-finite DS")
    elif vr == "IS":
      try:
        values = [int(s) for s in items]
      except ValueError as e:
        raise Unsupported("invalid IS") from e
    elif vr == "UI":
      values = [_uid(s) for s in items]
    else:
      values = items
  if len(values) == 1:
    return values[0]
  if not multi:
    raise Unsupported("several values where one is expected")
  return values


def _skip_undefined(buf: _Buffer, pos: int, implicit: bool) -> int:
  """Position after an undefined-length sequence (or item list) at ``pos``."""
  while True:
    data = buf.need(pos + 8)
    group, elem = _TAG.unpack_from(data, pos)
    length = _U32.unpack_from(data, pos + 4)[0]
    pos += 8
    if group != 0xFFFE:
      raise Unsupported("element inside a sequence outside an item")
    if elem == 0xE0DD:      # sequence delimiter
      return pos
    if elem != 0xE000:
      raise Unsupported("unexpected delimiter")
    if length != _UNDEFINED:
      pos += length
      continue
    # An item of undefined length: elements until the item delimiter.
    while True:
      data = buf.need(pos + 8)
      group, elem = _TAG.unpack_from(data, pos)
      if group == 0xFFFE and elem == 0xE00D:
        pos += 8
        break
      pos, _, _, length, nested_implicit = _element_header(buf, pos, implicit)
      if length == _UNDEFINED:
        pos = _skip_undefined(buf, pos, nested_implicit)
      else:
        pos += length


def _element_header(buf: _Buffer, pos: int, implicit: bool
                    ) -> tuple[int, int, str, int, bool]:
  """(value offset, tag, VR or '', length, implicit for nested items)."""
  data = buf.need(pos + 8)
  group, elem = _TAG.unpack_from(data, pos)
  tag = (group << 16) | elem
  if implicit:
    return pos + 8, tag, "", _U32.unpack_from(data, pos + 4)[0], True
  vr = data[pos + 4:pos + 6]
  if vr in _LONG_VR:
    data = buf.need(pos + 12)
    length = _U32.unpack_from(data, pos + 8)[0]
    # An undefined-length UN holds implicit VR data (PS3.5 6.2.2).
    return pos + 12, tag, vr.decode(), length, vr == b"UN"
  if vr in _SHORT_VR:
    return pos + 8, tag, vr.decode(), _U16.unpack_from(data, pos + 6)[0], False
  raise Unsupported("unknown VR")


_SYNTAX_CACHE: dict[str, bool | None] = {}


# The transfer syntaxes pydicom knows that are explicit VR little endian and
# not deflated (native, or encapsulated: JPEG, JPEG-LS, JPEG 2000, HTJ2K,
# RLE, MPEG, HEVC, JPIP, SMPTE ST 2110), as pydicom's UID properties say.
_EXPLICIT_LE = frozenset(
    ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.98", "1.2.840.10008.1.2.5",
     "1.2.840.10008.1.20", "1.2.840.10008.1.2.6.1", "1.2.840.10008.1.2.6.2",
     "1.2.840.10008.1.2.7.1", "1.2.840.10008.1.2.7.2", "1.2.840.10008.1.2.7.3"]
    + [f"1.2.840.10008.1.2.4.{k}" for k in (*range(50, 67), 70, 80, 81,
                                            *range(90, 96), *range(100, 109),
                                            *range(201, 206))]
    + [f"1.2.840.10008.1.2.4.{k}.1" for k in range(100, 107)])


def _syntax_implicit(syntax: UID) -> bool | None:
  """True: implicit VR LE; False: explicit VR LE (native or encapsulated);
  None: a syntax this reader does not parse."""
  key = str(syntax)
  if key not in _SYNTAX_CACHE:
    if key == _IMPLICIT:
      _SYNTAX_CACHE[key] = True
    elif key in _EXPLICIT_LE:
      _SYNTAX_CACHE[key] = False
    else:
      _SYNTAX_CACHE[key] = None
  return _SYNTAX_CACHE[key]


def read_header(path: str) -> Header | None:
  """Parses the top level of ``path`` up to the pixel data; None = use pydicom.

  Raises:
    OSError: the file cannot be opened or read (callers report it).
  """
  if path.endswith(".gz"):
    return None
  with open(path, "rb") as fp:
    fp.seek(0, 2)
    size = fp.tell()
    fp.seek(0)
    buf = _Buffer(fp, size)
    try:
      return _parse(path, buf, size, fp)
    except (Unsupported, struct.error):
      return None


def _parse(path: str, buf: _Buffer, size: int, fp) -> Header | None:
  data = buf.need(132)
  if data[128:132] != b"DICM":
    return None
  # --- file meta: explicit VR little endian, group 0002 -------------------
  pos = 132
  meta: dict[str, UID] = {}
  while True:
    if pos + 8 > size:
      return None
    data = buf.need(pos + 8)
    if _U16.unpack_from(data, pos)[0] != 0x0002:
      break
    start, tag, _, length, _ = _element_header(buf, pos, False)
    if length == _UNDEFINED:
      return None
    data = buf.need(start + length)
    if tag in (0x00020002, 0x00020010):
      value = data[start:start + length].decode("ascii").rstrip("\0 ")
      meta["MediaStorageSOPClassUID" if tag == 0x00020002 else
           "TransferSyntaxUID"] = _uid(value)
    pos = start + length
  syntax = meta.get("TransferSyntaxUID")
  implicit = _syntax_implicit(syntax) if syntax is not None else None
  if implicit is None:
    return None  # big endian, deflated, private or unknown syntax
  # pydicom checks the first element's encoding against the syntax.
  data = buf.need(min(pos + 8, size))
  if pos + 8 <= size and (data[pos + 4:pos + 6] in _SHORT_VR | _LONG_VR) == implicit:
    return None
  # --- dataset ---------------------------------------------------------------
  values: dict[int, tuple[str, bytes]] = {}
  creators: dict[tuple[int, int], bytes] = {}
  identifying: list[tuple[str, bytes]] = []
  unknown_vr = False
  private_values = False
  pixel_tag, pixel_value, pixel_length = size, None, None
  data = buf.data
  # The element header is parsed inline (this loop runs ~40 times a file, and
  # is most of a header's cost); sequences go through _element_header.
  while pos < size:
    if pos + 12 > len(data):
      data = buf.need(min(pos + 12, size))
      if pos + 8 > len(data):
        raise Unsupported("element runs past the end of the file")
    group, elem = _TAG.unpack_from(data, pos)
    tag = (group << 16) | elem
    if implicit:
      start, vr, nested_implicit = pos + 8, "", True
      length = _U32.unpack_from(data, pos + 4)[0]
    else:
      code = data[pos + 4:pos + 6]
      vr = _LONG_VR_NAME.get(code)
      if vr is not None:
        if pos + 12 > len(data):
          raise Unsupported("element runs past the end of the file")
        start, nested_implicit = pos + 12, vr == "UN"
        length = _U32.unpack_from(data, pos + 8)[0]
      else:
        vr = _SHORT_VR_NAME.get(code)
        if vr is None:
          raise Unsupported("unknown VR")
        start, nested_implicit = pos + 8, False
        length = _U16.unpack_from(data, pos + 6)[0]
    if tag in _PIXEL_TAGS:
      pixel_tag = pos
      if tag != 0x7FE00010:
        raise Unsupported("float pixel data")
      if length != _UNDEFINED:
        pixel_value, pixel_length = start, length
      break
    if length == _UNDEFINED:
      pos = _skip_undefined(buf, start, nested_implicit)
      data = buf.data
      if tag in _BY_TAG or group & 1:
        values[tag] = ("SQ", b"")  # presence only
      continue
    end = start + length
    if not implicit and (vr in IDENTIFYING_VRS or tag in _IDENTIFYING_TAG_SET):
      if end > len(data):
        data = buf.need(end)
      identifying.append((vr, data[start:end]))
    elif vr == "UN":   # pydicom looks the VR up (a name or date?): it decides
      unknown_vr = True
    if tag in _BY_TAG:
      if end > len(data):
        data = buf.need(end)
      values[tag] = (vr, data[start:end])
    elif group & 1 and 0x10 <= elem <= 0xFF:
      if end > len(data):
        data = buf.need(end)
      creators[(group, elem)] = data[start:end]
    elif group & 1:
      if elem >= 0x1000 and (group, elem & 0xFF) in PRIVATE_VALUES:
        if end > len(data):
          data = buf.need(end)
        values[tag] = (vr, data[start:end])
        private_values = True
      else:
        values[tag] = (vr, b"")  # private element: presence only
    elif end > size:
      raise Unsupported("element runs past the end of the file")
    pos = end
  header = Header(path, values, creators, meta, implicit, size, pixel_tag,
                  pixel_value, pixel_length)
  header.has_private_values = private_values
  header.identifying = None if implicit or unknown_vr else identifying
  return header
