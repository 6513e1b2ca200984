"""Tolerant access to metadata-record fields.

Records come from DICOM headers, CSV manifests and public metadata indexes, so
the same tag may arrive as a python list, a backslash-joined string, a number
written as text, ``None``, ``''``, ``NaN`` or pandas' ``<NA>``; keys may differ in
case. ``Fields`` hides all of that behind a few typed getters.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

_MISSING_TEXT = frozenset({"", "nan", "none", "null", "<na>", "nat", "n/a"})
_SPLIT_MULTI = re.compile(r"\s*[\\,;|]\s*")


def _is_missing(value: Any) -> bool:
  if value is None:
    return True
  if isinstance(value, float):
    return math.isnan(value)
  if isinstance(value, str):
    return value.strip().lower() in _MISSING_TEXT
  try:  # pandas.NA / numpy NaN scalars
    return bool(value != value)
  except (TypeError, ValueError):
    return False


def to_float(value: Any) -> float | None:
  """A finite float from a number, numeric text or one-element list; else None."""
  if isinstance(value, (list, tuple)):
    value = value[0] if len(value) else None
  if _is_missing(value):
    return None
  if isinstance(value, str):
    value = value.strip().split("\\")[0]
  try:
    out = float(value)
  except (TypeError, ValueError):
    return None
  return out if math.isfinite(out) else None


def to_text(value: Any) -> str:
  """Stripped text; lists are joined with backslashes; missing -> ''."""
  if isinstance(value, (list, tuple)):
    return "\\".join(to_text(v) for v in value if not _is_missing(v))
  if _is_missing(value):
    return ""
  return str(value).strip()


def to_multi(value: Any) -> tuple[str, ...]:
  """Multi-valued string tag -> upper-case tokens.

  Accepts a list, a backslash-joined string ('ORIGINAL\\\\PRIMARY\\\\AXIAL'), or
  the text of a python list ("['ORIGINAL', 'PRIMARY']").
  """
  if isinstance(value, (list, tuple)):
    items = [to_text(v) for v in value]
  else:
    text = to_text(value).strip("[]() ")
    items = _SPLIT_MULTI.split(text) if text else []
  return tuple(i.strip(" '\"").upper() for i in items if i.strip(" '\""))


def to_floats(value: Any) -> tuple[float, ...] | None:
  """Multi-valued number tag (IOP, PixelSpacing, ExtentMM) -> floats or None."""
  if isinstance(value, (list, tuple)):
    items = list(value)
  elif hasattr(value, "tolist") and not isinstance(value, str):
    items = list(value.tolist()) if getattr(value, "ndim", 1) else [value.item()]
  else:
    text = to_text(value).strip("[]() ")
    if not text:
      return None
    items = _SPLIT_MULTI.split(text)
  out = []
  for item in items:
    f = to_float(item)
    if f is None:
      return None
    out.append(f)
  return tuple(out) if out else None


class Fields:
  """Case-insensitive, type-tolerant view of a metadata record (read only)."""

  __slots__ = ("_record", "_lower")

  def __init__(self, record: Mapping[str, Any]):
    self._record = record
    self._lower = None

  def raw(self, key: str) -> Any:
    if key in self._record:
      return self._record[key]
    if self._lower is None:
      self._lower = {str(k).lower(): k for k in self._record}
    real = self._lower.get(key.lower())
    return None if real is None else self._record[real]

  def text(self, key: str) -> str:
    return to_text(self.raw(key))

  def upper(self, key: str) -> str:
    return to_text(self.raw(key)).upper()

  def number(self, key: str) -> float | None:
    return to_float(self.raw(key))

  def multi(self, key: str) -> tuple[str, ...]:
    return to_multi(self.raw(key))

  def numbers(self, key: str) -> tuple[float, ...] | None:
    return to_floats(self.raw(key))


# --- free-text descriptions ---------------------------------------------------

_SEPARATORS = re.compile(r"[_^:;,|=\"'()\[\]]+")
_SPACES = re.compile(r"\s+")
_GLUED_3D = re.compile(r"(?<![A-Z0-9])([23]D)(?=T[12]|PD|FLAIR)")


def norm_desc(text: str) -> str:
  """Description -> upper case with separators ('_', '^', ':') as spaces.

  Keeps the characters that carry meaning in radiology shorthand: '/', '+',
  '-', '*', '&', '.' ('W/O', '+C', 'T1-FLAIR', 'T2*'). Splits '3DT1' -> '3D T1'.
  """
  text = _SEPARATORS.sub(" ", text.upper())
  text = _GLUED_3D.sub(r"\1 ", text)
  return _SPACES.sub(" ", text).strip()


def keywords(*patterns: str, left: str = r"(?<![A-Z0-9])",
             right: str = r"(?![A-Z0-9])") -> re.Pattern:
  """One compiled regex matching any pattern as a whole word in ``norm_desc`` text."""
  return re.compile(left + "(?:" + "|".join(patterns) + ")" + right)


def quote(match: re.Match | str) -> str:
  """Provenance quote of the matched keyword only (never the whole free text:
  descriptions are typed by people and may hold names)."""
  text = match.group(0) if isinstance(match, re.Match) else match
  return "'" + text.strip()[:24] + "'"
