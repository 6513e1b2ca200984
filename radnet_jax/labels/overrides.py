"""Curator overrides: the "semi-automatic" part of the labelling.

A curator reviews the label report and writes (or edits) a CSV with a
``series`` column (the salted SeriesHash shown in reports) or a ``stack``
column (the StackKey), plus any of the task columns::

    series,sequence,contrast,coverage
    3f9a0c1d2e4b5a69,T2-FLAIR,,
    77aa01bc33de4f10,,yes,liver|kidney
    c0ffee00c0ffee00,unknown,,

An empty cell leaves the rule's label alone; ``unknown`` clears the label
(masks it out of training); any other value must be valid for the taxonomy
(see ``radnet_jax.labels.values``). Other columns (provenance, paths) are
ignored, so the label report CSV itself can be edited and fed back.
Overridden labels win, with provenance ``override:<file name>``.
"""
from __future__ import annotations

import csv
import os
from typing import Mapping

from radnet_jax.labels.taxonomy import TASKS, Label, Taxonomy
from radnet_jax.labels.values import parse_value

KEY_COLUMNS = ("series", "stack")


class OverrideRow(dict):
  """{task: value} (None = unknown) that remembers the file it came from."""

  def __init__(self, values: Mapping, source: str = "overrides"):
    super().__init__(values)
    self.source = source


def load_overrides(path: str, taxonomy: Taxonomy | str = "extended"
                   ) -> dict[str, OverrideRow]:
  """Reads a curator CSV -> {series hash or stack key: {task: value}}.

  Raises ValueError naming the file, the line and the bad value; a key that
  appears twice is an error (which line should win would be a guess).
  """
  name = os.path.basename(path)
  out: dict[str, OverrideRow] = {}
  first_line: dict[str, int] = {}
  try:
    fh = open(path, newline="", encoding="utf-8-sig")
  except OSError as e:
    raise ValueError(f"{path}: cannot read overrides: {e}") from e
  with fh:
    reader = csv.DictReader(fh)
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    if not any(k in header for k in KEY_COLUMNS):
      raise ValueError(f"{path}: needs a 'series' or 'stack' column "
                       f"(found: {', '.join(header) or 'no header'})")
    if not any(t in header for t in TASKS):
      raise ValueError(f"{path}: no task column ({', '.join(TASKS)})")
    for row in reader:
      line = reader.line_num
      row = {(k or "").strip().lower(): (v or "").strip() if isinstance(v, str) else v
             for k, v in row.items()}
      if None in row or "" in row and row[""]:
        raise ValueError(f"{path}:{line}: more cells than header columns")
      keys = [row.get(k, "") for k in KEY_COLUMNS if row.get(k, "")]
      if not keys:
        if any(row.get(t) for t in TASKS):
          raise ValueError(f"{path}:{line}: row has labels but no series/stack key")
        continue
      if len(keys) > 1:
        raise ValueError(f"{path}:{line}: give either 'series' or 'stack', not both")
      key = keys[0]
      if key in first_line:
        raise ValueError(f"{path}:{line}: {key!r} already overridden on line "
                         f"{first_line[key]}")
      values = {}
      for task in TASKS:
        text = row.get(task, "")
        if not text:
          continue
        try:
          values[task] = parse_value(task, text, taxonomy)
        except ValueError as e:
          raise ValueError(f"{path}:{line}: {e}") from None
      if values:
        out[key] = OverrideRow(values, name)
        first_line[key] = line
  return out


def find_override(overrides: Mapping[str, Mapping], series: str = "",
                  stack: str = "") -> Mapping | None:
  """The override row for a stack (stack key first, then its series hash)."""
  for key in (stack, series):
    if key and key in overrides:
      return overrides[key]
  return None


def apply_overrides(labels: Mapping[str, Label], row: Mapping | None,
                    source: str | None = None) -> dict[str, Label]:
  """Labels with the row's tasks replaced; provenance ``override:<file>``."""
  out = dict(labels)
  if not row:
    return out
  name = source or getattr(row, "source", "overrides")
  for task, value in row.items():
    if task not in TASKS:
      raise ValueError(f"override for unknown task {task!r}")
    if value is None:
      out[task] = Label(None, f"unknown:override:{name}")
    else:
      out[task] = Label(value, f"override:{name}")
  return out
