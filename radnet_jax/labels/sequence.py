"""Sequence rule: CT, T1, T2, T1-FLAIR, T2-FLAIR (+ PT, PD, DWI, ADC), or OTHER.

Order of evidence (first decisive wins):

1. object type: Modality / SOPClassUID (non-image objects, secondary capture,
   spectroscopy, PET, CT, other image modalities) and localizers
   (ImageType LOCALIZER or a scout/topogram description);
2. MR purpose that is not a weighting (angiography, perfusion, BOLD,
   susceptibility, parametric maps, subtractions, MIPs, bSSFP) from ImageType,
   SequenceName, then descriptions, and diffusion (DWI / ADC) from ImageType,
   DiffusionBValue, SequenceName ('*ep_b1000'), then descriptions;
3. MR weighting from acquisition tags: ScanningSequence / SequenceVariant /
   ScanOptions / SequenceName families (SE, IR, GR, EP) with TE / TR / TI
   thresholds (ms, for 1.5-3 T):

   ==========  =====================================================
   T2-FLAIR    IR without GR, TI >= 1500, TE >= 50
   T1-FLAIR    IR without GR, 600 <= TI < 1500, TE <= 40
   T2 (STIR)   IR, TI < 300: fat-nulled, T2-like contrast (decision:
               STIR counts as T2)
   T1          IR + GR (MPRAGE, IR-FSPGR), TI < 1500
   T1          GR (no EP), TE <= 10 (spoiled GRE: SPGR, FLASH, VIBE)
   OTHER       GR (no EP), TE >= 15 (T2*-weighted GRE, SWI)
   T2          SE, TE >= 60
   T1          SE, TE <= 30, TR <= 1000
   PD          SE, TE <= 30, TR >= 1800
   ==========  =====================================================

4. MR weighting from descriptions (SeriesDescription, ProtocolName,
   SequenceName), table ``_WEIGHTING_DESC``.

When tags and a description disagree on the weighting, the tags win and the
provenance says so.

Volumes that scan split out of a multi-volume series carry their key: a b0
volume of a diffusion series (DiffusionBValue 0 or absent, SeriesBValues with
b > 0) is DWI, not the T2 its spin-echo EPI tags suggest; a time point
(``time_point``) is a DCE phase when T1-weighted, fMRI/perfusion (OTHER)
when EPI; in the paper taxonomy time points are ``unknown`` (see
``sequence_label``). Classes outside the chosen taxonomy (PT, PD, DWI, ADC under
``paper``) become ``OTHER``, with the reason in the provenance.
"""
from __future__ import annotations

import functools
import re

from radnet_jax.labels.fields import Fields, keywords, norm_desc, quote
from radnet_jax.labels.taxonomy import OTHER, Label, Taxonomy, unknown

# --- object type ---------------------------------------------------------------

NON_IMAGE_MODALITIES = frozenset({
    "SR", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "RTTREAT", "PR",
    "KO", "ANN", "REG", "M3D", "RWV", "DOC", "RAW", "PLAN", "AU", "ECG", "HD",
    "FID", "IOL", "LEN", "OPTBSV", "POS", "STAIN", "TEXTUREMAP", "BI", "EPS",
    "SMR", "VA", "HC", "FUSION"})
_SOP_PREFIX = "1.2.840.10008.5.1.4.1.1."
_SOP_MODALITY = {"2": "CT", "2.1": "CT", "2.2": "CT", "4": "MR", "4.1": "MR",
                 "4.4": "MR", "128": "PT", "128.1": "PT", "130": "PT"}
_SOP_OTHER = (("7", "secondary capture"), ("4.2", "MR spectroscopy"),
              ("66", "raw data"), ("88", "structured report"),
              ("104", "encapsulated document"), ("481", "RT object"),
              ("11", "presentation state"))

_LOCALIZER_IMAGETYPE = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM"})
_LOCALIZER_DESC = keywords(
    r"LOCALI[ZS]ERS?", r"LOC", r"SCOUTS?", r"TOPOGRAM", r"SURVIEW", r"SURVEY",
    r"SCANOGRAM", r"PILOT", r"TRI-?PILOT", r"3[ -]?PL(ANE)?( LOC)?",
    r"TRI-?PLANE", r"AA ?HEAD ?SCOUT", r"LOCATOR", r"PLANNING")

# --- MR purposes that are not a T1/T2 weighting ----------------------------------

_OTHER_IMAGETYPE = {
    "MIP": "maximum intensity projection", "MINIP": "projection",
    "PROJECTION IMAGE": "projection", "SUBTRACTION": "subtraction",
    "SUB": "subtraction", "PERFUSION": "perfusion", "FA": "FA map",
    "TENSOR": "diffusion tensor map", "EXP": "exponential ADC map",
    "T1 MAP": "T1 map", "T2 MAP": "T2 map", "T2_MAP": "T2 map",
    "FIELD_MAP": "field map", "FIELDMAP": "field map", "ANGIO": "angiography",
    "MOCO": "motion-corrected fMRI", "SWI": "susceptibility", "CBF": "perfusion",
    "CBV": "perfusion", "MTT": "perfusion", "TOF": "angiography",
    "FLOW_ENCODED": "phase contrast", "VELOCITY": "phase contrast",
    "FMRI": "fMRI", "SPECTROSCOPY": "spectroscopy"}
# Enhanced MR 'image flavor' (ImageType value 3) naming the weighting.
_IMAGETYPE_WEIGHTING = {"T1": "T1", "T2": "T2", "PROTON_DENSITY": "PD", "STIR": "T2"}
_OTHER_DESC = (
    ("angiography", keywords(r"TOF", r"MRA", r"CE-?MRA", r"ANGIO\w*", r"MRV",
                             r"PHASE CONTRAST", r"PC-?MRA", r"VENC", r"Q-?FLOW",
                             r"FLOW", r"VELOCITY")),
    ("perfusion", keywords(r"PERFUSION", r"PERF", r"DSC", r"P?C?ASL", r"CBF",
                           r"R?CBV", r"MTT", r"TTP", r"EP2D PERF")),
    ("spectroscopy", keywords(r"SPECTRO\w*", r"MRS", r"SVS", r"CSI")),
    ("fMRI", keywords(r"BOLD", r"F-?MRI", r"RESTING", r"REST ?STATE", r"EP2D BOLD")),
    ("T2*/susceptibility", keywords(r"SWI", r"SWAN", r"SWIP", r"T2 ?\*", r"T2 ?STAR",
                                    r"MEDIC", r"HEMO", r"SUSCEPTIBILITY")),
    ("parametric map", keywords(r"T1 ?MAP", r"T2 ?MAP", r"T1 ?RHO", r"MOLLI",
                                r"FIELD ?MAP", r"B[01] ?MAP", r"FA", r"COLFA",
                                r"TENSOR", r"EADC", r"KTRANS", r"MAGIC")),
    ("bSSFP", keywords(r"TRUE? ?FISP", r"TRUFI", r"FIESTA", r"B-?FFE", r"BTFE",
                       r"SSFP")),
    ("projection", keywords(r"MIP", r"MINIP", r"MIN IP", r"MAX IP")),
    ("subtraction", keywords(r"SUB", r"SUBS", r"SUBTRACT\w*")),
    ("calibration", keywords(r"CALIBRATION", r"ASSET ?CAL", r"CAL", r"COIL ?SENS\w*",
                             r"SENSE ?REF", r"PRESCAN", r"SHIM")),
)
_ADC_DESC = keywords(r"ADC", r"APPARENT DIFFUSION( COEFFICIENT)?", r"ADC ?MAP")
_DWI_DESC = keywords(r"DWI", r"DWIBS", r"DIFFUSION", r"DIFF", r"\w*ADVDIFF\w*",
                     r"EP2D ?DIFF\w*", r"DTI", r"TRACE ?W?", r"DW", r"DW-?\w*",
                     r"B ?-?VALS?", r"B ?\d{3,4}", r"CALC BVAL")

# --- MR weighting from acquisition tags ------------------------------------------

# Siemens/GE/Philips sequence names -> families (same meaning as ScanningSequence).
_SEQNAME_FAMILY = (
    (re.compile(r"TIR|SPCIR|IR"), "IR"),
    (re.compile(r"TSE|FSE|SE\d|H2D|H3D|SPC|HASTE|FRFSE"), "SE"),
    (re.compile(r"TFL"), "GR+MP"),
    (re.compile(r"FL\d|FGRE|SPGR|GRE|FFE|VIBE|FLASH"), "GR"),
    (re.compile(r"EP"), "EP"),
)
_SEQNAME_OTHER = ((re.compile(r"TFI|TRUFI|FIESTA"), "bSSFP"),
                  (re.compile(r"SWI"), "susceptibility"),
                  (re.compile(r"FM\dD"), "field map"),
                  (re.compile(r"FL3D1R_T|TOF"), "angiography"))
_SEQNAME_DWI = re.compile(r"EP_B\d|EP2D_DIFF|\*EP_B")

# Thresholds in ms (see the module docstring).
FLAIR_T2_MIN_TI = 1500.0
FLAIR_T1_TI = (600.0, 1500.0)
STIR_MAX_TI = 300.0
SE_T2_MIN_TE = 60.0
SE_SHORT_TE = 30.0
SE_T1_MAX_TR = 1000.0
SE_PD_MIN_TR = 1800.0
GR_T1_MAX_TE = 10.0
GR_T2STAR_MIN_TE = 15.0

# --- MR weighting from descriptions (first row with a match wins) -----------------

_WEIGHTING_DESC = (
    ("T1-FLAIR", {"T1-FLAIR": keywords(r"T1 ?-?W?I? ?-?FLAIR\w*", r"FLAIR ?-?T1W?")}),
    ("T2-FLAIR", {"T2-FLAIR": keywords(r"T2 ?-?W?I? ?-?FLAIR\w*", r"FLAIR ?-?T2W?",
                                       r"FLAIR\w*", r"DARK ?-?FLUID",
                                       left=r"(?<![A-Z])")}),
    ("STIR", {"T2": keywords(r"STIR", r"TIRM", r"T2 ?-?TIRM")}),
    ("explicit weighting", {
        "T1": keywords(r"T1-?W?I?", r"T1FFE", r"T1TFE", r"T1 ?SE", left=r"(?<![A-Z0-9])"),
        "T2": keywords(r"T2-?W?I?", r"T2FFE", r"T2TSE\w*", r"T2FSE\w*"),
        "PD": keywords(r"PD-?W?I?", r"PROTON DENSITY", r"PDFS", r"PD ?-?TSE")}),
    ("vendor sequence name", {
        "T1": keywords(r"MP-?RAGE", r"MP2RAGE", r"F?SPGR", r"IR-?FSPGR", r"BRAVO",
                       r"\w*VIBE", r"LAVA\w*", r"E?-?THRIVE", r"FLASH", r"FL[23]D",
                       r"TFL", r"VIBRANT\w*", r"DCE", r"DYN\w*", r"MULTI ?-?PHASE",
                       r"TFE", r"3D ?GRE", r"IN ?-?PHASE", r"OUT ?-?(OF ?-?)?PHASE",
                       r"OPP(OSED)?", r"IN ?-?OUT", r"GRASP", r"QUICK ?3D"),
        "T2": keywords(r"TSE\d*", r"FSE", r"FRFSE", r"FR-FSE", r"HASTE", r"SS-?FSE",
                       r"SSH(-?TSE)?", r"RARE", r"BLADE", r"PROPELLER", r"DWSSFSE")}),
)

_DESC_KEYS = ("SeriesDescription", "ProtocolName", "SequenceName")


def _other_from_desc(text: str) -> tuple[str, str] | None:
  for reason, regex in _OTHER_DESC:
    m = regex.search(text)
    if m:
      return reason, quote(m)
  return None


@functools.lru_cache(maxsize=1 << 17)
def _desc_analysis(raw: str) -> tuple:
  """Cached (purpose, weighting) reading of one description.

  purpose: None | ("OTHER", reason, quote) | ("ADC"|"DWI", "", quote) |
    ("LOCALIZER", "", quote)
  weighting: None | (class | None, quote or reason); class None = ambiguous.
  """
  text = norm_desc(raw)
  purpose = None
  m = _LOCALIZER_DESC.search(text)
  if m:
    purpose = ("LOCALIZER", "localizer", quote(m))
  else:
    other = _other_from_desc(text)
    if other:
      purpose = ("OTHER", other[0], other[1])
    else:
      for cls, regex in (("ADC", _ADC_DESC), ("DWI", _DWI_DESC)):
        m = regex.search(text)
        if m:
          purpose = (cls, "", quote(m))
          break
  weighting = None
  for _, table in _WEIGHTING_DESC:
    hits = {}
    for cls, regex in table.items():
      m = regex.search(text)
      if m:
        hits[cls] = quote(m)
    if len(hits) == 1:
      (cls, q), = hits.items()
      weighting = (cls, q)
      break
    if len(hits) > 1:
      weighting = (None, "+".join(sorted(hits.values())))
      break
  return purpose, weighting


def _families(f: Fields) -> tuple[set, set, str]:
  """Sequence families from ScanningSequence/ScanOptions/SequenceVariant/SequenceName."""
  fam = set(f.multi("ScanningSequence"))
  evidence = []
  if fam:
    evidence.append("ScanningSequence=" + "\\".join(sorted(fam)))
  options = set(f.multi("ScanOptions"))
  if "IR" in options:
    fam.add("IR")
    evidence.append("ScanOptions=IR")
  variant = set(f.multi("SequenceVariant"))
  if "MP" in variant:
    fam.add("MP")
  other = set()
  name = f.upper("SequenceName").replace(" ", "")
  if name:
    hit = False
    for regex, what in _SEQNAME_OTHER:
      if regex.search(name):
        other.add(what)
        hit = True
    for regex, what in _SEQNAME_FAMILY:
      if regex.search(name):
        fam.update(what.split("+"))
        hit = True
        break
    if hit:
      evidence.append("SequenceName")
  return fam, other, ",".join(evidence)


def _ms(value: float | None) -> str:
  return "?" if value is None else f"{value:g}"


def _weighting_from_tags(f: Fields) -> tuple[str, str] | None:
  """(class, provenance) from ScanningSequence/TE/TR/TI, or None if undecided."""
  fam, other, evidence = _families(f)
  te, tr, ti = f.number("EchoTime"), f.number("RepetitionTime"), f.number("InversionTime")
  if ti is not None and ti <= 0:
    ti = None
  if not fam:
    return None
  prov = f"tag:{evidence},TE={_ms(te)},TR={_ms(tr)},TI={_ms(ti)}"
  if other:
    return OTHER, f"tag:SequenceName ({', '.join(sorted(other))})"
  if "IR" in fam and "GR" not in fam and "EP" not in fam:
    if ti is None:
      if te is not None and tr is not None and te >= 70 and tr >= 5000:
        return "T2-FLAIR", prov
      return None
    if ti >= FLAIR_T2_MIN_TI and (te is None or te >= 50):
      return "T2-FLAIR", prov
    if FLAIR_T1_TI[0] <= ti < FLAIR_T1_TI[1] and (te is None or te <= 40):
      return "T1-FLAIR", prov
    if ti < STIR_MAX_TI:
      return "T2", prov + " (STIR)"
    return None
  if "IR" in fam and "GR" in fam:
    if (ti is None or ti < FLAIR_T2_MIN_TI) and (te is None or te <= GR_T1_MAX_TE):
      return "T1", prov + " (IR-prepared GRE)"
    return None
  if "EP" in fam:
    return None   # EPI without diffusion evidence: BOLD/perfusion/other
  if "GR" in fam:
    if te is None:
      return None
    if te <= GR_T1_MAX_TE:
      return "T1", prov
    if te >= GR_T2STAR_MIN_TE:
      return OTHER, prov + " (T2*-weighted GRE)"
    return None
  if "SE" in fam:
    if te is None:
      return None
    if te >= SE_T2_MIN_TE:
      return "T2", prov
    if te <= SE_SHORT_TE and tr is not None:
      if tr <= SE_T1_MAX_TR:
        return "T1", prov
      if tr >= SE_PD_MIN_TR:
        return "PD", prov
  return None


def _modality(f: Fields) -> tuple[str, str]:
  """(modality, provenance); modality from SOPClassUID when the tag is missing."""
  mod = f.upper("Modality")
  if mod:
    return mod, f"modality:Modality={mod}"
  sop = f.text("SOPClassUID")
  if sop.startswith(_SOP_PREFIX):
    mod = _SOP_MODALITY.get(sop[len(_SOP_PREFIX):], "")
    if mod:
      return mod, f"tag:SOPClassUID ({mod} storage)"
  return "", ""


def _sop_other(f: Fields) -> str | None:
  sop = f.text("SOPClassUID")
  if not sop.startswith(_SOP_PREFIX):
    return None
  rest = sop[len(_SOP_PREFIX):]
  for prefix, what in _SOP_OTHER:
    if rest == prefix or rest.startswith(prefix + "."):
      return what
  return None


def is_image_object(record_or_fields) -> bool:
  """False for SR, SEG, RTSTRUCT, presentation states and other non-images."""
  f = record_or_fields if isinstance(record_or_fields, Fields) else Fields(record_or_fields)
  return f.upper("Modality") not in NON_IMAGE_MODALITIES


def _descriptions(f: Fields):
  for key in _DESC_KEYS:
    text = f.text(key)
    if text:
      yield key, text, _desc_analysis(text)


def sequence_class(f: Fields) -> Label:
  """Sequence label over the extended class set (before taxonomy mapping)."""
  mod, mod_prov = _modality(f)
  if mod in NON_IMAGE_MODALITIES:
    return Label(OTHER, f"{mod_prov} (not an image)")
  sop_other = _sop_other(f)
  if sop_other:
    return Label(OTHER, f"tag:SOPClassUID ({sop_other})")
  image_type = f.multi("ImageType")
  loc = _LOCALIZER_IMAGETYPE.intersection(image_type)
  if loc:
    return Label(OTHER, f"tag:ImageType={sorted(loc)[0]} (localizer)")
  descs = list(_descriptions(f))
  for key, _, (purpose, _) in descs:
    if purpose and purpose[0] == "LOCALIZER":
      return Label(OTHER, f"desc:{key}~{purpose[2]} (localizer)")
  if mod == "CT":
    return Label("CT", mod_prov)
  if mod in ("PT", "PET"):
    return Label("PT", mod_prov)
  if mod and mod != "MR":
    return Label(OTHER, f"{mod_prov} (outside the sequence taxonomy)")
  if mod == "MR":
    return _mr_sequence(f, image_type, descs)
  # No modality: only an unmistakable MR description decides.
  for key, _, (purpose, weighting) in descs:
    if weighting and weighting[0]:
      return Label(weighting[0], f"desc:{key}~{weighting[1]} (no Modality)")
  return unknown("no Modality, SOPClassUID or sequence description")


def _mr_sequence(f: Fields, image_type: tuple, descs: list) -> Label:
  # Purpose from tags.
  for token in image_type:
    if token in _OTHER_IMAGETYPE:
      return Label(OTHER, f"tag:ImageType={token} ({_OTHER_IMAGETYPE[token]})")
  if "ADC" in image_type:
    return Label("ADC", "tag:ImageType=ADC")
  if "DIFFUSION" in image_type or "TRACEW" in image_type:
    return Label("DWI", "tag:ImageType=DIFFUSION")
  b = f.number("DiffusionBValue")
  if b is not None and b > 0:
    return Label("DWI", f"tag:DiffusionBValue={b:g}")
  directionality = f.upper("DiffusionDirectionality")
  if directionality in ("DIRECTIONAL", "ISOTROPIC", "BMATRIX"):
    return Label("DWI", f"tag:DiffusionDirectionality={directionality}")
  series_b = f.numbers("SeriesBValues") or ()
  if (b is None or b == 0) and any(v > 0 for v in series_b):
    return Label("DWI", "tag:DiffusionBValue=0 (b0 volume of a diffusion "
                        f"series with b={','.join(f'{v:g}' for v in series_b)})")
  if _SEQNAME_DWI.search(f.upper("SequenceName")):
    return Label("DWI", "tag:SequenceName (diffusion EPI)")
  # Purpose from descriptions.
  for key, _, (purpose, _) in descs:
    if purpose:
      kind, reason, q = purpose
      if kind == "OTHER":
        return Label(OTHER, f"desc:{key}~{q} ({reason})")
      return Label(kind, f"desc:{key}~{q}")
  # Weighting: tags first, descriptions second.
  desc_w = None
  for key, _, (_, weighting) in descs:
    if weighting:
      desc_w = (key, weighting)
      break
  tag_w = _weighting_from_tags(f)
  if tag_w is None and len(image_type) > 2 and image_type[2] in _IMAGETYPE_WEIGHTING:
    tag_w = (_IMAGETYPE_WEIGHTING[image_type[2]], f"tag:ImageType={image_type[2]}")
  if tag_w:
    cls, prov = tag_w
    if desc_w and desc_w[1][0] and desc_w[1][0] != cls:
      prov += f" (tags win over desc:{desc_w[0]}~{desc_w[1][1]} = {desc_w[1][0]})"
    return Label(cls, prov)
  if desc_w:
    key, (cls, q) = desc_w
    if cls is None:
      return unknown(f"desc:{key} names several weightings {q}")
    return Label(cls, f"desc:{key}~{q}")
  return unknown("MR without decisive sequence tags or description")


# Splits (scan's ``VolumeSplitBy``) that make the volumes time points.
_TEMPORAL_SPLITS = frozenset({
    "TemporalPositionIdentifier", "TemporalPositionIndex", "AcquisitionNumber",
    "TriggerTime", "AcquisitionTime", "InstanceNumber order", "frame order",
    "file"})
_DIFFUSION_SPLITS = frozenset({"DiffusionBValue", "DiffusionGradientOrientation"})


def time_point(f: Fields) -> tuple[int, int] | None:
  """(index, count) when the record is one time point of a multi-volume
  series (fMRI, perfusion, DCE: scan's VolumeIndex / NumberOfVolumes split by
  a temporal key), else None. Diffusion volumes are not time points."""
  n, i = f.number("NumberOfVolumes"), f.number("VolumeIndex")
  if n is None or i is None or n < 2:
    return None
  split = set(f.text("VolumeSplitBy").split("+"))
  if split & _DIFFUSION_SPLITS or not split & _TEMPORAL_SPLITS:
    return None
  if any(v > 0 for v in (f.numbers("SeriesBValues") or ())):
    return None
  return int(i), int(n)


def _time_series_class(f: Fields, lab: Label, point: tuple[int, int]) -> Label:
  """A time point's class: a T1-weighted one is a DCE phase; an EPI one
  without a weighting is fMRI or perfusion (``OTHER``)."""
  i, n = point
  where = f"time point {i + 1}/{n}"
  if lab.value == "T1":
    return Label("T1", f"{lab.provenance} (DCE {where})")
  if not lab.known:
    fam, _, _ = _families(f)
    if "EP" in fam:
      return Label(OTHER, f"tag:ScanningSequence=EP (EPI {where}: fMRI or "
                          "perfusion)")
  if lab.known:
    return Label(lab.value, f"{lab.provenance} ({where})")
  return lab


def sequence_label(f: Fields, taxonomy: Taxonomy) -> Label:
  """Sequence label mapped into ``taxonomy`` (classes outside it -> OTHER).

  Time points of a multi-volume series (DCE phases, fMRI/perfusion volumes)
  keep their class in the extended taxonomy; the paper's classes describe
  static series, so there a time point whose class is in the taxonomy is
  ``unknown`` (masked) with the reason, rather than dozens of near-identical
  "T1" or "T2" volumes from one dynamic series.
  """
  lab = sequence_class(f)
  point = time_point(f)
  if point is not None:
    lab = _time_series_class(f, lab, point)
    if (taxonomy.name == "paper" and lab.known and lab.value != OTHER):
      return unknown(f"{lab.provenance}: a time point of a dynamic series, "
                     f"{lab.value} has no dynamic class in the 'paper' taxonomy")
  if lab.known and lab.value != OTHER and lab.value not in taxonomy.sequence:
    return Label(OTHER, f"{lab.provenance} ({lab.value}: not in the "
                        f"'{taxonomy.name}' taxonomy)")
  return lab
