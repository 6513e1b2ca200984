"""Real-world header noise: the ways real archives lie about their images.

Each corruption is applied per series with its own probability and recorded in
``truth.csv`` (``header_noise``), so label-rule accuracy can be split by cause.
"""
from __future__ import annotations

import dataclasses

import numpy as np

# Tags that carry the acquisition physics (removed by ``description_only``).
ACQ_TAGS = ("ScanningSequence", "SequenceVariant", "SequenceName", "ScanOptions",
            "EchoTime", "RepetitionTime", "InversionTime", "FlipAngle")
CONTRAST_TAGS = ("ContrastBolusAgent", "ContrastBolusRoute", "ContrastBolusVolume",
                 "ContrastBolusStartTime", "ContrastBolusIngredient")
_WRONG_PART = {"HEAD": "NECK", "BRAIN": "HEADNECK", "HEADNECK": "HEAD", "CHEST": "ABDOMEN",
               "ABDOMEN": "CHEST", "PELVIS": "ABDOMEN", "CHESTABDPELVIS": "CHEST",
               "ABDOMENPELVIS": "ABDOMEN", "WHOLEBODY": "CHEST", "BREAST": "CHEST",
               "NECK": "CHEST"}


@dataclasses.dataclass(frozen=True)
class HeaderNoise:
  """Per-series probabilities of each header corruption (0 disables it).

  missing_bodypart: BodyPartExamined absent or empty.
  wrong_bodypart: BodyPartExamined names a neighbouring region.
  contrast_tags_empty: contrast was given but the ContrastBolus* tags are empty
    (only the description may tell); applies to contrast series only.
  description_only: MR acquisition tags (ScanningSequence, TE/TR/TI, ...) are
    missing, so only the series description tells the sequence.
  misleading_description: the series description names another sequence or
    the opposite contrast state (a copied protocol name).
  missing_description: SeriesDescription empty.
  """
  missing_bodypart: float = 0.15
  wrong_bodypart: float = 0.05
  contrast_tags_empty: float = 0.25
  description_only: float = 0.10
  misleading_description: float = 0.03
  missing_description: float = 0.04

  def scaled(self, factor: float) -> "HeaderNoise":
    """All rates times ``factor`` (clipped to [0, 1]); 0 turns noise off."""
    return HeaderNoise(**{f.name: float(min(1.0, max(0.0, getattr(self, f.name) * factor)))
                          for f in dataclasses.fields(self)})

  @classmethod
  def off(cls) -> "HeaderNoise":
    return cls().scaled(0.0)


def corrupt(tags: dict, truth: dict, alt_descriptions: list, noise: HeaderNoise,
            rng: np.random.Generator) -> list:
  """Applies the corruptions to a series' tag dict in place; returns their names.

  tags: DICOM keyword -> value for the series-level header. truth: the truth
  row (modality, contrast, ...). alt_descriptions: plausible wrong
  descriptions for ``misleading_description``.
  """
  applied = []
  if "BodyPartExamined" in tags:
    if rng.random() < noise.missing_bodypart:
      tags["BodyPartExamined"] = "" if rng.random() < 0.5 else None
      applied.append("missing_bodypart")
    elif rng.random() < noise.wrong_bodypart:
      tags["BodyPartExamined"] = _WRONG_PART.get(tags["BodyPartExamined"], "CHEST")
      applied.append("wrong_bodypart")
  if truth["contrast"] == "yes" and rng.random() < noise.contrast_tags_empty:
    for k in CONTRAST_TAGS:
      if k in tags:
        tags[k] = ""
    applied.append("contrast_tags_empty")
  if truth["modality"] == "MR" and rng.random() < noise.description_only:
    for k in ACQ_TAGS:
      tags[k] = None
    applied.append("description_only")
  if alt_descriptions and rng.random() < noise.misleading_description:
    tags["SeriesDescription"] = alt_descriptions[int(rng.integers(len(alt_descriptions)))]
    applied.append("misleading_description")
  elif rng.random() < noise.missing_description:
    tags["SeriesDescription"] = ""
    applied.append("missing_description")
  return applied
