"""The LiTS label vocabulary: the one definition of the segmentation labels.

Segmentation shards, DICOM SEG reading and writing, the metrics and the
preprocessing contract of a segmentation run all take their label values and
names from here.
"""
from __future__ import annotations

from typing import Mapping

BACKGROUND, LIVER, TUMOUR = 0, 1, 2
LABELS = (BACKGROUND, LIVER, TUMOUR)
NAMES: Mapping[int, str] = {BACKGROUND: "background", LIVER: "liver", TUMOUR: "tumour"}
# Class name -> labels that make up the class in reports (LiTS: the liver
# includes its tumours).
CLASSES: Mapping[str, tuple[int, ...]] = {"liver": (LIVER, TUMOUR), "tumour": (TUMOUR,)}


def label_values(num_classes: int) -> tuple[int, ...]:
  """Foreground labels a ``num_classes`` network predicts: 2 -> (liver,),
  3 -> (liver, tumour)."""
  if num_classes == 2:
    return (LIVER,)
  if num_classes == 3:
    return (LIVER, TUMOUR)
  raise ValueError(f"num_classes must be 2 (liver) or 3 (liver, tumour), got {num_classes}")


def report_classes(num_classes: int) -> dict[str, tuple[int, ...]]:
  """Reported class -> labels: 2 classes report the liver (incl. tumour) only."""
  return {"liver": CLASSES["liver"]} if num_classes == 2 else dict(CLASSES)


def vocabulary(num_classes: int) -> dict[str, str]:
  """{label value as text: name} of a ``num_classes`` network (JSON keys)."""
  return {str(v): NAMES[v] for v in (BACKGROUND, *label_values(num_classes))}
