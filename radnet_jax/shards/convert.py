"""The per-stack core of the conversion: one DICOM stack -> one shard record.

The archive runner (``radnet_jax.shards.build.build_shards``), the Beam
pipeline (``radnet_jax.shards.beam``) and ``radnet_jax.predict`` on DICOM
all go through the functions here, so they give the same bytes:

* ``convert_stack_staged(stack, shape)`` / ``convert_stack``: load +
  resample + modality-aware normalise -> the *cache record* (float16
  volume on the ``shape`` grid, its affine, geometry, PHI-filtered
  metadata). Classic stacks take ``dicom.stream.load_resampled``, which
  decodes the slices straight onto the ``shape`` grid without the
  full-resolution volume and gives the same record bit for bit; the rest
  ``load_volume`` + ``cache_record``. Failures raise ``StageError`` naming the
  stage ("load" or "resample").
* ``label_entry``: the metadata labels (``radnet_jax.labels.label`` + curator
  overrides, which win and are recorded as ``override:...`` provenance) and
  their encoded targets; ``split_of(patient_key(...))``: the patient split;
  ``shard_record``: the pretraining record (schema in
  ``radnet_jax.shards.records``); ``counts``: the manifest's class counts.
* ``PathScrubber``/``locate``: paths in logs (relative, or salted hashes) and
  back; ``read_manifest``/``shard_paths``/``iter_records``: reading the output.

Splits are by patient: ``u = sha256(f"{seed}:{PatientHash}")`` mapped to
[0, 1) and cut at the cumulative split fractions, so every stack of a patient
lands in the same split. Stacks without a PatientID fall back to the study,
then the series hash (they cannot be grouped across studies).

PHI: records carry salted hashes only, and the metadata record stored in the
shards is filtered again here (no names, IDs, dates, instance UIDs). Paths in
``errors.csv`` are salted hashes of the path relative to the input root by
default, because archive folders and files are often named after patients;
``locate(input_dir, out_dir, hashes)`` (``python -m data_prep.locate``) finds
the files behind them on the machine that holds the archive. With
``hash_paths=False`` (``--plain-paths``, for de-identified archives) the
relative paths are written; the input root itself is never written.

Size (~540 lines): the per-stack core that ``build_shards``, the Beam
pipeline and ``radnet_jax.predict`` share, so that all three write the same
record bytes (conversion, record layout, error classes, path scrubbing);
the labels of a stack live in ``radnet_jax.shards.labelling``.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import math
import os
import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from radnet_jax import privacy
from radnet_jax import resample as rs
from radnet_jax.dicom import isolation
from radnet_jax.dicom import stream, volume
from radnet_jax.labels import taxonomy as tx
from radnet_jax.shards import records

DEFAULT_SHAPE = (48, 192, 192)
DEFAULT_SPLIT = (0.8, 0.1, 0.1)
SPLITS = ("train", "val", "test")
# 48x192x192 float16 is 3.5 MB: 128 records ~ 450 MB per shard file.
DEFAULT_RECORDS_PER_SHARD = 128
WRITER_OPTIONS = "group_size:1"
MANIFEST = records.MANIFEST
WORK_DIR = ".work"
# Bump when the cached content changes (resampling, normalisation; 2: free
# text scrubbed of PHI, so caches written before are never reused).
CACHE_VERSION = 2
SHARD_RE = re.compile(r"^(train|val|test)-\d{5}-of-\d{5}\.array_record$")

# Never copied into shards even if a metadata record carries them.
_PHI_KEYS = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime",
    "OtherPatientIDs", "OtherPatientNames", "PatientAddress",
    "PatientTelephoneNumbers", "PatientMotherBirthName", "AccessionNumber",
    "StudyID", "InstitutionName", "InstitutionAddress",
    "ReferringPhysicianName", "PerformingPhysicianName",
    "OperatorsName", "NameOfPhysiciansReadingStudy", "RequestingPhysician",
    "DeviceSerialNumber", "StationName", "IssuerOfPatientID",
})
_SAFE_UID_KEYS = frozenset({"SOPClassUID", "TransferSyntaxUID"})


# ----------------------------------------------------------------------------
# Small pure helpers
# ----------------------------------------------------------------------------

def split_of(patient: str, fractions: Sequence[float] = DEFAULT_SPLIT,
             seed: int = 0) -> str:
  """Deterministic split of a (hashed) patient id: "train" | "val" | "test"."""
  digest = hashlib.sha256(f"{seed}:{patient}".encode()).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64
  total = float(sum(fractions))
  acc = 0.0
  for name, frac in zip(SPLITS, fractions):
    acc += frac / total
    if u < acc:
      return name
  return SPLITS[len(fractions) - 1]


def patient_key(record: Mapping[str, Any], stack_key: str = "") -> str:
  """The grouping key for the split: PatientHash, else StudyHash, SeriesHash."""
  for k in ("PatientHash", "StudyHash", "SeriesHash"):
    if record.get(k):
      return str(record[k])
  return stack_key


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def safe_metadata(record: Mapping[str, Any]) -> dict:
  """JSON-safe copy of a metadata record without PHI keys or instance UIDs."""
  out = {}
  for key, value in record.items():
    key = str(key)
    if (key in _PHI_KEYS or "Date" in key or "Birth" in key or key.startswith("_")):
      # "_" keys are in-memory only (metadata.UNSCRUBBED_KEY: raw free text)
      continue
    if key.endswith("UID") and key not in _SAFE_UID_KEYS:
      continue
    value = _json_value(value)
    if value is not None:
      out[key] = value
  return out


def _json_value(value: Any) -> Any:
  if isinstance(value, (bool, int, str)):
    return value
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, np.generic):
    return _json_value(value.item())
  if isinstance(value, (list, tuple, np.ndarray)):
    items = [_json_value(v) for v in (value.tolist() if isinstance(value, np.ndarray)
                                      else value)]
    return [v for v in items if v is not None]
  if isinstance(value, dict):
    return {str(k): v for k, v in ((k, _json_value(v)) for k, v in value.items())
            if v is not None}
  if isinstance(value, bytes):
    return None
  return str(value)


def atomic_write(path: str, data: bytes) -> None:
  """Writes ``data`` to a temporary name next to ``path``, then renames it;
  on failure (a full disk) the temporary file is removed and the error raised."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


# Errors of the machine, not of the data: they stop a run (never a row of
# errors.csv), and a rerun once they are fixed resumes where it stopped.
_ENV_ERRNOS = {errno.ENOSPC: "no space left on the device",
               errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system"}


def environment_error(e: BaseException) -> str | None:
  """A reason if ``e`` is about the machine (memory, a full or read-only
  disk), else None (a property of the data)."""
  if isinstance(e, MemoryError):
    return "out of memory (MemoryError); lower --workers or free memory"
  if isinstance(e, OSError) and e.errno in _ENV_ERRNOS:
    where = f" ({e.filename})" if e.filename else ""
    return f"{_ENV_ERRNOS[e.errno]}{where}: {e.strerror}"
  return None


def file_digest(path: str | None) -> str | None:
  """First 16 hex characters of a file's sha256 (None without a path)."""
  if not path:
    return None
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


# ----------------------------------------------------------------------------
# Per-stack work (runs in the pool workers)
# ----------------------------------------------------------------------------

def _check_geometry(shape: Sequence[int], affine: Any, spacing: Any
                    ) -> tuple[np.ndarray, np.ndarray]:
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"volume has shape {tuple(shape)}, expected (D, H, W)")
  affine = np.asarray(affine, np.float64)
  spacing = np.asarray(spacing, np.float64).reshape(-1)
  if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
    raise ValueError("volume affine is not a finite 4x4 matrix")
  if spacing.shape != (3,) or not np.all(spacing > 0):
    raise ValueError(f"volume spacing {spacing.tolist()} is not 3 positive mm")
  return affine, spacing


def _check_not_blank(voxels: np.ndarray) -> None:
  """A volume whose every voxel has one value holds no image (a header-only
  export, a blanked or failed reconstruction): it would teach the network
  nothing and any prediction on it would come from the biases alone, so it
  is refused with that reason."""
  v = np.asarray(voxels)
  if v.size == 0:
    raise ValueError("empty volume")
  finite = np.isfinite(v)
  if not finite.any():
    raise ValueError("blank image: no finite voxel value")
  lo, hi = float(v[finite].min()), float(v[finite].max())
  # Resampling weights leave float rounding (-1024 vs -1023.9999) on a blank
  # input; any real image varies by far more than 1e-4 of its magnitude.
  if hi - lo <= 1e-4 * max(abs(lo), abs(hi), 1.0):
    raise ValueError(f"blank image: every voxel is {lo:g} (no image data in the pixels)")


def _cached(stack: Any, record: dict, orig_shape: Sequence[int],
            affine: np.ndarray, spacing: np.ndarray, res: rs.Resampled) -> dict:
  """The cache record of a resampled volume (see ``cache_record``)."""
  modality = str(record.get("Modality", "") or "")
  _check_not_blank(res.voxels)
  normed, spec = rs.normalise(res.voxels, modality)
  return {
      "kind": "cache", "cache_version": CACHE_VERSION,
      "volume": normed.astype(np.float16),
      "affine": res.affine,
      "stack": stack.key,
      "modality": modality,
      "normalisation": spec,
      "geometry": {"orig_shape": [int(s) for s in orig_shape],
                   "orig_spacing": [float(s) for s in spacing],
                   "orig_affine": affine.tolist(),
                   "spacing": [float(s) for s in res.spacing]},
      "metadata": safe_metadata(record),
  }


def cache_record(stack: Any, vol: Any, shape: Sequence[int]) -> dict:
  """A loaded Volume -> the cached part of its shard record.

  Returns a dict with ``volume`` float16 ``(D', H', W')`` = ``shape``,
  normalised; ``affine`` float64 ``(4, 4)`` of the resampled grid (voxel ->
  LPS mm); ``geometry`` (original shape/spacing/affine, new spacing in mm);
  ``normalisation``; ``modality``; ``stack``; ``metadata`` (the PHI-filtered
  record after volume assembly). Raises ValueError on a malformed volume.
  """
  voxels = np.asarray(vol.voxels)
  if voxels.ndim != 3:
    raise ValueError(f"volume has shape {voxels.shape}, expected (D, H, W)")
  affine, spacing = _check_geometry(voxels.shape, vol.affine, vol.spacing)
  res = rs.resample(voxels, affine, spacing, shape)
  return _cached(stack, dict(vol.record or stack.record), voxels.shape, affine,
                 spacing, res)


def resampled_cache_record(stack: Any, rv: Any) -> dict:
  """``cache_record`` of a ``dicom.stream.ResampledStack`` (from
  ``load_resampled``): the same dict, bit for bit, as ``cache_record`` of
  ``load_volume(stack)`` at the shape of ``rv.voxels``."""
  affine, spacing = _check_geometry(rv.shape, rv.affine, rv.spacing)
  res = rs.on_grid(np.asarray(rv.voxels, np.float32), rv.shape, affine, spacing)
  return _cached(stack, dict(rv.record or stack.record), rv.shape, affine,
                 spacing, res)


class StageError(Exception):
  """A stack failed at ``stage``; ``error`` is the original exception.

  Stages: "load" (reading and assembling the voxels), "resample" (resampling,
  normalising, encoding), and for callers that label: "label". The message
  is ``"{ErrorType}: {error}"``, the reason written to ``errors.csv``.
  """

  def __init__(self, stage: str, error: BaseException):
    super().__init__(f"{type(error).__name__}: {error}")
    self.stage = stage
    self.error = error


def convert_stack_staged(stack: Any, shape: Sequence[int]) -> dict:
  """``convert_stack``, with any failure raised as ``StageError`` naming the
  stage ("load" or "resample"). The one place that picks the streaming path
  or the ``load_volume`` fallback: ``build_shards``, the Beam pipeline and
  ``radnet_jax.predict`` all call it, so they give the same record.
  """
  shape = tuple(int(s) for s in shape)
  # Handlers catch BaseException: a native decoder's panic is one
  # (pyo3_runtime.PanicException); isolation.is_fatal ones propagate.
  try:
    rv = stream.load_resampled(stack, shape)   # None = declined
  except BaseException as e:  # noqa: BLE001 - it catches every Exception itself
    if isolation.is_fatal(e):
      raise
    raise StageError("load", e) from e
  if rv is not None:
    try:
      return resampled_cache_record(stack, rv)
    except BaseException as e:  # noqa: BLE001 - re-raised with its stage
      if isolation.is_fatal(e):
        raise
      raise StageError("resample", e) from e
  try:
    vol = volume.load_volume(stack)
  except BaseException as e:  # noqa: BLE001
    if isolation.is_fatal(e):
      raise
    raise StageError("load", e) from e
  try:
    return cache_record(stack, vol, shape)
  except BaseException as e:  # noqa: BLE001
    if isolation.is_fatal(e):
      raise
    raise StageError("resample", e) from e


def convert_stack(stack: Any, shape: Sequence[int]) -> dict:
  """The cache record of one stack (raises the original error on bad input).

  Classic stacks are decoded straight onto the shard grid
  (``dicom.stream.load_resampled``: no full-resolution volume); everything
  else, and every stack that path declines, goes through ``load_volume`` +
  ``cache_record``. Both give the same record.
  """
  try:
    return convert_stack_staged(stack, shape)
  except StageError as e:
    error = e.error
  raise error   # outside the handler: the original error, cause and traceback


# ----------------------------------------------------------------------------
# Shard records and counts (labels: radnet_jax.shards.labelling)
# ----------------------------------------------------------------------------

def shard_record(cached: Mapping[str, Any], entry: Mapping[str, Any], split: str,
                  taxonomy: str) -> dict:
  """The pretraining record (schema in radnet_jax.shards.records) of one stack."""
  targets = dict(entry["targets"])
  coverage = np.asarray(targets.pop("coverage"), np.float32)
  md = entry["md"]
  return {
      "kind": "pretrain",
      "volume": cached["volume"],
      "affine": cached["affine"],
      "coverage": coverage,
      "targets": targets,
      "labels": entry["labels"],
      "provenance": entry["provenance"],
      "taxonomy": taxonomy,
      "series": md.get("SeriesHash", ""),
      "study": md.get("StudyHash", ""),
      "patient": md.get("PatientHash", ""),
      "stack": entry["key"],
      "split": split,
      "modality": cached["modality"],
      "geometry": cached["geometry"],
      "normalisation": cached["normalisation"],
      "metadata": md,
  }


def counts(items: list[dict], tax: tx.Taxonomy) -> dict:
  """{task: {class text: n}} incl. unknown; coverage per band; spacing stats."""
  out: dict[str, Any] = {}
  for task in ("sequence", "plane", "contrast"):
    c = collections.Counter(e["labels"][task] for e in items)
    out[task] = {k: c.get(k, 0) for k in list(tax.classes(task)) + [tx.UNKNOWN]}
    out[task].update({k: v for k, v in sorted(c.items()) if k not in out[task]})
  cov = collections.Counter()
  for e in items:
    text = e["labels"]["coverage"]
    if text == tx.UNKNOWN:
      cov[tx.UNKNOWN] += 1
    else:
      cov.update(text.split("|"))
  out["coverage"] = {k: cov.get(k, 0) for k in list(tx.COVERAGE_BANDS) + [tx.UNKNOWN]}
  spacing = [float(e["targets"]["spacing"]) for e in items
             if not math.isnan(float(e["targets"]["spacing"]))]
  out["spacing"] = _spacing_stats(spacing, len(items))
  return out


def _spacing_stats(values: list[float], n: int) -> dict:
  if not values:
    return {"known": 0, "unknown": n, "min": None, "median": None, "max": None}
  v = np.asarray(values)
  return {"known": len(values), "unknown": n - len(values),
          "min": round(float(v.min()), 4), "median": round(float(np.median(v)), 4),
          "max": round(float(v.max()), 4)}


# ----------------------------------------------------------------------------
# Paths in logs
# ----------------------------------------------------------------------------

class PathScrubber:
  """Paths in logs: relative to the input root (or salted hashes); the root is never shown."""

  def __init__(self, root: str, salt: str, hash_paths: bool):
    self.root = os.path.abspath(root)
    self.real = os.path.realpath(root)
    self.given = root.rstrip(os.sep)
    self.salt = salt
    self.hash_paths = hash_paths

  def rel(self, path: str) -> str:
    p = path if os.path.isabs(path) else os.path.join(self.root, path)
    p = os.path.abspath(p)
    for base in (self.root, self.real):
      if p == base or p.startswith(base + os.sep):
        return os.path.relpath(p, base)
    return os.path.basename(p)

  def show(self, path: str) -> str:
    rel = self.rel(path)
    return privacy.hash_id(rel, self.salt) if self.hash_paths else rel

  def text(self, text: str, paths: Sequence[str] = ()) -> str:
    """Removes the root (and, with hash_paths, the given paths) from free text."""
    text = str(text)
    if self.hash_paths:
      for p in sorted({os.path.abspath(x) if os.path.isabs(x) else
                       os.path.join(self.root, x) for x in paths}, key=len,
                      reverse=True):
        text = text.replace(p, self.show(p))
    for base in sorted({self.root, self.real, self.given}, key=len, reverse=True):
      if base:
        text = text.replace(base + os.sep, "").replace(base, ".")
    if self.hash_paths:
      for p in sorted({self.rel(x) for x in paths}, key=len, reverse=True):
        if p and p != ".":
          text = text.replace(p, privacy.hash_id(p, self.salt))
    return text.replace("\n", " ").replace("\r", " ")


def locate(input_dir: str, out_dir: str, hashes: Sequence[str], *,
           salt: str | None = None) -> dict[str, str]:
  """The input paths behind hashed ``errors.csv`` paths.

  Walks ``input_dir`` (the root the conversion was given) and hashes every
  file's and folder's path relative to it with the conversion's salt
  (``privacy.load_salt(out_dir, salt)``). Returns {hash: relative path} for
  the hashes found; run it where the archive is, and print rather than
  store the result (it is PHI wherever the names are).
  """
  salt = privacy.load_salt(out_dir, salt)
  want = set(hashes)
  found: dict[str, str] = {}
  root = os.path.abspath(input_dir)
  if os.path.isfile(root):
    rel = os.path.basename(root)
    if privacy.hash_id(rel, salt) in want:
      found[privacy.hash_id(rel, salt)] = rel
    return found
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in [""] + sorted(filenames):
      rel = os.path.relpath(os.path.join(dirpath, name), root) if name else \
          os.path.relpath(dirpath, root)
      h = privacy.hash_id(rel, salt)
      if h in want:
        found[h] = rel
    if len(found) == len(want):
      break
  return found


def stack_dir(files: Sequence[str]) -> str:
  """The folder holding a stack's files (their common parent)."""
  if not files:
    return ""
  try:
    return os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
  except ValueError:
    return os.path.dirname(os.path.abspath(files[0]))


# ----------------------------------------------------------------------------
# Reading the cache and the shards
# ----------------------------------------------------------------------------

def read_header(path: str) -> dict:
  """The JSON meta of a cached record file, without reading the payload."""
  return records.read_meta(path)


def read_record(path: str) -> dict:
  with open(path, "rb") as f:
    return records.decode(f.read())


def read_manifest(out_dir: str) -> dict:
  """The ``manifest.json`` of a conversion output directory (``records.read_manifest``)."""
  return records.read_manifest(out_dir, "pretrain")


def shard_paths(out_dir: str, split: str) -> list[str]:
  """Paths of the ArrayRecord shards of one split, in order (may be empty)."""
  manifest = read_manifest(out_dir)
  if split not in manifest["shards"]:
    raise KeyError(f"{out_dir}/{MANIFEST}: no split {split!r}; "
                   f"have {sorted(manifest['shards'])}")
  return [os.path.join(out_dir, s["file"]) for s in manifest["shards"][split]]


def iter_records(out_dir: str, split: str) -> Iterator[dict]:
  """Decoded records of one split, shard by shard (for inspection and tests)."""
  for path in shard_paths(out_dir, split):
    reader = ArrayRecordReader(path)
    try:
      for i in range(reader.num_records()):
        yield records.decode(reader.read([i])[0])
    finally:
      reader.close()




def __getattr__(name: str) -> Any:
  """``convert.build_shards`` moved to ``radnet_jax.shards.build``; the old
  spelling keeps working for a release, with a deprecation warning."""
  if name == "build_shards":
    import warnings  # pylint: disable=import-outside-toplevel
    # build imports this module, so the runner can only be imported lazily.
    from radnet_jax.shards import build  # pylint: disable=import-outside-toplevel
    warnings.warn("radnet_jax.shards.convert.build_shards moved to "
                  "radnet_jax.shards.build.build_shards", DeprecationWarning,
                  stacklevel=2)
    return build.build_shards
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
