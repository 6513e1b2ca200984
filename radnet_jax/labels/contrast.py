"""Contrast rule: IV contrast given (``yes``) or not (``no``).

1. ContrastBolus* tags: an agent name ('OMNIPAQUE', 'GADAVIST', 'Y', 'IV'),
   a positive volume, a start time or an ingredient -> yes; an explicit
   negative agent ('NONE', 'NO', 'N/A' ...) -> no. Oral-only contrast is not
   IV contrast: it does not decide, the descriptions do.
2. Descriptions, series level first (SeriesDescription, ProtocolName), study
   level last (StudyDescription). In each, mixed phrases ('W/WO', 'PRE AND
   POST', 'WITH AND WITHOUT') make the field ambiguous; negated phrases
   ('W/O CONTRAST', 'NON-CONTRAST', 'PRE', 'NC', 'PLAIN', 'NATIVE') are removed
   before looking for positive ones ('+C', 'C+', 'POST', 'GAD', 'W CONTRAST',
   'ENHANCED', 'ARTERIAL', 'VENOUS', 'PORTAL', 'DELAYED', agent brand names).
   A decisive series description wins over the study description; an
   ambiguous series description stops the search (the study cannot tell which
   half of a W/WO exam this series is).

When the tags and a description disagree, the tags win and the provenance
says so. A phase of a dynamic (DCE) series is decided by its own timing
first (``contrast_of_time_point``): acquired before ContrastBolusStartTime
-> no, at least ``CONTRAST_ARRIVAL_S`` after it -> yes, in between unknown.
"""
from __future__ import annotations

import functools
import re

from radnet_jax.labels.fields import Fields, keywords, norm_desc, quote
from radnet_jax.labels.taxonomy import Label, unknown

_AGENTS = (r"OMNIPAQUE", r"ISOVUE", r"VISIPAQUE", r"ULTRAVIST", r"OPTIRAY",
           r"IOPAMIDOL", r"IOHEXOL", r"IODIXANOL", r"IOPROMIDE", r"IOMERON",
           r"IMERON", r"XENETIX", r"GADAVIST", r"GADOVIST", r"MAGNEVIST",
           r"DOTAREM", r"CLARISCAN", r"MULTIHANCE", r"PROHANCE", r"OMNISCAN",
           r"EOVIST", r"PRIMOVIST", r"ABLAVAR", r"GADOBUTROL", r"GADOTERATE",
           r"GADOLINIUM", r"GADO\w*", r"GAD", r"GD(-?DTPA)?", r"CONRAY",
           r"OPTIMARK", r"VUEWAY", r"ELUCIREM")

_NEGATIVE_AGENT = frozenset({"NONE", "NO", "N", "NON", "NA", "N/A", "NIL", "0",
                             "-", "NO CONTRAST", "WITHOUT", "NONE GIVEN",
                             "NOT GIVEN", "FALSE", "NATIVE", "NATIV"})

_CONTRAST_WORD = r"(?: ?(?:IV|I\.V\.|ORAL))?(?: ?(?:CONTRAST|CONTR|CONT|CON|DYE|KM|GAD\w*|C))?"
_CONTRAST_NOUN = r"(?:CONTRAST|CONTR|CONT|CON|DYE|KM|GAD\w*|GD)"
_MIXED = keywords(
    r"W ?/ ?WO", r"WO ?/ ?W", r"W ?/ ?W/?O", r"W/?O ?/ ?W", r"W/? ?(?:&|AND) ?W/?O",
    r"W ?\+ ?W/?O", r"W-?WO", r"WWO", r"WITH (?:AND|&|/|OR) WITHOUT",
    r"WITHOUT (?:AND|&|/|OR) WITH", r"PRE ?(?:AND|&|/|\+|-) ?\d* ?POST\w*",
    r"\+/-", r"NON ?-?CON(?:TRAST)? ?(?:AND|&|/|\+) ?CON(?:TRAST)?",
    r"OHNE ?(?:UND|/|\+) ?MIT")
_NEGATED = keywords(
    r"W/ ?O" + _CONTRAST_WORD, r"WO" + _CONTRAST_WORD, r"W/OUT" + _CONTRAST_WORD,
    r"WITHOUT" + _CONTRAST_WORD, r"NO (?:IV ?|ORAL ?)?" + _CONTRAST_NOUN,
    r"NON ?-?CONTRAST(?:ED)?", r"NON ?-?CON", r"NONCON", r"NON ?-?ENHANCED",
    r"UNENHANCED", r"UN-ENHANCED", r"NC", r"NCCT", r"NECT", r"C-",
    r"PRE ?-?(?:CONTRAST|CON|GAD\w*|GD|INJ\w*)?", r"PRECONTRAST", r"PLAIN",
    r"NATIVE?", r"OHNE ?KM", r"SANS ?(?:INJ\w*|CONTRASTE)", r"BEZ ?KONTRAST\w*",
    r"MASK")
_PLUS_C = re.compile(r"\+ ?C(?![A-Z0-9])|(?<![A-Z0-9])C ?\+")
_POSITIVE = keywords(
    r"W ?/ ?C", r"W/ ?(?:IV ?)?" + _CONTRAST_NOUN, r"W (?:IV ?)?" + _CONTRAST_NOUN,
    r"WITH (?:IV ?)?" + _CONTRAST_NOUN, r"W ?/ ?IV", r"W IV", r"WITH IV",
    r"IV " + _CONTRAST_NOUN, r"CONTRAST", r"POST ?-?(?:CONTRAST|CON|GAD\w*|GD|INJ\w*)?",
    r"POSTCONTRAST", r"POST\d*", r"\d+ ?POST", r"ENHANCED", r"CE", r"CE-\w+",
    r"ARTERIAL", r"ART", r"VENOUS", r"PORTAL", r"PV", r"PVP", r"PORTAL ?-?VENOUS",
    r"DELAYED", r"NEPHRO\w*", r"EQUILIBRIUM", r"EXCRETORY", r"UROGRAPH\w*",
    r"MIT ?KM", r"KM", r"INJ", r"INJECTED", r"AVEC ?INJ\w*", *_AGENTS)
# 'POST'/'PRE' that are about surgery or treatment, not contrast.
_NOT_CONTRAST = keywords(
    r"(?:POST|PRE) ?-?(?:OP\w*|SURG\w*|TREAT\w*|TX|CHEMO\w*|RT|RAD\w*|THERAPY|"
    r"BIOPSY|PROC\w*|RESECTION|ABLATION|TACE|NAC|NACT|TRANSPLANT|VOID)",
    r"POSTERIOR", r"PREP\w*", r"PRESAT\w*", r"PRESCAN",
    # The DICOM "Enhanced" IODs (Enhanced MR / CT image, "Enhanced DICOM"
    # exports), not contrast enhancement.
    r"ENHANCED ?(?:DICOM|DCM|IOD|MULTI ?-?FRAME|MF|(?:MR|CT|PET) ?(?:IMAGE|STORAGE|OBJECT)S?)")
_CT_ANGIO = keywords(r"CTA", r"CT ?ANGIO\w*", r"ANGIO\w*", r"PULMONARY EMBOL\w*",
                     r"PE PROTOCOL")

_SERIES_KEYS = ("SeriesDescription", "ProtocolName")
_STUDY_KEYS = ("StudyDescription",)


@functools.lru_cache(maxsize=1 << 17)
def read_description(raw: str, is_ct: bool = False) -> tuple[str | None, str]:
  """One description -> ('yes'|'no'|'mixed'|None, quoted evidence)."""
  text = _NOT_CONTRAST.sub(" ", norm_desc(raw))
  m = _MIXED.search(text)
  if m:
    return "mixed", quote(m)
  neg = _NEGATED.search(text)
  rest = _NEGATED.sub(" ", text) if neg else text
  pos = _PLUS_C.search(rest) or _POSITIVE.search(rest)
  if pos is None and is_ct:
    pos = _CT_ANGIO.search(rest)
  if neg and pos:
    return "mixed", quote(neg) + "+" + quote(pos)
  if neg:
    return "no", quote(neg)
  if pos:
    return "yes", quote(pos)
  return None, ""


def contrast_from_tags(f: Fields) -> Label | None:
  route = f.upper("ContrastBolusRoute")
  raw_agent = f.raw("ContrastBolusAgent")
  # An explicit 'NONE' typed into the tag is evidence (not a missing value).
  agent = raw_agent.strip().upper() if isinstance(raw_agent, str) else f.upper(
      "ContrastBolusAgent")
  oral_only = route.startswith("ORAL") or route in ("PO", "PER OS")
  if agent:
    if agent in _NEGATIVE_AGENT or agent.startswith(("NO ", "NONE")):
      return Label("no", f"tag:ContrastBolusAgent={quote(agent)}")
    if oral_only or "ORAL" in agent.split():
      return None
    return Label("yes", f"tag:ContrastBolusAgent={quote(agent)}")
  if oral_only:
    return None
  volume = f.number("ContrastBolusVolume")
  if volume is not None and volume > 0:
    return Label("yes", f"tag:ContrastBolusVolume={volume:g}")
  for key in ("ContrastBolusStartTime", "ContrastBolusIngredient"):
    value = f.upper(key)
    if value and value not in _NEGATIVE_AGENT:
      return Label("yes", f"tag:{key}")
  if route and route not in _NEGATIVE_AGENT:
    return Label("yes", f"tag:ContrastBolusRoute={quote(route)}")
  return None


def contrast_from_descriptions(f: Fields) -> Label:
  is_ct = f.upper("Modality") == "CT"
  for level, keys in (("series", _SERIES_KEYS), ("study", _STUDY_KEYS)):
    for key in keys:
      text = f.text(key)
      if not text:
        continue
      value, q = read_description(text, is_ct)
      if value == "mixed":
        return unknown(f"desc:{key}~{q} is ambiguous at {level} level")
      if value:
        return Label(value, f"desc:{key}~{q}")
  return unknown("no ContrastBolus tags and no contrast keyword")


# Seconds from the start of an IV injection to the bolus reaching the
# arteries (~10-20 s): a phase that starts earlier may still be unenhanced.
CONTRAST_ARRIVAL_S = 10.0


def contrast_of_time_point(f: Fields) -> Label | None:
  """A dynamic series' phase before / after contrast arrival, from scan's
  ``VolumeTimeAfterBolusS`` (AcquisitionTime of the volume minus
  ContrastBolusStartTime); None when the record has no such timing."""
  t = f.number("VolumeTimeAfterBolusS")
  n, i = f.number("NumberOfVolumes"), f.number("VolumeIndex")
  if t is None or n is None or i is None or n < 2:
    return None
  where = f"phase {int(i) + 1}/{int(n)}"
  if t < 0:
    return Label("no", f"tag:AcquisitionTime {-t:g} s before "
                       f"ContrastBolusStartTime ({where}, before the injection)")
  if t >= CONTRAST_ARRIVAL_S:
    return Label("yes", f"tag:AcquisitionTime {t:g} s after "
                        f"ContrastBolusStartTime ({where}, after arrival)")
  return unknown(f"{where} starts {t:g} s after ContrastBolusStartTime, "
                 f"before the bolus surely arrives ({CONTRAST_ARRIVAL_S:g} s)")


def contrast_label(f: Fields) -> Label:
  """'yes' / 'no' with provenance; a dynamic phase's timing first, then
  tags, then descriptions."""
  phase = contrast_of_time_point(f)
  if phase is not None:
    return phase
  tag = contrast_from_tags(f)
  if tag is None:
    return contrast_from_descriptions(f)
  desc = contrast_from_descriptions(f)
  if desc.known and desc.value != tag.value:
    return Label(tag.value, f"{tag.provenance} (tags win over {desc.provenance} = {desc.value})")
  return tag
