"""Labels from DICOM metadata: pure functions of a metadata record.

``label(record)`` returns the five tasks of the taxonomy (sequence, plane,
contrast, coverage, spacing) as ``Label(value, provenance)``; a label is
unknown (``value=None``, provenance ``unknown:<reason>``) when the evidence is
missing or contradictory, never guessed. Rules read acquisition tags first and
descriptions second (``sequence.py``, ``geometry.py``, ``contrast.py``,
``coverage.py``); dataset-level ``priors`` fill what is still unknown;
curator ``overrides`` win over everything (``apply_overrides``).

A record is a plain dict of DICOM keywords -> python values (see
``radnet_jax.dicom.metadata``); CSV/Parquet rows of a metadata index work too
(``radnet_jax.labels.index``).
"""
from __future__ import annotations

from typing import Any, Mapping

from radnet_jax.labels.contrast import contrast_label
from radnet_jax.labels.coverage import coverage_label
from radnet_jax.labels.fields import Fields
from radnet_jax.labels.geometry import plane_label, spacing_label
from radnet_jax.labels.overrides import apply_overrides, find_override, load_overrides
from radnet_jax.labels.priors import Priors
from radnet_jax.labels.sequence import is_image_object, sequence_label
from radnet_jax.labels.taxonomy import (OTHER, TASKS, UNKNOWN, Label, Taxonomy,
                                        SEQUENCE_CLASSES, unknown)
from radnet_jax.labels.values import parse_value, value_text

__all__ = ["label", "Label", "Taxonomy", "Priors", "load_overrides",
           "apply_overrides", "find_override", "parse_value", "value_text",
           "OTHER", "UNKNOWN", "TASKS"]

_NOT_IMAGE = "not an image object"


def as_taxonomy(taxonomy: str | Taxonomy) -> Taxonomy:
  if isinstance(taxonomy, Taxonomy):
    name = taxonomy.name
  else:
    name = str(taxonomy)
  if name not in SEQUENCE_CLASSES:
    raise ValueError(f"unknown taxonomy {name!r} (choose from "
                     f"{', '.join(SEQUENCE_CLASSES)})")
  return taxonomy if isinstance(taxonomy, Taxonomy) else Taxonomy(name)


def label(record: Mapping[str, Any], taxonomy: str | Taxonomy = "paper",
          priors: Priors | None = None) -> dict[str, Label]:
  """Labels the five tasks of one metadata record.

  Args:
    record: DICOM keyword -> value (str, float, int, list; missing keys, None,
      '' and NaN all mean absent; numbers may be text; multi-valued strings
      may be lists or backslash-joined; keys and values in any case).
    taxonomy: "paper" (CT, T1, T2, T1-FLAIR, T2-FLAIR) or "extended" (+ PT,
      PD, DWI, ADC); classes outside it become ``OTHER``.
    priors: dataset-level priors filling tasks still unknown (None: none).

  Returns:
    {"sequence": Label(class | OTHER | None), "plane": Label("AX"|"COR"|"SAG"),
    "contrast": Label("no"|"yes"), "coverage": Label(tuple of bands in
    COVERAGE_BANDS order), "spacing": Label(float mm)}.
  """
  tax = as_taxonomy(taxonomy)
  f = Fields(record)
  seq = sequence_label(f, tax)
  if not is_image_object(f):
    why = unknown(_NOT_IMAGE)
    return {"sequence": seq, "plane": why, "contrast": why, "coverage": why,
            "spacing": why}
  plane = plane_label(f)
  labels = {
      "sequence": seq,
      "plane": plane,
      "contrast": contrast_label(f),
      "coverage": coverage_label(f, plane if plane.known else None),
      "spacing": spacing_label(f),
  }
  if priors is not None and len(priors):
    labels = priors.apply(f, labels, tax)
  return labels
