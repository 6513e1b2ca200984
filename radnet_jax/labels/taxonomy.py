"""Label taxonomy: the tasks, their classes, and the Label type.

Default = the 3D-RADNet paper's taxonomy; ``extended`` adds PT, PD, DWI, ADC.
See ``../shared/DESIGN.md`` (label taxonomy) for the meaning of each class.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Union

TASKS = ("sequence", "plane", "contrast", "coverage", "spacing")
CLASSIFICATION_TASKS = ("sequence", "plane", "contrast")

UNKNOWN = "unknown"   # evidence missing or contradictory: masked out of the loss
OTHER = "other"       # decided, but outside the taxonomy (localizer, angiogram, ...)

SEQUENCE_CLASSES = {
    "paper": ("CT", "T1", "T2", "T1-FLAIR", "T2-FLAIR"),
    "extended": ("CT", "T1", "T2", "T1-FLAIR", "T2-FLAIR", "PT", "PD", "DWI", "ADC"),
}
PLANE_CLASSES = ("AX", "COR", "SAG")
CONTRAST_CLASSES = ("no", "yes")
# Levels along the body axis, head to feet (breast is off-axis but listed in order).
COVERAGE_BANDS = ("brain", "head", "neck", "lung", "breast", "liver", "kidney",
                  "intestine", "pelvis")

LabelValue = Union[str, tuple, float, None]


@dataclasses.dataclass(frozen=True)
class Label:
  """One task's label with its provenance.

  value: class name (sequence/plane/contrast), a tuple of band names in
    COVERAGE_BANDS order (coverage), slice spacing in mm (spacing), ``OTHER``
    (decided but outside the taxonomy) or ``None`` (unknown).
  provenance: which rule fired on which evidence, e.g.
    ``"iop:ImageOrientationPatient"``, ``"desc:SeriesDescription='AX T1 +C'"``,
    ``"override:labels.csv"``, or why it is unknown (``"unknown:no evidence"``).
  """
  value: LabelValue
  provenance: str

  @property
  def known(self) -> bool:
    if self.value is None or self.value == UNKNOWN:
      return False
    if isinstance(self.value, float) and math.isnan(self.value):
      return False
    return True

  def as_text(self) -> str:
    """The value as written in CSV reports (bands joined by '|')."""
    if not self.known:
      return UNKNOWN
    if isinstance(self.value, tuple):
      return "|".join(self.value)
    if isinstance(self.value, float):
      return f"{self.value:.4g}"
    return str(self.value)


def unknown(reason: str = "no evidence") -> Label:
  return Label(None, f"unknown:{reason}")


@dataclasses.dataclass(frozen=True)
class Taxonomy:
  """Which classes each task predicts (the heads' sizes follow from it)."""
  name: str = "paper"

  @property
  def sequence(self) -> tuple:
    return SEQUENCE_CLASSES[self.name]

  @property
  def num_classes(self) -> dict:
    return {"sequence": len(self.sequence), "plane": len(PLANE_CLASSES),
            "contrast": len(CONTRAST_CLASSES), "coverage": len(COVERAGE_BANDS),
            "spacing": 1}

  def classes(self, task: str) -> tuple:
    return {"sequence": self.sequence, "plane": PLANE_CLASSES,
            "contrast": CONTRAST_CLASSES, "coverage": COVERAGE_BANDS}[task]

  def encode(self, labels: Mapping[str, Label]) -> dict:
    """Labels -> integer/float training targets; -1 / NaN / mask 0 = unknown.

    Returns {"sequence": int, "plane": int, "contrast": int,
    "coverage": list[float] (multi-hot, len 9), "coverage_mask": int,
    "spacing": float (mm, NaN if unknown)}. A sequence outside this taxonomy
    (``OTHER``, or e.g. PT under the paper taxonomy) is -1: masked, not guessed.
    """
    out = {}
    for task in CLASSIFICATION_TASKS:
      lab = labels.get(task)
      classes = self.classes(task)
      out[task] = (classes.index(lab.value)
                   if lab is not None and lab.known and lab.value in classes else -1)
    cov = labels.get("coverage")
    if cov is not None and cov.known and isinstance(cov.value, tuple):
      out["coverage"] = [1.0 if b in cov.value else 0.0 for b in COVERAGE_BANDS]
      out["coverage_mask"] = 1
    else:
      out["coverage"] = [0.0] * len(COVERAGE_BANDS)
      out["coverage_mask"] = 0
    sp = labels.get("spacing")
    out["spacing"] = float(sp.value) if sp is not None and sp.known else float("nan")
    return out
