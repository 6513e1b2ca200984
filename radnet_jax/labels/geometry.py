"""Plane and spacing rules, and the body-axis extent used by coverage.

Plane: the slice normal n = row x col of ImageOrientationPatient (LPS); the
largest |component| names the plane (x -> SAG, y -> COR, z -> AX), so oblique
acquisitions get the nearest plane (the provenance gives the obliquity in
degrees). Descriptions ('AX', 'tra', 'COR', 'SAG', ...) are only a fallback.

Spacing (mm): SliceSpacing (measured from slice positions) first, then
SpacingBetweenSlices, then SliceThickness.
"""
from __future__ import annotations

import functools
import math

from radnet_jax.labels.fields import Fields, keywords, norm_desc, quote
from radnet_jax.labels.taxonomy import Label, unknown

_AXIS_PLANE = ("SAG", "COR", "AX")
_PLANE_DESC = {
    "AX": keywords(r"AX", r"AXI", r"AXIAL", r"TRA", r"TRANS", r"TRANSVERSE?",
                   r"TRANSVERSAL", r"AXL"),
    "COR": keywords(r"COR", r"CORO?", r"CORONAL", r"CORONALE?"),
    "SAG": keywords(r"SAG", r"SAGITTAL", r"SAGITALE?", r"SAGITAL"),
}
_PLANE_DESC_KEYS = ("SeriesDescription", "ProtocolName")
# Plausible slice spacing (mm); outside this the tag is treated as garbage.
SPACING_RANGE_MM = (0.01, 100.0)


def slice_normal(iop) -> tuple[float, float, float] | None:
  """Unit slice normal (LPS) from the 6 direction cosines, or None if invalid."""
  if iop is None or len(iop) != 6:
    return None
  r, c = iop[:3], iop[3:]
  n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
  norm = math.sqrt(sum(v * v for v in n))
  if not norm > 1e-3:
    return None
  return tuple(v / norm for v in n)


def plane_from_iop(f: Fields) -> Label | None:
  normal = slice_normal(f.numbers("ImageOrientationPatient"))
  if normal is None:
    return None
  mags = [abs(v) for v in normal]
  axis = max(range(3), key=mags.__getitem__)
  prov = "iop:ImageOrientationPatient"
  tilt = math.degrees(math.acos(min(1.0, mags[axis])))
  if tilt >= 10:
    prov += f" (oblique {tilt:.0f} deg)"
  return Label(_AXIS_PLANE[axis], prov)


@functools.lru_cache(maxsize=1 << 17)
def _plane_desc(raw: str) -> tuple:
  text = norm_desc(raw)
  hits = {}
  for plane, regex in _PLANE_DESC.items():
    m = regex.search(text)
    if m:
      hits[plane] = quote(m)
  return tuple(sorted(hits.items()))


def plane_label(f: Fields) -> Label:
  """AX / COR / SAG from IOP, else from descriptions; unknown otherwise."""
  lab = plane_from_iop(f)
  if lab is not None:
    return lab
  bad_iop = bool(f.text("ImageOrientationPatient"))
  for key in _PLANE_DESC_KEYS:
    text = f.text(key)
    if not text:
      continue
    hits = _plane_desc(text)
    if len(hits) == 1:
      plane, q = hits[0]
      return Label(plane, f"desc:{key}~{q}")
    if len(hits) > 1:
      return unknown(f"desc:{key} names several planes "
                     + "+".join(q for _, q in hits))
  return unknown("invalid ImageOrientationPatient" if bad_iop
                 else "no ImageOrientationPatient or plane keyword")


def spacing_label(f: Fields) -> Label:
  """Slice spacing in mm: SliceSpacing > SpacingBetweenSlices > SliceThickness."""
  for key, rule in (("SliceSpacing", "geom"), ("SpacingBetweenSlices", "tag"),
                    ("SliceThickness", "tag")):
    value = f.number(key)
    if value is not None:
      value = abs(value)
      if SPACING_RANGE_MM[0] <= value <= SPACING_RANGE_MM[1]:
        return Label(float(value), f"{rule}:{key}")
  return unknown("no SliceSpacing, SpacingBetweenSlices or SliceThickness")


# Which canonical (D, H, W) axis runs along the body (S-I) axis, per plane
# (docs/architecture.md, canonical orientation).
_SI_AXIS = {"AX": 0, "COR": 1, "SAG": 1}


def extent_si(f: Fields, plane: Label | None = None) -> tuple[float, str] | None:
  """Scan length along the patient's superior-inferior axis (mm) and its source.

  ExtentSI first; else ExtentMM ([D, H, W] mm, canonical orientation) on the
  plane's S-I axis; else NumberOfSlices x slice spacing for axial stacks.
  """
  value = f.number("ExtentSI")
  if value is not None and value > 0:
    return value, "ExtentSI"
  plane = plane if plane is not None else plane_from_iop(f)
  if plane is None or plane.value not in _SI_AXIS:
    return None
  ext = f.numbers("ExtentMM")
  if ext is not None and len(ext) == 3 and ext[_SI_AXIS[plane.value]] > 0:
    return ext[_SI_AXIS[plane.value]], "ExtentMM"
  if plane.value == "AX":
    n = f.number("NumberOfSlices")
    sp = spacing_label(f)
    if n and n > 1 and sp.known:
      return n * sp.value, "NumberOfSlices*spacing"
  return None
