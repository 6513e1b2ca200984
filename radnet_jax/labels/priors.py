"""Dataset-level priors: the paper's "heuristics of the datasets".

A prior rule says: for records whose fields match these values (typically the
collection, optionally the modality), a task that the record's own evidence
leaves *unknown* takes this value. Priors never override a decided label; the
provenance reads ``prior:collection_id=nlst,Modality=CT``.

Built-in rules (``BUILTIN_PRIORS``) cover a handful of well-known TCIA
collections by their IDC ``collection_id``; users extend or replace them with a
CSV or JSON file (``Priors.from_file``)::

    collection_id,Modality,contrast,coverage
    my_screening_ct,CT,no,lung
    my_liver_mr,MR,,liver

Every column that is not a task column (sequence, plane, contrast, coverage,
spacing) is a match condition; an empty cell matches anything. Values are
compared case-insensitively with runs of non-alphanumerics folded to '_'
('TCGA-LIHC' == 'tcga_lihc'). JSON: a list of such row objects, or
``{collection_id: {task: value, ...}}``. User rules are tried before the
built-in ones; within a source, rules with more conditions first.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from typing import Any, Iterable, Mapping

from radnet_jax.labels.fields import Fields
from radnet_jax.labels.taxonomy import OTHER, TASKS, Label, Taxonomy
from radnet_jax.labels.values import parse_value

_FOLD = re.compile(r"[^a-z0-9]+")

# (collection_id, Modality or '', {task: text value}, why)
BUILTIN_PRIORS: tuple[tuple[str, str, dict, str], ...] = (
    ("nlst", "CT", {"contrast": "no", "coverage": "lung"}, "low-dose screening chest CT"),
    ("lidc_idri", "CT", {"coverage": "lung"}, "thoracic CT for lung nodules"),
    ("nsclc_radiomics", "CT", {"coverage": "lung"}, "lung cancer planning CT"),
    ("nsclc_radiogenomics", "CT", {"coverage": "lung"}, "lung cancer CT"),
    ("4d_lung", "CT", {"coverage": "lung"}, "4D thoracic CT"),
    ("tcga_luad", "CT", {"coverage": "lung"}, "lung adenocarcinoma CT"),
    ("tcga_lusc", "CT", {"coverage": "lung"}, "lung squamous carcinoma CT"),
    ("lung_pet_ct_dx", "CT", {"coverage": "lung"}, "lung cancer CT"),
    ("tcga_lihc", "", {"coverage": "liver"}, "liver hepatocellular carcinoma"),
    ("tcga_kirc", "", {"coverage": "kidney"}, "kidney renal clear cell carcinoma"),
    ("tcga_kirp", "", {"coverage": "kidney"}, "kidney renal papillary carcinoma"),
    ("tcga_kich", "", {"coverage": "kidney"}, "kidney chromophobe carcinoma"),
    ("cptac_ccrcc", "", {"coverage": "kidney"}, "clear cell renal carcinoma"),
    ("c4kc_kits", "CT", {"coverage": "kidney"}, "kidney tumour CT"),
    ("pancreas_ct", "CT", {"contrast": "yes", "coverage": "liver|kidney"},
     "portal-venous contrast CT of the pancreas"),
    ("ct_colonography", "CT", {"contrast": "no",
                               "coverage": "liver|kidney|intestine|pelvis"},
     "CT colonography (no IV contrast)"),
    ("tcga_gbm", "MR", {"coverage": "brain"}, "glioblastoma brain MR"),
    ("tcga_lgg", "MR", {"coverage": "brain"}, "lower-grade glioma brain MR"),
    ("upenn_gbm", "MR", {"coverage": "brain"}, "glioblastoma brain MR"),
    ("cptac_gbm", "MR", {"coverage": "brain"}, "glioblastoma brain MR"),
    ("ispy1", "MR", {"coverage": "breast"}, "breast MR"),
    ("ispy2", "MR", {"coverage": "breast"}, "breast MR"),
    ("duke_breast_cancer_mri", "MR", {"coverage": "breast"}, "breast MR"),
    ("tcga_brca", "MR", {"coverage": "breast"}, "breast MR"),
    ("breast_mri_nact_pilot", "MR", {"coverage": "breast"}, "breast MR"),
    ("acrin_6698", "MR", {"coverage": "breast"}, "breast diffusion MR"),
    ("acrin_contralateral_breast_mr", "MR", {"coverage": "breast"}, "breast MR"),
    ("advanced_mri_breast_lesions", "MR", {"coverage": "breast"}, "breast MR"),
    ("prostatex", "MR", {"coverage": "pelvis"}, "prostate MR"),
    ("prostate_mri_us_biopsy", "MR", {"coverage": "pelvis"}, "prostate MR"),
    ("tcga_prad", "", {"coverage": "pelvis"}, "prostate adenocarcinoma"),
    ("tcga_hnsc", "", {"coverage": "head|neck"}, "head and neck carcinoma"),
    ("cptac_hnscc", "", {"coverage": "head|neck"}, "head and neck carcinoma"),
    ("tcga_ucec", "", {"coverage": "pelvis"}, "uterine corpus endometrial carcinoma"),
    ("cptac_ucec", "", {"coverage": "pelvis"}, "uterine corpus endometrial carcinoma"),
    ("tcga_cesc", "", {"coverage": "pelvis"}, "cervical carcinoma"),
    ("tcga_blca", "", {"coverage": "pelvis"}, "bladder carcinoma"),
)


def fold(value: Any) -> str:
  """Case/punctuation-insensitive form used to compare condition values."""
  return _FOLD.sub("_", str(value).strip().lower()).strip("_")


@dataclasses.dataclass(frozen=True)
class PriorRule:
  conditions: tuple[tuple[str, str], ...]   # (field, folded value)
  labels: tuple[tuple[str, Any], ...]       # (task, parsed value)
  source: str = "builtin"

  def matches(self, f: Fields) -> bool:
    return all(fold(f.text(k)) == v for k, v in self.conditions)

  def provenance(self) -> str:
    cond = ",".join(f"{k}={v}" for k, v in self.conditions)
    return f"prior:{cond}" + ("" if self.source == "builtin" else f" ({self.source})")


class Priors:
  """An ordered set of prior rules; ``apply`` fills unknown labels from them."""

  def __init__(self, rules: Iterable[PriorRule] = ()):
    self.rules = tuple(rules)
    # Index by collection_id: the common case; other rules are scanned.
    self._by_collection: dict[str, list[PriorRule]] = {}
    self._general: list[PriorRule] = []
    for rule in self.rules:
      cid = dict(rule.conditions).get("collection_id")
      if cid is None:
        self._general.append(rule)
      else:
        self._by_collection.setdefault(cid, []).append(rule)

  def __len__(self) -> int:
    return len(self.rules)

  def __repr__(self) -> str:
    return f"Priors({len(self.rules)} rules)"

  @classmethod
  def builtin(cls) -> "Priors":
    """The built-in table of well-known collections (``BUILTIN_PRIORS``)."""
    rows = []
    for cid, modality, labels, _ in BUILTIN_PRIORS:
      rows.append({"collection_id": cid, "Modality": modality, **labels})
    return cls.from_rows(rows, source="builtin")

  @classmethod
  def from_rows(cls, rows: Iterable[Mapping[str, Any]], source: str = "builtin",
                taxonomy: str = "extended") -> "Priors":
    """Rules from row dicts (condition columns + task columns). ValueError on
    bad values, naming ``source`` and the row number (1 = first data row)."""
    rules = []
    for i, row in enumerate(rows, start=1):
      conditions, labels = [], []
      for key, value in row.items():
        if key is None:
          raise ValueError(f"{source}: row {i} has more cells than the header")
        text = "" if value is None else str(value).strip()
        if not text:
          continue
        if key.strip().lower() in TASKS:
          try:
            labels.append((key.strip().lower(), parse_value(key.strip().lower(), text, taxonomy)))
          except ValueError as e:
            raise ValueError(f"{source}: row {i}: {e}") from None
        else:
          conditions.append((key.strip(), fold(text)))
      if not conditions:
        raise ValueError(f"{source}: row {i} has no condition (e.g. collection_id)")
      if labels:
        rules.append(PriorRule(tuple(conditions), tuple(labels), source))
    rules.sort(key=lambda r: -len(r.conditions))   # stable: specific first
    return cls(rules)

  @classmethod
  def from_file(cls, path: str, include_builtin: bool = True,
                taxonomy: str = "extended") -> "Priors":
    """User priors from CSV or JSON, tried before the built-in ones."""
    name = os.path.basename(path)
    try:
      with open(path, newline="", encoding="utf-8-sig") as fh:
        if path.lower().endswith(".json"):
          data = json.load(fh)
          if isinstance(data, dict):
            rows = [{"collection_id": k, **v} for k, v in data.items()]
          elif isinstance(data, list):
            rows = data
          else:
            raise ValueError(f"{path}: expected a JSON list or object")
        else:
          rows = list(csv.DictReader(fh))
    except (OSError, json.JSONDecodeError, csv.Error) as e:
      raise ValueError(f"{path}: cannot read priors: {e}") from e
    user = cls.from_rows(rows, source=name, taxonomy=taxonomy)
    return user.merged(cls.builtin()) if include_builtin else user

  def merged(self, lower: "Priors") -> "Priors":
    """These rules first, then ``lower``'s."""
    return Priors(self.rules + lower.rules)

  def matching(self, f: Fields) -> list[PriorRule]:
    cid = fold(f.text("collection_id"))
    candidates = self._by_collection.get(cid, []) if cid else []
    if self._general:
      candidates = sorted(candidates + self._general,
                          key=lambda r: (self.rules.index(r)))
    return [r for r in candidates if r.matches(f)]

  def apply(self, f: Fields | Mapping, labels: dict[str, Label],
            taxonomy: Taxonomy) -> dict[str, Label]:
    """Fills tasks that are unknown in ``labels``; returns a new dict."""
    f = f if isinstance(f, Fields) else Fields(f)
    todo = [t for t in TASKS if t in labels and not labels[t].known
            and labels[t].value != OTHER]
    if not todo:
      return labels
    rules = self.matching(f)
    if not rules:
      return labels
    out = dict(labels)
    for task in todo:
      for rule in rules:
        value = dict(rule.labels).get(task, "__absent__")
        if value == "__absent__" or value is None:
          continue
        prov = rule.provenance()
        if task == "sequence" and value != OTHER and value not in taxonomy.sequence:
          value, prov = OTHER, f"{prov} ({value}: not in the '{taxonomy.name}' taxonomy)"
        out[task] = Label(value, prov)
        break
    return out
