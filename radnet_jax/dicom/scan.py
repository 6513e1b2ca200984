"""Walk a folder tree, read DICOM headers, group series and split them into stacks.

``scan`` reads headers only (``stop_before_pixels``), groups the files by
SeriesInstanceUID and splits each series into 3D stacks the way dcm2niix does.
Where each step lives:

1. ``entries``: each file's header -> slice entries with their *hard keys*
   that always split (image size and pixel spacing, echo, diffusion b-value
   and gradient direction, standard or vendor tags, image type, enhanced
   Stack ID, one stack per Siemens mosaic or UIH VFRAME file), and the skip
   reasons of single files (non-DICOM, DICOMDIR, non-image objects, no
   geometry, truncated pixel data, unreadable);
2. ``split``: orientation clusters, volumes where slice positions repeat
   (``VOLUME_KEYS``, then InstanceNumber order), their numbering in the
   record, and the cuts at gaps;
3. here: walking the tree (``walk_files`` / ``iter_files``: FIFOs, sockets,
   devices and broken links are skipped without opening them; a header read
   that stalls past ``READ_TIMEOUT_S`` is skipped), the worker pool, the
   grouping of entries into series and stacks (``group_entries``), and the
   stack records (``_stack_record``: geometry from the headers).

Rejected here, each with a reason in ``ScanResult.skipped``: localizers
(ImageType LOCALIZER, 3-plane localizers: several orientations in a series
with fewer than ``min_slices`` slices each), stacks with fewer than
``min_slices`` slices, and parts cut off by a gap with fewer than
``min_slices`` slices (fragments). One bad file never stops a scan.

Order is deterministic: files are walked in sorted order, stacks are sorted by
(series hash, stack key) and the files of a stack by position along the slice
normal, oriented in the canonical slice direction (AX: superior first).
"""
from __future__ import annotations

import concurrent.futures as cf
import itertools
import math
import os
import stat
from typing import Any, Iterable, Iterator

import numpy as np

from radnet_jax.dicom import geometry, isolation
from radnet_jax.dicom.entries import VOLUME_KEYS, _Entry, read_entries
from radnet_jax.dicom.errors import DicomError
from radnet_jax.dicom.split import (_cluster_iop, _number_volumes, _split_gaps,
                                    _split_volumes)
from radnet_jax.dicom.types import ScanResult, Skipped, Stack
from radnet_jax import parallel
from radnet_jax.privacy import hash_id

# A header read (one file) that takes longer is skipped as stalled.
READ_TIMEOUT_S = 120.0
_SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
            (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(path: str) -> str | None:
  """Why ``path`` must not be opened (None for a regular file). ``stat``
  only: opening a FIFO blocks forever, reading a device never ends."""
  try:
    mode = os.stat(path).st_mode
  except OSError as e:
    return (f"broken symbolic link ({e.strerror})" if os.path.islink(path)
            else f"cannot stat ({e.strerror})")
  if stat.S_ISREG(mode):
    return None
  kind = next((name for test, name in _SPECIAL if test(mode)), "not a regular file")
  return f"{kind}, not a regular file: skipped without opening it"


def walk_files(root: str) -> Iterator[str | Skipped]:
  """Regular files under ``root`` (or ``root`` itself) in sorted order, and a
  ``Skipped`` for every other entry (FIFOs, sockets, devices, broken links)."""
  if not os.path.isdir(root):
    reason = _not_regular(root)
    yield root if reason is None else Skipped(root, reason)
    return
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      reason = _not_regular(path)
      yield path if reason is None else Skipped(path, reason)


def iter_files(root: str) -> Iterator[str]:
  """All regular files under ``root`` (or ``root`` itself), in sorted order."""
  for item in walk_files(root):
    if isinstance(item, str):
      yield item


def _read_limited(path: str, salt: str, seen: set | None) -> list[_Entry] | Skipped:
  """``read_entries`` with a time limit (``READ_TIMEOUT_S``) on the read."""
  try:
    with isolation.read_deadline(READ_TIMEOUT_S, path):
      return read_entries(path, salt, seen)
  except isolation.ReadStalled as e:
    return Skipped(path, str(e).replace(f"reading {path} ", "reading the header ", 1))


# ---------------------------------------------------------------------------
# Grouping a series into stacks (the cuts themselves are in ``split``).
# ---------------------------------------------------------------------------


def _stack_record(entries: list[_Entry], base: dict[str, Any], key: str
                  ) -> dict[str, Any]:
  """The stack's record: first file's record plus header-level geometry."""
  rec = dict(base)
  first = entries[0]
  n = geometry.slice_normal(first.iop)
  hard = first.hard_key
  # Multi-echo / multi-b enhanced objects: the record came from frame 1, so
  # put this stack's own echo time and b-value in (keeping full precision
  # when the record already agrees with the rounded split key).
  for field, value, tol in (("EchoTime", hard[4], 0.01),
                            ("DiffusionBValue", hard[5], 0.1)):
    if isinstance(value, float) and (
        not isinstance(rec.get(field), (int, float)) or
        abs(rec[field] - value) > tol):
      rec[field] = value
  if isinstance(hard[6], tuple):   # this stack's own gradient direction
    old = rec.get("DiffusionGradientOrientation")
    if not (isinstance(old, list) and len(old) == 3 and
            max(abs(a - b) for a, b in zip(old, hard[6])) <= 1e-3):
      rec["DiffusionGradientOrientation"] = [float(v) for v in hard[6]]
  # Per-file keys shared by the whole stack are its own (the record came
  # from one file or frame of the group): time point, stack, image type.
  for name in VOLUME_KEYS:
    if name == "AcquisitionTime":    # a time of day is not kept
      continue
    values = {e.keys.get(name) for e in entries}
    if len(values) == 1 and None not in values:
      (value,) = values
      rec[name] = [v for v in value.split("\\") if v] if name == "ImageType" else value
  rec["ImageOrientationPatient"] = [float(v) for v in first.iop]
  rec["PixelSpacing"] = [float(v) for v in first.pixel_spacing]
  if first.n_slices > 1:  # mosaic: slices inside one file
    count = first.n_slices
    spacing = float(rec.get("SpacingBetweenSlices") or rec.get("SliceThickness") or 1.0)
  else:
    count = len(entries)
    s = np.sort([e.position @ n for e in entries])
    diffs = np.diff(s)
    if len(diffs):
      spacing = float(np.median(diffs))
    else:
      spacing = float(rec.get("SpacingBetweenSlices") or rec.get("SliceThickness") or 1.0)
  dr, dc = first.pixel_spacing
  r, c = first.iop[:3], first.iop[3:]
  affine = np.eye(4)
  affine[:3, 0], affine[:3, 1], affine[:3, 2] = n * spacing, c * dr, r * dc
  shape = (count, first.rows, first.cols)
  transpose, _ = geometry.canonical_transform(
      np.stack([n, c, r]), geometry.plane_of(n))
  vox = np.array([spacing, dr, dc])
  if transpose:
    shape, vox = (shape[0], shape[2], shape[1]), vox[[0, 2, 1]]
  rec["NumberOfSlices"] = int(count)
  rec["SliceSpacing"] = float(spacing)
  rec["ExtentMM"] = geometry.extent_mm(vox, shape)
  rec["ExtentSI"] = geometry.extent_si(affine, (count, first.rows, first.cols))
  rec["StackKey"] = key
  return rec


def _series_stacks(entries: list[_Entry], records: dict[tuple, dict],
                   salt: str, min_slices: int
                   ) -> tuple[list[Stack], list[Skipped]]:
  series_uid = entries[0].series_uid
  series = hash_id(series_uid, salt)
  stacks: list[Stack] = []
  skipped: list[Skipped] = []

  def skip(group: list[_Entry], reason: str) -> None:
    for path in sorted({e.path for e in group}):
      skipped.append(Skipped(path, reason, series))

  localizers = [e for e in entries if e.localizer]
  if localizers:
    skip(localizers, "localizer/scout (ImageType LOCALIZER)")
  entries = [e for e in entries if not e.localizer]
  if not entries:
    return stacks, skipped

  hard_groups: dict[tuple, list[_Entry]] = {}
  for e in entries:
    hard_groups.setdefault(e.hard_key, []).append(e)
  all_iop = _cluster_iop(entries)
  mixed = len(all_iop) > 1
  for hard in sorted(hard_groups, key=repr):
    for cluster in _cluster_iop(hard_groups[hard]):
      for rank, (tkey, group, fields) in enumerate(_split_volumes(cluster)):
        count = group[0].n_slices if group[0].n_slices > 1 else len(group)
        if count < min_slices:
          if mixed:
            skip(group, f"mixed orientations in series ({len(all_iop)} "
                        f"orientations; this one has {count} slice(s)): "
                        "localizer/scout")
          else:
            skip(group, _size_outlier(hard, hard_groups, min_slices) or
                 f"too few slices ({count} < {min_slices})")
          continue
        n = geometry.stack_direction(group[0].iop)
        group.sort(key=lambda e: (float(e.position @ n), e.path, e.frame or 0))
        parts = _split_gaps(group, n)
        for part_no, (part, gap) in enumerate(parts):
          if len(parts) > 1 and len(part) < min_slices:
            skip(part, f"fragment of {len(part)} slice(s) cut off by a gap "
                       f"of {gap:.1f} mm in the stack (fewer than "
                       f"{min_slices}; missing files?)")
            continue
          iop_txt = ",".join(f"{v:.3f}" for v in part[0].iop)
          split = f"{hard!r}|{iop_txt}|{tkey}"
          if len(parts) > 1:
            split += f"|part={part_no}"
          stacks.append(_make_stack(part, records[hard],
                                    hash_id(f"{series_uid}|{split}", salt),
                                    fields, rank))
  _number_volumes(stacks, entries)
  return stacks, skipped


def _size_outlier(hard: tuple, hard_groups: dict[tuple, list[_Entry]],
                  min_slices: int) -> str | None:
  """The reason for a group too small to be a stack whose only difference
  from a full stack of its series is the image size (one file with a wrong
  Rows or Columns), else None."""
  for other, group in hard_groups.items():
    if other != hard and other[2:] == hard[2:] and len(group) >= min_slices:
      return (f"image size {hard[0]}x{hard[1]} (Rows x Columns) differs from the "
              f"{other[0]}x{other[1]} of the other {len(group)} files of the series "
              "(wrong Rows/Columns in this file?)")
  return None


def _make_stack(group: list[_Entry], record: dict[str, Any], key: str,
                fields: dict[str, Any] | None = None, rank: int = 0) -> Stack:
  files: list[str] = []
  index: dict[str, int] = {}
  for e in group:
    if e.path not in index:
      index[e.path] = len(files)
      files.append(e.path)
  frames = None
  if group[0].frame is not None:
    frames = tuple((index[e.path], int(e.frame)) for e in group)
  rec = _stack_record(group, record, key)
  for field, value in (fields or {}).items():
    if field == "ImageType":
      rec[field] = [v for v in str(value).split("\\") if v]
    elif field != "AcquisitionTime":   # a time of day is not kept
      rec[field] = value
  if group[0].layout:
    rec["MosaicLayout"] = group[0].layout
  # Series-level numbering (``_number_volumes``) reads these, then drops them.
  inst = [e.keys.get("InstanceNumber", e.keys.get("FrameOrder"))
          for e in group]
  inst = [i for i in inst if i is not None]
  times = [e.keys["AcquisitionTime"] for e in group if "AcquisitionTime" in e.keys]
  rec["_FirstInstance"] = min(inst) if inst else math.inf
  rec["_FirstTime"] = min(times) if times else None
  rec["_Hard"] = group[0].hard_key
  rec["_SplitRank"] = rank
  return Stack(key=key, files=tuple(files), record=rec, frames=frames)


def _record_of(path: str, salt: str) -> dict[str, Any] | None:
  """Re-reads one file's record (when a worker dropped the first one)."""
  res = read_entries(path, salt)
  return None if isinstance(res, Skipped) else res[0].record


def group_entries(results: Iterable[list[_Entry] | Skipped], salt: str,
                  min_slices: int = 3) -> ScanResult:
  """Groups per-file results (from ``read_entries``) into stacks."""
  by_series: dict[str, list[_Entry]] = {}
  # One record per (series, hard key): the first file in walk order. Records
  # of the other files are dropped at once (bounded memory on big archives).
  records: dict[str, dict[tuple, dict]] = {}
  skipped: list[Skipped] = []
  for res in results:
    if isinstance(res, Skipped):
      skipped.append(res)
      continue
    record = next((e.record for e in res if e.record is not None), None)
    for e in res:
      by_series.setdefault(e.series_uid, []).append(e)
      e.record = None
      recs = records.setdefault(e.series_uid, {})
      if e.hard_key not in recs:
        if record is None:
          # The reader skipped the record of a group it had seen, but this is
          # the group's first file here (parallel readers): read it again.
          record = _record_of(e.path, salt)
        if record is not None:
          recs[e.hard_key] = record
  stacks: list[Stack] = []
  for uid in by_series:
    s, k = _series_stacks(by_series[uid], records[uid], salt, min_slices)
    stacks.extend(s)
    skipped.extend(k)
  stacks.sort(key=lambda st: (st.record.get("SeriesHash", ""), st.key))
  skipped.sort(key=lambda k: (k.path, k.reason))
  return ScanResult(stacks=stacks, skipped=skipped)


_WORKER_SEEN: set = set()


def _init_worker(parent: int | None = None) -> None:
  isolation.die_with_parent(parent)
  _WORKER_SEEN.clear()


def _read_entries_star(args: tuple[str, str]) -> list[_Entry] | Skipped:
  # Each worker reads its files in walk order (chunks are handed out in
  # order), so its first file of a group is the earliest one it holds.
  return _read_limited(*args, seen=_WORKER_SEEN)


def scan(root: str, *, salt: str, workers: int = 1, progress: bool = False,
         min_slices: int = 3) -> ScanResult:
  """Finds the 3D stacks under ``root`` (a folder or one file).

  Args:
    root: folder tree (or single file) with DICOM files, any names, ``.gz`` ok.
    salt: corpus salt for the PHI-free hashes.
    workers: processes reading headers (1 = in this process).
    progress: show a tqdm progress bar over files.
    min_slices: stacks with fewer slices are skipped (localizers, single
      images); a Siemens mosaic counts its images.

  Returns:
    ScanResult(stacks, skipped), both in a deterministic order.
  """
  if not os.path.exists(root):
    raise DicomError(root, "no such file or directory")
  paths, special = [], []
  for item in walk_files(root):
    (paths if isinstance(item, str) else special).append(item)
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=len(paths), desc="scan", unit="file")

  def tick(items):
    for item in items:
      if bar is not None:
        bar.update(1)
      yield item

  try:
    if workers > 1 and len(paths) > 1:
      with cf.ProcessPoolExecutor(max_workers=workers,
                                  mp_context=parallel.context(),
                                  initializer=_init_worker,
                                  initargs=(os.getpid(),)) as pool:
        chunk = max(1, min(256, len(paths) // (workers * 8) or 1))
        return group_entries(itertools.chain(special, tick(
            pool.map(_read_entries_star, [(p, salt) for p in paths],
                     chunksize=chunk))), salt, min_slices)
    seen: set = set()
    return group_entries(itertools.chain(special, tick(
        _read_limited(p, salt, seen) for p in paths)), salt, min_slices)
  finally:
    if bar is not None:
      bar.close()
