"""Split a series' slice entries (from ``entries``) into 3D volumes and parts.

``scan`` groups a series' entries by hard key (``entries``) and then, here:

1. *orientation*: ImageOrientationPatient clustered with a 1e-3 tolerance
   (``_cluster_iop``);
2. *volumes*, only where slice positions repeat inside a stack: split by the
   first of ``VOLUME_KEYS`` (TemporalPositionIdentifier / Index,
   AcquisitionNumber, TriggerTime, StackID, ImageType, AcquisitionTime),
   then pairs of them, that cuts it into whole volumes, else by InstanceNumber
   order (frame order for enhanced objects) like dcm2niix
   (``_split_volumes``); a CT series whose slices carry different
   AcquisitionNumbers but distinct positions stays one stack. Volumes of one
   series on one grid are numbered in the record (``_number_volumes``:
   VolumeIndex, NumberOfVolumes, VolumeSplitBy, VolumeTimeS,
   VolumeTimeAfterBolusS, SeriesBValues), so labels can tell a b0 from a
   b1000 volume or a DCE phase before the injection from one after;
3. *gaps*: a stack is cut where one step between consecutive positions is
   more than 2.5x the spacing next to it (files missing from an archive,
   separate slabs; ``geometry.classify_spacing``; a change of spacing, as in
   head CTs at two or three spacings, is not a gap), into
   stacks keyed ``part=k`` (``_split_gaps``). A gap of one missing slice is
   not cut: ``load_volume`` fills it by interpolation.

``VOLUME_KEYS`` itself lives in ``entries``, which reads those values from
each file (``split`` imports ``entries``, never the other way round).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from radnet_jax.dicom import geometry
from radnet_jax.dicom.entries import VOLUME_KEYS, _Entry, _tm_seconds
from radnet_jax.dicom.types import Stack

_IOP_TOL = 1e-3
_DUP_TOL_MM = 1e-2


def _cluster_iop(entries: list[_Entry]) -> list[list[_Entry]]:
  clusters: list[tuple[np.ndarray, list[_Entry]]] = []
  for e in entries:
    for rep, members in clusters:
      if np.max(np.abs(rep - e.iop)) < _IOP_TOL:
        members.append(e)
        break
    else:
      clusters.append((e.iop, [e]))
  return [members for _, members in clusters]


def _position_ids(entries: list[_Entry]) -> list[int]:
  """Slice-position index of each entry (positions within ``_DUP_TOL_MM``
  along the normal share one)."""
  n = geometry.slice_normal(entries[0].iop)
  s = np.array([float(e.position @ n) for e in entries])
  order = np.argsort(s, kind="stable")
  ids = [0] * len(entries)
  current, last = -1, None
  for i in order:
    if last is None or s[i] - last >= _DUP_TOL_MM:
      current += 1
    last = s[i]
    ids[i] = current
  return ids


def _sort_value(v: Any) -> tuple:
  return (0, v, "") if isinstance(v, (int, float)) else (1, 0.0, str(v))


def _groups_by(entries, values, pos_ids, k):
  """{value: entries} if the values cut ``entries`` into exactly ``k``
  volumes with every slice position at most once in each, else None."""
  groups: dict[Any, list[int]] = {}
  for i, v in enumerate(values):
    groups.setdefault(v, []).append(i)
  if len(groups) != k:
    return None
  for idx in groups.values():
    if len({pos_ids[i] for i in idx}) != len(idx):
      return None
  return groups


def _split_volumes(entries: list[_Entry]
                   ) -> list[tuple[str, list[_Entry], dict[str, Any]]]:
  """Splits one orientation cluster into 3D volumes when positions repeat.

  Tries, in ``VOLUME_KEYS`` order, each key alone, then each pair of keys: a
  key is taken when it cuts the files into exactly as many volumes as the
  most repeated position has files, with no position twice in a volume (so
  AcquisitionTime, which differs per slice of a 2D acquisition, never
  passes for a volume key). The last resort is InstanceNumber, as dcm2niix
  orders a series (the frame order for the frames of an enhanced object):
  the i-th file of every position (in that order) belongs to volume i when
  every position has the same count, else consecutive blocks of one file per
  position. When nothing orders them, the cluster stays whole and the record
  says which tags were tried (``load_volume`` then keeps identical copies or
  names the mix with that list).

  Returns:
    (split key text, entries, record fields) per volume, in volume order.
  """
  pos_ids = _position_ids(entries)
  counts: dict[int, int] = {}
  for p in pos_ids:
    counts[p] = counts.get(p, 0) + 1
  k = max(counts.values())
  if k < 2:
    return [("", entries, {})]
  present = [key for key in VOLUME_KEYS
             if all(key in e.keys for e in entries)]
  candidates = [(key,) for key in present] + [
      (a, b) for i, a in enumerate(present) for b in present[i + 1:]]
  for keys in candidates:
    values = [tuple(e.keys[key] for key in keys) for e in entries]
    groups = _groups_by(entries, values, pos_ids, k)
    if groups is None:
      continue
    by = "+".join(keys)
    out = []
    for v in sorted(groups, key=lambda t: tuple(_sort_value(x) for x in t)):
      fields = {"VolumeSplitBy": by}
      for key, value in zip(keys, v):
        fields[key] = value
      text = "|".join(f"{key}={value}" for key, value in zip(keys, v))
      out.append((text, [entries[i] for i in groups[v]], fields))
    return out
  # Classic files: InstanceNumber; frames of enhanced objects: frame order.
  order_key = next((key for key in ("InstanceNumber", "FrameOrder")
                    if all(key in e.keys for e in entries)), "InstanceNumber")
  order_name = {"InstanceNumber": "InstanceNumber order",
                "FrameOrder": "frame order"}[order_key]
  inst = [e.keys.get(order_key) for e in entries]
  if all(i is not None for i in inst) and len(set(inst)) == len(inst):
    volume = [0] * len(entries)
    if len(set(counts.values())) == 1:
      by_pos: dict[int, list[int]] = {}
      for i in sorted(range(len(entries)), key=lambda i: inst[i]):
        by_pos.setdefault(pos_ids[i], []).append(i)
      for idx in by_pos.values():
        for rank, i in enumerate(idx):
          volume[i] = rank
      ok = True
    else:
      n_pos = len(counts)
      ordered = sorted(range(len(entries)), key=lambda i: inst[i])
      for rank, i in enumerate(ordered):
        volume[i] = rank // n_pos
      ok = _groups_by(entries, volume, pos_ids, max(volume) + 1) is not None
    if ok:
      groups: dict[int, list[_Entry]] = {}
      for v, e in zip(volume, entries):
        groups.setdefault(v, []).append(e)
      return [(f"{order_name} #{v}", groups[v], {"VolumeSplitBy": order_name})
              for v in sorted(groups)]
  tried = ", ".join(VOLUME_KEYS) + f", {order_name}"
  missing = [key for key in VOLUME_KEYS if key not in present]
  why = (f"slice positions repeat up to {k} times and no tag orders them "
         f"(tried b-value, gradient direction, echo, image type, {tried}")
  if missing:
    why += f"; absent or partial: {', '.join(missing)}"
  return [("", entries, {"VolumeSplitTried": why + ")"})]


def _volume_order(stack: Stack) -> tuple:
  """InstanceNumber order (dcm2niix's order of the volumes of a 4D series),
  then AcquisitionTime, then the order of the split key's values."""
  rec = stack.record
  t = rec.get("_FirstTime")
  return (rec.get("_FirstInstance", math.inf), math.inf if t is None else t,
          rec.get("_SplitRank", 0), rec.get("StackKey", ""))


def _number_volumes(stacks: list[Stack], entries: list[_Entry]) -> None:
  """Series-level volume fields of each stack's record.

  Stacks of one series on the same grid (orientation, matrix, slice count)
  are the volumes of one 4D acquisition (b-values / directions split by the
  hard keys, time points by ``_split_volumes``, one mosaic per file):
  ``VolumeIndex`` (0-based, in acquisition order: ``_volume_order``),
  ``NumberOfVolumes``, ``VolumeTimeS`` (start of this volume after the
  first one, s, from AcquisitionTime), ``VolumeTimeAfterBolusS`` (after
  ContrastBolusStartTime, s; negative = before the injection) and
  ``SeriesBValues`` (the b-values of a series with some b > 0; a file
  without one there counts as b=0, as on Canon and in dcm2niix).
  """
  b_values = {e.hard_key[5] for e in entries}
  if any(isinstance(b, float) and b > 0 for b in b_values):
    series_b = sorted({b if isinstance(b, float) else 0.0 for b in b_values})
  else:
    series_b = None
  grids: dict[tuple, list[Stack]] = {}
  for st in stacks:
    rec = st.record
    sig = (tuple(np.round(rec["ImageOrientationPatient"], 3).tolist()),
           rec.get("Rows"), rec.get("Columns"), rec["NumberOfSlices"])
    grids.setdefault(sig, []).append(st)
    if series_b is not None:
      rec["SeriesBValues"] = series_b
      if not isinstance(rec.get("DiffusionBValue"), (int, float)):
        rec["DiffusionBValue"] = 0.0
        rec["DiffusionBValueInferred"] = True
  for group in grids.values():
    group.sort(key=_volume_order)
    hard_by = _hard_split_names([st.record.get("_Hard") for st in group])
    times = [st.record.get("_FirstTime") for st in group]
    t0 = min((t for t in times if t is not None), default=None)
    for i, st in enumerate(group):
      rec = st.record
      if len(group) > 1:
        rec["VolumeIndex"], rec["NumberOfVolumes"] = i, len(group)
        if hard_by:
          by = rec.get("VolumeSplitBy")
          rec["VolumeSplitBy"] = "+".join(hard_by + ([by] if by else []))
        if t0 is not None and rec.get("_FirstTime") is not None:
          rec["VolumeTimeS"] = round(rec["_FirstTime"] - t0, 3)
      bolus = _tm_seconds(rec.get("ContrastBolusStartTime"))
      if bolus is not None and rec.get("_FirstTime") is not None:
        rec["VolumeTimeAfterBolusS"] = round(rec["_FirstTime"] - bolus, 3)
  for st in stacks:
    st.record.pop("_FirstInstance", None)
    st.record.pop("_FirstTime", None)
    st.record.pop("_Hard", None)
    st.record.pop("_SplitRank", None)


# What each position of the hard key means, for ``VolumeSplitBy``.
_HARD_NAMES = (None, None, None, "EchoNumbers", "EchoTime", "DiffusionBValue",
               "DiffusionGradientOrientation", "ImageType", "file")


def _hard_split_names(keys: list) -> list[str]:
  """Names of the hard-key parts that differ between the volumes of a grid."""
  keys = [k for k in keys if k is not None]
  if len(keys) < 2:
    return []
  return [name for i, name in enumerate(_HARD_NAMES)
          if name and len({k[i] for k in keys}) > 1]


def _split_gaps(group: list[_Entry], n: np.ndarray
                ) -> list[tuple[list[_Entry], float]]:
  """Cuts a position-sorted stack where ``geometry.classify_spacing`` finds
  a cut: a single step wider than ``GAP_FILL_FACTOR`` times the spacing next
  to it (missing files, separate slabs); each part with the widest gap next
  to it. Narrower gaps (one missing slice) and changes of spacing (variable
  spacing) are left to ``load_volume``, which interpolates them."""
  if len(group) < 3 or group[0].n_slices > 1:
    return [(group, 0.0)]
  s = np.array([float(e.position @ n) for e in group])
  diffs = np.diff(s)
  cuts = [i + 1 for i in geometry.classify_spacing(diffs).cuts]
  if not cuts:
    return [(group, 0.0)]
  bounds = [0] + cuts + [len(group)]
  out = []
  for a, b in zip(bounds[:-1], bounds[1:]):
    near = [diffs[a - 1]] if a else []
    near += [diffs[b - 1]] if b < len(group) else []
    out.append((group[a:b], float(max(near))))
  return out
