"""Label values written as text (curator CSVs, prior tables) -> Label values.

The text forms are those of the label report / ``label_index`` output:
sequence 'T1', 'T2-FLAIR', 'other'; plane 'AX'; contrast 'no'/'yes'; coverage
bands joined by '|' ('none' = no band); spacing in mm; 'unknown' clears.
"""
from __future__ import annotations

from radnet_jax.labels.taxonomy import (COVERAGE_BANDS, CONTRAST_CLASSES, OTHER,
                                        PLANE_CLASSES, SEQUENCE_CLASSES, TASKS,
                                        UNKNOWN, Taxonomy)

_PLANE_ALIASES = {"AXIAL": "AX", "TRA": "AX", "TRANSVERSE": "AX", "CORONAL": "COR",
                  "SAGITTAL": "SAG"}
_CONTRAST_ALIASES = {"NO": "no", "YES": "yes", "N": "no", "Y": "yes", "0": "no",
                     "1": "yes", "FALSE": "no", "TRUE": "yes"}


def parse_value(task: str, text: str, taxonomy: Taxonomy | str = "extended"):
  """Text -> label value (None = unknown). Raises ValueError with the reason.

  Returns a class name (sequence/plane/contrast), a tuple of bands in
  COVERAGE_BANDS order (coverage), or a float in mm (spacing).
  """
  tax = taxonomy if isinstance(taxonomy, Taxonomy) else Taxonomy(taxonomy)
  raw = str(text).strip()
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r} (tasks: {', '.join(TASKS)})")
  if raw.lower() == UNKNOWN:
    return None
  if task == "sequence":
    if raw.lower() == OTHER:
      return OTHER
    by_upper = {c.upper(): c for c in SEQUENCE_CLASSES[tax.name]}
    if raw.upper() in by_upper:
      return by_upper[raw.upper()]
    raise ValueError(f"bad sequence value {raw!r} (expected one of "
                     f"{', '.join(tax.sequence)}, other, unknown)")
  if task == "plane":
    up = _PLANE_ALIASES.get(raw.upper(), raw.upper())
    if up in PLANE_CLASSES:
      return up
    raise ValueError(f"bad plane value {raw!r} (expected AX, COR, SAG or unknown)")
  if task == "contrast":
    val = _CONTRAST_ALIASES.get(raw.upper())
    if val in CONTRAST_CLASSES:
      return val
    raise ValueError(f"bad contrast value {raw!r} (expected no, yes or unknown)")
  if task == "coverage":
    if raw.lower() in ("none", ""):
      return ()
    parts = [p.strip().lower() for p in raw.replace(",", "|").replace(";", "|").split("|")]
    bad = [p for p in parts if p not in COVERAGE_BANDS]
    if bad:
      raise ValueError(f"bad coverage band(s) {bad} in {raw!r} (bands: "
                       f"{'|'.join(COVERAGE_BANDS)}, or none/unknown)")
    return tuple(b for b in COVERAGE_BANDS if b in parts)
  try:
    mm = float(raw)
  except ValueError:
    raise ValueError(f"bad spacing value {raw!r} (expected mm > 0 or unknown)") from None
  if not 0 < mm < 1000:
    raise ValueError(f"bad spacing value {raw!r} (expected mm > 0 or unknown)")
  return mm


def value_text(value) -> str:
  """Label value -> the text written in reports ('unknown', 'none', 'a|b', ...)."""
  if value is None:
    return UNKNOWN
  if isinstance(value, tuple):
    return "|".join(value) if value else "none"
  if isinstance(value, float):
    return UNKNOWN if value != value else f"{value:.4g}"
  return str(value)
