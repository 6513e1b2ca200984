"""Coverage rule: which body-axis bands the scan covers (multi-label).

Evidence order: BodyPartExamined (vendor spellings normalised: upper case,
no spaces/underscores/hyphens), then SeriesDescription, ProtocolName and
StudyDescription keywords (union of every region named in the first field that
names one: 'CT CHEST ABD PELVIS' -> lung|liver|kidney|intestine|pelvis).

The physical extent along the body axis (ExtentSI, mm) then refines the set,
on a nominal adult body axis (mm from the vertex; ``BAND_RANGES_MM``):

  brain 0-120, head 120-200, neck 200-300, lung 300-550, breast 330-480
  (off-axis, kept only when named), liver 520-690, kidney 590-720,
  intestine 640-900, pelvis 760-960.

* extent shorter than the named span: the scan is placed at the top of the
  span (scan ranges start at the upper landmark) and keeps the named bands it
  mostly covers (>= half of the band, or >= half of the scan lies in it): a
  40 mm 'ABDOMEN' slab -> liver;
* extent longer than the named span (by ``EXPAND_MARGIN_MM``): the scan is
  centred on the span and gains every band it covers >= 60 %: a 1000 mm
  'CHEST' -> all axial bands.
"""
from __future__ import annotations

import functools

from radnet_jax.labels.fields import Fields, keywords, norm_desc, quote
from radnet_jax.labels.geometry import extent_si
from radnet_jax.labels.taxonomy import COVERAGE_BANDS, Label, unknown

BAND_RANGES_MM = {
    "brain": (0.0, 120.0), "head": (120.0, 200.0), "neck": (200.0, 300.0),
    "lung": (300.0, 550.0), "breast": (330.0, 480.0), "liver": (520.0, 690.0),
    "kidney": (590.0, 720.0), "intestine": (640.0, 900.0),
    "pelvis": (760.0, 960.0)}
EXPAND_MARGIN_MM = 100.0
EXPAND_MIN_FRACTION = 0.6
_AXIAL_BANDS = tuple(b for b in COVERAGE_BANDS if b != "breast")

ABDOMEN = ("liver", "kidney", "intestine")
ABD_PELVIS = ABDOMEN + ("pelvis",)
CAP = ("lung",) + ABD_PELVIS

# BodyPartExamined (normalised) -> bands; () = outside every band (limbs);
# None = says nothing about the bands (too vague).
BODY_PART_BANDS: dict[str, tuple | None] = {
    **dict.fromkeys(["BRAIN", "HEAD", "SKULL", "CRANIUM", "CEREBRUM", "NEURO",
                     "SCHAEDEL", "SCHADEL", "CRANE", "CRANIAL"], ("brain",)),
    **dict.fromkeys(["HEADNECK", "HEADANDNECK", "HN", "HNC", "HEADNECKCHEST"],
                    ("head", "neck")),
    **dict.fromkeys(["SINUS", "SINUSES", "ORBIT", "ORBITS", "FACE", "IAC", "EAR",
                     "TEMPORALBONE", "MANDIBLE", "JAW", "TMJ", "NASOPHARYNX",
                     "OROPHARYNX", "ORALCAVITY", "TONGUE", "PAROTID", "PITUITARY"],
                    ("head",)),
    **dict.fromkeys(["NECK", "CSPINE", "THYROID", "LARYNX", "HYPOPHARYNX",
                     "PHARYNX", "TRACHEA", "HALS"], ("neck",)),
    **dict.fromkeys(["CHEST", "THORAX", "LUNG", "LUNGS", "MEDIASTINUM", "HEART",
                     "CARDIAC", "TSPINE", "ESOPHAGUS", "RIB", "RIBS", "STERNUM",
                     "THORAXCHEST", "PULMONARY", "CHESTLUNG"], ("lung",)),
    **dict.fromkeys(["BREAST", "LEFTBREAST", "RIGHTBREAST", "BREASTS", "MAMMA",
                     "BILATERALBREAST", "MAMMO"], ("breast",)),
    **dict.fromkeys(["CHESTABDOMEN", "CHESTABD", "THORAXABDOMEN", "THORAXABD"],
                    ("lung",) + ABDOMEN),
    **dict.fromkeys(["ABDOMEN", "ABD", "ABDO", "BAUCH", "BRZUCH"], ABDOMEN),
    **dict.fromkeys(["LIVER", "HEPATIC", "GALLBLADDER", "SPLEEN", "BILIARY"],
                    ("liver",)),
    **dict.fromkeys(["PANCREAS", "STOMACH", "ADRENAL", "DUODENUM"],
                    ("liver", "kidney")),
    **dict.fromkeys(["KIDNEY", "KIDNEYS", "RENAL"], ("kidney",)),
    **dict.fromkeys(["COLON", "BOWEL", "SMALLBOWEL", "INTESTINE", "SMALLINTESTINE"],
                    ("intestine",)),
    "LSPINE": ("kidney", "intestine"),
    **dict.fromkeys(["RECTUM", "SIGMOID", "ANUS"], ("intestine", "pelvis")),
    **dict.fromkeys(["ABDOMENPELVIS", "ABDPELVIS", "ABDPEL", "ABDOMENPELV",
                     "PELVISABDOMEN"], ABD_PELVIS),
    **dict.fromkeys(["PELVIS", "BONYPELVIS", "PROSTATE", "BLADDER", "CERVIX",
                     "UTERUS", "OVARY", "OVARIES", "VULVA", "VAGINA", "TESTIS",
                     "SCROTUM", "HIP", "HIPS", "SACRUM", "SSPINE", "BECKEN",
                     "ENDOMETRIUM"], ("pelvis",)),
    **dict.fromkeys(["CAP", "CHESTABDPELVIS", "CHESTABDOMENPELVIS", "TORSO",
                     "TRUNK", "THORAXABDOMENPELVIS", "CHESTABDPEL"], CAP),
    **dict.fromkeys(["WHOLEBODY", "WB", "TOTALBODY", "BODY", "GANZKOERPER",
                     "GANZKORPER"], COVERAGE_BANDS),
    **dict.fromkeys(["EXTREMITY", "ARM", "LEG", "THIGH", "CALF", "KNEE", "ANKLE",
                     "FOOT", "HAND", "WRIST", "ELBOW", "SHOULDER", "FEMUR",
                     "HUMERUS", "FOREARM", "LOWEREXTREMITY", "UPPEREXTREMITY",
                     "LOWERLIMB", "UPPERLIMB", "TIBIA", "FINGER", "TOE"], ()),
    **dict.fromkeys(["SPINE", "WHOLESPINE", "PHANTOM", "UNKNOWN", "OTHER",
                     "ABDOMENCHEST", "SKIN", "VASCULAR", "AORTA"], None),
}

# Description keywords -> bands (every region named in a field is unioned).
_DESC_REGIONS = (
    (keywords(r"BRAIN", r"HEAD(?! ?(?:&|AND|/|-)? ?NECK)", r"CRANI\w*", r"NEURO", r"SKULL", r"CEREBR\w*",
              r"SCHAE?DEL", r"GBM", r"GLIOMA", r"MENINGIOMA", r"MPRAGE", r"MP-RAGE"),
     ("brain",)),
    (keywords(r"HEAD ?(?:&|AND|/|-)? ?NECK", r"H ?& ?N", r"HN", r"HNSCC"),
     ("head", "neck")),
    (keywords(r"SINUS\w*", r"ORBITS?", r"FACE", r"FACIAL", r"MAXILLO\w*", r"IAC",
              r"TEMPORAL BONES?", r"MANDIBLE", r"NASOPHARYN\w*", r"OROPHARYN\w*",
              r"ORAL CAVITY", r"PAROTID", r"PITUITARY", r"SELLA"), ("head",)),
    (keywords(r"NECK", r"C-?SPINE", r"CERVICAL SPINE", r"THYROID", r"LARYN\w*",
              r"HALS"), ("neck",)),
    (keywords(r"CHEST", r"THORA\w*", r"THX", r"LUNGS?", r"PULM\w*", r"CARDIAC",
              r"HEART", r"CORONARY", r"MEDIASTIN\w*", r"T-?SPINE", r"LUNG SCREEN\w*",
              r"LDCT", r"LSS", r"THORAX"), ("lung",)),
    (keywords(r"BREASTS?", r"MAMM\w*", r"BILAT BREAST"), ("breast",)),
    (keywords(r"ABD", r"ABDO", r"ABDOM\w*", r"BAUCH", r"BRZUCH", r"ENTERO\w*"),
     ABDOMEN),
    (keywords(r"LIVER", r"HEPAT\w*", r"HCC", r"BILIARY", r"MRCP", r"SPLEEN"),
     ("liver",)),
    (keywords(r"PANCREA\w*", r"STOMACH", r"GASTRIC", r"ADRENALS?"), ("liver", "kidney")),
    (keywords(r"KIDNEYS?", r"RENAL", r"UROGRAM", r"URO"), ("kidney",)),
    (keywords(r"COLON\w*", r"BOWEL", r"COLONOGRAPHY", r"VIRTUAL COLON\w*"),
     ("intestine",)),
    (keywords(r"RECT\w*", r"SIGMOID"), ("intestine", "pelvis")),
    (keywords(r"PELVI\w*", r"PEL", r"PELV", r"PROSTAT\w*", r"BLADDER", r"CERVIX",
              r"UTER\w*", r"OVAR\w*", r"ENDOMETR\w*", r"HIPS?", r"BECKEN"),
     ("pelvis",)),
    # run-together spellings ('AbdPelvis 5.0 B30f', 'ThorAbdPel'): one word
    (keywords(r"ABD(?:OMEN|O)?PEL\w*"), ABD_PELVIS),
    (keywords(r"CAP", r"CTCAP", r"CTCAPC", r"TORSO", r"(?:CHEST|THOR)ABD(?:OMEN|O)?PEL\w*"), CAP),
    (keywords(r"WHOLE ?-?BODY", r"WB", r"TOTAL ?BODY", r"GANZKOE?RPER", r"SKULL ?BASE ?TO ?THIGH",
              r"VERTEX ?TO ?THIGH", r"EYES? ?TO ?THIGHS?", r"BASE ?TO ?THIGH"),
     COVERAGE_BANDS),
)
_DESC_KEYS = ("SeriesDescription", "ProtocolName", "StudyDescription")


def _ordered(bands) -> tuple:
  s = set(bands)
  return tuple(b for b in COVERAGE_BANDS if b in s)


def normalise_body_part(text: str) -> str:
  return "".join(ch for ch in text.upper() if ch.isalnum())


@functools.lru_cache(maxsize=1 << 17)
def _desc_regions(raw: str) -> tuple[tuple, str]:
  text = norm_desc(raw)
  bands, quotes = set(), []
  for regex, region in _DESC_REGIONS:
    m = regex.search(text)
    if m:
      bands.update(region)
      quotes.append(quote(m))
  return _ordered(bands), "+".join(quotes)


def coverage_from_evidence(f: Fields) -> Label | None:
  """Bands from BodyPartExamined, else descriptions, before the extent refinement."""
  raw = f.text("BodyPartExamined")
  if raw:
    key = normalise_body_part(raw)
    if key in BODY_PART_BANDS:
      bands = BODY_PART_BANDS[key]
      if bands is not None:
        return Label(_ordered(bands), f"bpe:BodyPartExamined={quote(raw.upper())}")
    else:
      bands, q = _desc_regions(raw)   # compound spellings ('CHEST_ABDOMEN')
      if bands:
        return Label(bands, f"bpe:BodyPartExamined~{q}")
  for key in _DESC_KEYS:
    text = f.text(key)
    if text:
      bands, q = _desc_regions(text)
      if bands:
        return Label(bands, f"desc:{key}~{q}")
  return None


def refine_by_extent(bands: tuple, extent_mm: float) -> tuple:
  """Named bands -> bands a scan of ``extent_mm`` along the body axis covers."""
  axial = [b for b in bands if b != "breast"]
  if not axial:
    return bands
  top = min(BAND_RANGES_MM[b][0] for b in axial)
  bottom = max(BAND_RANGES_MM[b][1] for b in axial)
  span = bottom - top
  out = set(b for b in bands if b == "breast")
  if extent_mm > span + EXPAND_MARGIN_MM:
    centre = 0.5 * (top + bottom)
    lo, hi = centre - extent_mm / 2, centre + extent_mm / 2
    for b in _AXIAL_BANDS:
      b_lo, b_hi = BAND_RANGES_MM[b]
      if b in axial or max(0.0, min(hi, b_hi) - max(lo, b_lo)) >= EXPAND_MIN_FRACTION * (b_hi - b_lo):
        out.add(b)
    return _ordered(out)
  if extent_mm >= span:
    return bands
  lo, hi = top, top + extent_mm
  for b in axial:
    b_lo, b_hi = BAND_RANGES_MM[b]
    overlap = max(0.0, min(hi, b_hi) - max(lo, b_lo))
    if overlap >= 0.5 * (b_hi - b_lo) or overlap >= 0.5 * extent_mm:
      out.add(b)
  return _ordered(out)


def coverage_label(f: Fields, plane: Label | None = None) -> Label:
  """Coverage bands (tuple in COVERAGE_BANDS order) with provenance."""
  lab = coverage_from_evidence(f)
  if lab is None:
    return unknown("no BodyPartExamined or region keyword")
  ext = extent_si(f, plane)
  if ext is None or not lab.value:
    return lab
  mm, source = ext
  refined = refine_by_extent(lab.value, mm)
  if refined == lab.value:
    return Label(lab.value, f"{lab.provenance}+extent:{source}={mm:.0f}mm")
  if not refined:
    return unknown(f"{lab.provenance} but extent:{source}={mm:.0f}mm covers no band")
  return Label(refined, f"{lab.provenance}+extent:{source}={mm:.0f}mm (refined)")
