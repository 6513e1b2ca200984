"""Labels of one converted stack: the rules (``radnet_jax.labels``), the
curator's overrides and the learned priors, applied the same way by
``build_shards``, the Beam pipeline and ``radnet_jax.predict``.

``label_entry`` is the one call: it labels a stack's PHI-free metadata
record (with the raw free text the scan kept in memory put back, never
stored), applies an overrides table, and encodes the targets of the
taxonomy. Raises on records the rules or the taxonomy cannot handle
(callers log stage "label").
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from radnet_jax import labels as lb
from radnet_jax.dicom.metadata import UNSCRUBBED_KEY
from radnet_jax.labels import priors as pr
from radnet_jax.labels import taxonomy as tx
from radnet_jax.shards.convert import file_digest

def load_overrides(path: str | None, taxonomy: str):
  """A curator's labels CSV (``labels.csv`` edited), or None without one."""
  if not path:
    return None
  return lb.load_overrides(path, taxonomy)


def load_priors(priors: Any):
  """None | "none" -> no priors; "builtin" -> the built-in table; a file path
  -> that file's rules before the built-in ones; a Priors object as is."""
  if priors is None or (isinstance(priors, str) and priors.lower() == "none"):
    return None
  if isinstance(priors, str):
    if priors.lower() == "builtin":
      return pr.Priors.builtin()
    if not os.path.isfile(priors):
      raise FileNotFoundError(f"{priors}: priors file does not exist")
    return pr.Priors.from_file(priors)
  return priors


def priors_id(priors: Any, loaded: Any) -> str | None:
  """How the manifest names the priors: never a path (paths may hold PHI)."""
  if loaded is None:
    return None
  if isinstance(priors, str) and os.path.isfile(priors):
    return f"file sha256:{file_digest(priors)} + builtin"
  return "builtin" if isinstance(priors, str) else "custom"


def label_stack(metadata: Mapping[str, Any], stack_key: str, taxonomy: str,
           priors: Any, overrides: Any) -> dict:
  """Rule labels of a stored record, then the curator's override if any."""
  record = dict(metadata)
  record.setdefault("StackKey", stack_key)
  labels = lb.label(record, taxonomy=taxonomy, priors=priors)
  if overrides:
    row = lb.find_override(overrides, series=str(record.get("SeriesHash", "")),
                           stack=stack_key)
    labels = lb.apply_overrides(labels, row)
  return labels


def labelling_record(metadata: Mapping[str, Any], scan_record: Mapping[str, Any] | None
                     ) -> dict:
  """What the label rules read: the stored (scrubbed) ``metadata`` with the
  raw free text the scan kept in memory (``metadata.UNSCRUBBED_KEY`` of the
  stack's scan record) put back. Never stored."""
  out = dict(metadata)
  out.update((scan_record or {}).get(UNSCRUBBED_KEY, {}))
  return out


def label_entry(metadata: Mapping[str, Any], stack_key: str, taxonomy: str,
                priors: Any = None, overrides: Any = None,
                scan_record: Mapping[str, Any] | None = None) -> dict:
  """Labels of one cached stack as ``shard_record`` and ``counts`` take them.

  Returns ``{"key", "labels": {task: text}, "provenance": {task: rule},
  "targets": Taxonomy.encode(labels), "md": metadata}``; raises on a record
  the label rules or the taxonomy cannot handle (callers log stage "label").
  The rules see the raw free text of ``scan_record`` (``labelling_record``);
  ``md`` is the stored, scrubbed metadata.
  """
  labels = label_stack(labelling_record(metadata, scan_record), stack_key, taxonomy,
                       priors, overrides)
  targets = tx.Taxonomy(taxonomy).encode(labels)
  texts = {t: labels[t].as_text() if t in labels else tx.UNKNOWN for t in tx.TASKS}
  provs = {t: labels[t].provenance if t in labels else "unknown:not labelled"
           for t in tx.TASKS}
  return {"key": stack_key, "labels": texts, "provenance": provs,
          "targets": targets, "md": metadata}
