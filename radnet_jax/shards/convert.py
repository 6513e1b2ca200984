"""DICOM folders -> labelled, PHI-free ArrayRecord shards (the pretraining data).

``build_shards(input_dir, out_dir)`` runs, in order:

1. **scan** (``radnet_jax.dicom.scan``): headers only, stacks + skip reasons.
2. **convert** each stack in a process pool (all cores by default):
   ``load_volume`` -> ``resample.resample`` to ``shape`` -> modality-aware
   ``resample.normalise`` -> float16 (``convert_stack``; classic stacks take
   ``dicom.volume.load_resampled``, which decodes the slices straight onto
   the ``shape`` grid without the full-resolution volume and gives the same
   record bit for bit). Each worker holds at most one volume and writes
   its result to the *work cache* ``out_dir/.work/<config>/<stack>.rec``
   (write to a temporary name, then atomic rename). A stack whose cache file
   exists is not converted again: this is what makes a killed run resumable.
   The cache is keyed by the volume settings (shape, normalisation, salt), so
   a run with another shape never reuses stale volumes.
3. **assemble** in sorted StackKey order (deterministic): label each cached
   stack (``radnet_jax.labels.label`` + curator overrides, which win and are
   recorded as ``override:...`` provenance), assign its split from the hashed
   patient, encode the record (schema in ``radnet_jax.shards.records``) and write
   ``{split}-{index:05d}-of-{count:05d}.array_record`` shards
   (``group_size:1`` for cheap random access by grain). Shards are written to
   temporary names and renamed, so a kill during assembly leaves no
   half-written shard under a final name. Labelling at assembly time means a
   re-run with a corrected ``--overrides`` file reuses every cached volume and
   only rewrites the shards.
4. **report**: ``manifest.json``, ``errors.csv``, ``labels.csv``,
   ``report.md``, ``montage_<task>.png`` (see ``radnet_jax.shards.report``).

Determinism: same input + same salt (``out_dir/.salt``, see
``radnet_jax.privacy.load_or_create_salt``) -> byte-identical shards, manifest
and CSVs, whatever the number of workers and however often the run was
interrupted. The work cache is kept (``keep_work=True``) so that re-runs are
cheap; it costs about as much disk as the shards; pass ``keep_work=False``
(``--clean-work``) to delete it after a successful run.

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
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import time
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from radnet_jax import privacy
from radnet_jax.shards import records
from radnet_jax.shards import report
from radnet_jax import resample as rs
from radnet_jax.labels import taxonomy as tx

DEFAULT_SHAPE = (48, 192, 192)
DEFAULT_SPLIT = (0.8, 0.1, 0.1)
SPLITS = ("train", "val", "test")
# 48x192x192 float16 is 3.5 MB: 128 records ~ 450 MB per shard file.
DEFAULT_RECORDS_PER_SHARD = 128
WRITER_OPTIONS = "group_size:1"
MANIFEST = records.MANIFEST
WORK_DIR = ".work"
# Bump when the cached volume content changes (resampling, normalisation).
CACHE_VERSION = 1
_SHARD_RE = re.compile(r"^(train|val|test)-\d{5}-of-\d{5}\.array_record$")

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
    if key in _PHI_KEYS or "Date" in key or "Birth" in key:
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


def _atomic_write(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def _file_digest(path: str | None) -> str | None:
  if not path:
    return None
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


# ----------------------------------------------------------------------------
# Per-stack work (runs in the pool workers)
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Job:
  stack: Any            # radnet_jax.dicom.Stack
  shape: tuple
  cache_path: str


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


def _cached(stack: Any, record: dict, orig_shape: Sequence[int],
            affine: np.ndarray, spacing: np.ndarray, res: rs.Resampled) -> dict:
  """The cache record of a resampled volume (see ``cache_record``)."""
  modality = str(record.get("Modality", "") or "")
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
  """``cache_record`` of a ``dicom.volume.ResampledStack`` (from
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
  from radnet_jax.dicom import volume  # pylint: disable=import-outside-toplevel
  shape = tuple(int(s) for s in shape)
  rv = volume.load_resampled(stack, shape)   # never raises; None = declined
  if rv is not None:
    try:
      return resampled_cache_record(stack, rv)
    except Exception as e:  # noqa: BLE001 - re-raised with its stage
      raise StageError("resample", e) from e
  try:
    vol = volume.load_volume(stack)
  except Exception as e:  # noqa: BLE001
    raise StageError("load", e) from e
  try:
    return cache_record(stack, vol, shape)
  except Exception as e:  # noqa: BLE001
    raise StageError("resample", e) from e


def convert_stack(stack: Any, shape: Sequence[int]) -> dict:
  """The cache record of one stack (raises the original error on bad input).

  Classic stacks are decoded straight onto the shard grid
  (``dicom.volume.load_resampled``: no full-resolution volume); everything
  else, and every stack that path declines, goes through ``load_volume`` +
  ``cache_record``. Both give the same record.
  """
  try:
    return convert_stack_staged(stack, shape)
  except StageError as e:
    error = e.error
  raise error   # outside the handler: the original error, cause and traceback


def _run_job(job: _Job) -> tuple:
  """Pool entry point: converts one stack into its cache file.

  Returns ("ok", key) or ("error", key, stage, reason); never raises, so one
  bad series never stops the conversion. The worker holds at most one
  volume (none on the streaming path).
  """
  key = job.stack.key
  try:
    data = records.encode(convert_stack_staged(job.stack, job.shape))
    _atomic_write(job.cache_path, data)
    return ("ok", key)
  except StageError as e:
    return ("error", key, e.stage, str(e))
  except Exception as e:  # noqa: BLE001 - any failure is logged per stack
    return ("error", key, "resample", f"{type(e).__name__}: {e}")


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
  """Workers inherit this env at spawn: one BLAS thread each, no oversubscription."""
  keys = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
  old = {k: os.environ.get(k) for k in keys}
  os.environ.update({k: "1" for k in keys})
  try:
    yield
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _run_jobs(jobs: list[_Job], workers: int, on_result) -> None:
  """Runs jobs (in-process when workers == 1), calling on_result per job.

  A worker that dies (segfault in a codec, OOM kill) breaks the pool: the
  unfinished jobs are then retried, the first of them alone in a fresh
  one-worker pool, so the job that kills its process is identified, logged
  with stage "crash", and the conversion goes on.
  """
  if workers <= 1:
    for job in jobs:
      on_result(_run_job(job))
    return
  ctx = multiprocessing.get_context("spawn")   # safe even if jax is loaded
  pending = list(jobs)
  with _one_blas_thread():
    while pending:
      done: set[str] = set()
      try:
        with cf.ProcessPoolExecutor(min(workers, len(pending)), mp_context=ctx) as ex:
          futures = {ex.submit(_run_job, j): j for j in pending}
          for fut in cf.as_completed(futures):
            res = fut.result()
            done.add(futures[fut].stack.key)
            on_result(res)
        pending = []
      except cf.process.BrokenProcessPool:
        rest = []
        for j in pending:
          if j.stack.key in done:
            continue
          if os.path.exists(j.cache_path):   # finished before the pool broke
            on_result(("ok", j.stack.key))
          else:
            rest.append(j)
        if not rest:
          break
        suspect, pending = rest[0], rest[1:]
        try:
          with cf.ProcessPoolExecutor(1, mp_context=ctx) as ex:
            on_result(ex.submit(_run_job, suspect).result())
        except cf.process.BrokenProcessPool:
          on_result(("error", suspect.stack.key, "crash",
                     "worker process died while loading this stack "
                     "(crash in a pixel decoder, or out of memory)"))


# ----------------------------------------------------------------------------
# Labels, overrides
# ----------------------------------------------------------------------------

def _load_overrides(path: str | None, taxonomy: str):
  if not path:
    return None
  from radnet_jax.labels import overrides as ov
  return ov.load_overrides(path, taxonomy)


def load_priors(priors: Any):
  """None | "none" -> no priors; "builtin" -> the built-in table; a file path
  -> that file's rules before the built-in ones; a Priors object as is."""
  if priors is None or (isinstance(priors, str) and priors.lower() == "none"):
    return None
  from radnet_jax.labels import priors as pr
  if isinstance(priors, str):
    if priors.lower() == "builtin":
      return pr.Priors.builtin()
    if not os.path.isfile(priors):
      raise FileNotFoundError(f"{priors}: priors file does not exist")
    return pr.Priors.from_file(priors)
  return priors


def _priors_id(priors: Any, loaded: Any) -> str | None:
  """How the manifest names the priors: never a path (paths may hold PHI)."""
  if loaded is None:
    return None
  if isinstance(priors, str) and os.path.isfile(priors):
    return f"file sha256:{_file_digest(priors)} + builtin"
  return "builtin" if isinstance(priors, str) else "custom"


def _label(metadata: Mapping[str, Any], stack_key: str, taxonomy: str,
           priors: Any, overrides: Any) -> dict:
  """Rule labels of a stored record, then the curator's override if any."""
  from radnet_jax import labels as lb
  record = dict(metadata)
  record.setdefault("StackKey", stack_key)
  labels = lb.label(record, taxonomy=taxonomy, priors=priors)
  if overrides:
    row = lb.find_override(overrides, series=str(record.get("SeriesHash", "")),
                           stack=stack_key)
    labels = lb.apply_overrides(labels, row)
  return labels


# ----------------------------------------------------------------------------
# Paths in logs
# ----------------------------------------------------------------------------

class _PathScrubber:
  """Paths relative to the input root (or salted hashes); the root is never shown."""

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


def _stack_dir(files: Sequence[str]) -> str:
  if not files:
    return ""
  try:
    return os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
  except ValueError:
    return os.path.dirname(os.path.abspath(files[0]))


# ----------------------------------------------------------------------------
# Reading the cache and the shards
# ----------------------------------------------------------------------------

def _read_header(path: str) -> dict:
  """The JSON meta of an encoded record file, without reading the payload."""
  head = records._HEAD   # pylint: disable=protected-access
  with open(path, "rb") as f:
    raw = f.read(head.size)
    magic, _, hlen = head.unpack(raw)
    if magic != records.MAGIC:
      raise ValueError(f"{os.path.basename(path)}: not a RadNet record")
    return json.loads(f.read(hlen))["meta"]


def _read_record(path: str) -> dict:
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
  from array_record.python.array_record_module import ArrayRecordReader
  for path in shard_paths(out_dir, split):
    reader = ArrayRecordReader(path)
    try:
      for i in range(reader.num_records()):
        yield records.decode(reader.read([i])[0])
    finally:
      reader.close()


# ----------------------------------------------------------------------------
# The conversion
# ----------------------------------------------------------------------------

def _cache_dir(out_dir: str, shape: Sequence[int], salt: str) -> str:
  """Work cache folder for these volume settings; stale ones are removed."""
  fp = json.dumps({"v": CACHE_VERSION, "shape": list(shape),
                   "norm": [rs.CT_WINDOW, rs.PERCENTILES],
                   "salt": privacy.hash_id("cache", salt)}, sort_keys=True)
  name = hashlib.sha256(fp.encode()).hexdigest()[:12]
  work = os.path.join(out_dir, WORK_DIR)
  if os.path.isdir(work):
    for old in os.listdir(work):
      if old != name:
        shutil.rmtree(os.path.join(work, old), ignore_errors=True)
  path = os.path.join(work, name)
  os.makedirs(path, exist_ok=True)
  return path


def _spacing_stats(values: list[float], n: int) -> dict:
  if not values:
    return {"known": 0, "unknown": n, "min": None, "median": None, "max": None}
  v = np.asarray(values)
  return {"known": len(values), "unknown": n - len(values),
          "min": round(float(v.min()), 4), "median": round(float(np.median(v)), 4),
          "max": round(float(v.max()), 4)}


def _print_summary(summary: Mapping[str, Any]) -> None:
  rows = [("stacks found", summary["stacks"]),
          ("converted now", summary["converted"]),
          ("reused from work cache", summary["cached"]),
          ("failed (load/resample/label/crash)", summary["failed"]),
          ("skipped by scan (files)", summary["skipped_by_scan"])]
  rows += [(f"records {s}", summary["num_records"][s]) for s in SPLITS]
  rows += [(f"shards {s}", summary["num_shards"][s]) for s in SPLITS]
  rows.append(("seconds", f"{summary['seconds']:.1f}"))
  width = max(len(r[0]) for r in rows)
  print("-" * (width + 12))
  for name, value in rows:
    print(f"{name:<{width}}  {value:>8}")
  print("-" * (width + 12))


def build_shards(input_dir: str, out_dir: str, *,
                 shape: Sequence[int] = DEFAULT_SHAPE,
                 overrides: str | None = None,
                 workers: int | None = None,
                 taxonomy: str = "paper",
                 priors: Any = None,
                 salt: str | None = None,
                 records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
                 seed: int = 0,
                 split: Sequence[float] = DEFAULT_SPLIT,
                 hash_paths: bool = True,
                 keep_work: bool = True,
                 progress: bool = True) -> dict:
  """Converts a DICOM folder tree into labelled ArrayRecord shards.

  Args:
    input_dir: root of the DICOM archive (searched recursively).
    out_dir: output folder (created): shards, manifest.json, errors.csv,
      labels.csv, report.md, montage_<task>.png, .salt, .work/ (cache).
    shape: ``(D, H, W)`` voxels of every stored volume.
    overrides: a curator's labels CSV (``labels.csv`` edited), keyed by series
      or stack hash; its labels win and are recorded as overrides.
    workers: processes (default: all available cores; 1 = in-process).
    taxonomy: "paper" or "extended".
    priors: dataset-level label priors: None (none), "builtin", a CSV/JSON
      file (its rules first, then the built-in ones) or a ``Priors`` object.
    salt: identifier hashing salt (default: ``load_or_create_salt(out_dir)``).
    records_per_shard: records per ArrayRecord file.
    seed: split seed (patients -> splits).
    split: train/val/test fractions (normalised to sum 1).
    hash_paths: write salted hashes of the relative paths in errors.csv
      (default; ``locate`` maps them back); False writes the relative paths.
    keep_work: keep the per-stack work cache (fast resume and re-labelling).
    progress: tqdm bars and a summary table on stdout.
  Returns:
    a summary dict: stack counts (found, converted, cached, failed),
    skipped_by_scan, num_records and num_shards per split, seconds.
  """
  from radnet_jax import dicom
  t0 = time.perf_counter()
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"shape must be 3 positive sizes (D, H, W), got {shape}")
  if taxonomy not in tx.SEQUENCE_CLASSES:
    raise ValueError(f"unknown taxonomy {taxonomy!r}; "
                     f"choose from {sorted(tx.SEQUENCE_CLASSES)}")
  split = tuple(float(f) for f in split)
  if len(split) != 3 or min(split) < 0 or sum(split) <= 0:
    raise ValueError(f"split must be 3 non-negative fractions, got {split}")
  if records_per_shard < 1:
    raise ValueError("records_per_shard must be >= 1")
  if not os.path.isdir(input_dir):
    raise FileNotFoundError(f"{input_dir}: input folder does not exist")
  if workers is None:
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else (os.cpu_count() or 1)
  os.makedirs(out_dir, exist_ok=True)
  salt = privacy.load_or_create_salt(out_dir, salt)
  scrub = _PathScrubber(input_dir, salt, hash_paths)
  override_table = _load_overrides(overrides, taxonomy)
  priors_obj = load_priors(priors)
  errors: list[dict] = []

  # --- scan -------------------------------------------------------------------
  scanned = dicom.scan(input_dir, salt=salt, workers=workers, progress=progress)
  for sk in scanned.skipped:
    errors.append({"path": scrub.show(sk.path), "series": sk.series, "stack": "",
                   "stage": "scan", "reason": scrub.text(sk.reason, [sk.path])})
  stacks: dict[str, Any] = {}
  for st in sorted(scanned.stacks, key=lambda s: s.key):
    if st.key in stacks:
      errors.append({"path": scrub.show(_stack_dir(st.files)),
                     "series": st.record.get("SeriesHash", ""), "stack": st.key,
                     "stage": "scan", "reason": "duplicate stack key; kept the first"})
      continue
    stacks[st.key] = st
  del scanned

  # --- convert (parallel, resumable) ------------------------------------------
  cache = _cache_dir(out_dir, shape, salt)
  jobs, cached = [], 0
  for key, st in stacks.items():
    path = os.path.join(cache, f"{privacy.safe_name(key)}.rec")
    if os.path.exists(path):
      cached += 1
    else:
      jobs.append(_Job(st, shape, path))
  failed: dict[str, tuple[str, str]] = {}
  bar = None
  if progress and jobs:
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc="convert", unit="stack")

  def on_result(res: tuple) -> None:
    if res[0] == "error":
      failed[res[1]] = (res[2], res[3])
    if bar is not None:
      bar.update(1)

  _run_jobs(jobs, workers, on_result)
  if bar is not None:
    bar.close()
  for key, (stage, reason) in sorted(failed.items()):
    st = stacks[key]
    errors.append({"path": scrub.show(_stack_dir(st.files)),
                   "series": st.record.get("SeriesHash", ""), "stack": key,
                   "stage": stage, "reason": scrub.text(reason, st.files)})

  # --- label + split (reads only record headers) ------------------------------
  tax = tx.Taxonomy(taxonomy)
  montage = report.MontageCollector()
  prov_counts: dict[str, collections.Counter] = collections.defaultdict(
      collections.Counter)
  entries: dict[str, list[dict]] = {s: [] for s in SPLITS}
  label_rows = []
  keys = [k for k in stacks if k not in failed]
  for key in keys:
    path = os.path.join(cache, f"{privacy.safe_name(key)}.rec")
    st = stacks[key]
    try:
      meta = _read_header(path)
      labels = _label(meta["metadata"], key, taxonomy, priors_obj,
                      override_table)
      targets = tax.encode(labels)
    except Exception as e:  # noqa: BLE001
      errors.append({"path": scrub.show(_stack_dir(st.files)),
                     "series": st.record.get("SeriesHash", ""), "stack": key,
                     "stage": "label", "reason": scrub.text(f"{type(e).__name__}: {e}",
                                                            st.files)})
      continue
    md = meta["metadata"]
    sp = split_of(patient_key(md, key), split, seed)
    texts = {t: labels[t].as_text() if t in labels else tx.UNKNOWN for t in tx.TASKS}
    provs = {t: labels[t].provenance if t in labels else "unknown:not labelled"
             for t in tx.TASKS}
    for t in tx.TASKS:
      prov_counts[t][report.provenance_rule(provs[t])] += 1
    entries[sp].append({"key": key, "path": path, "labels": texts, "provenance": provs,
                        "targets": targets, "md": md})
    label_rows.append({"stack": key, "series_hash": md.get("SeriesHash", ""), "split": sp,
                       "modality": meta.get("modality", ""), **texts,
                       **{f"{t}_provenance": provs[t] for t in tx.TASKS}})
    if any(len(montage.slices[t][c]) < montage.per_class
           for t, c in ((t, v) for t in texts if t != "spacing"
                        for v in texts[t].split("|"))):
      montage.add(_read_record(path)["volume"], texts, key)

  # --- write shards (sorted stack order, one record in memory) ----------------
  from array_record.python.array_record_module import ArrayRecordWriter
  shards: dict[str, list[dict]] = {s: [] for s in SPLITS}
  counts: dict[str, dict] = {}
  written = set()
  bar = None
  total = sum(len(v) for v in entries.values())
  if progress and total:
    from tqdm import tqdm
    bar = tqdm(total=total, desc="write shards", unit="record")
  for sp in SPLITS:
    items = entries[sp]
    n_shards = math.ceil(len(items) / records_per_shard)
    for i in range(n_shards):
      chunk = items[i * records_per_shard:(i + 1) * records_per_shard]
      name = shard_name(sp, i, n_shards)
      tmp = os.path.join(out_dir, name + ".tmp")
      writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
      try:
        for e in chunk:
          cached_rec = _read_record(e["path"])
          writer.write(records.encode(_shard_record(cached_rec, e, sp, taxonomy)))
          if bar is not None:
            bar.update(1)
      finally:
        writer.close()
      os.replace(tmp, os.path.join(out_dir, name))
      shards[sp].append({"file": name, "records": len(chunk)})
      written.add(name)
    counts[sp] = _counts(items, tax)
  if bar is not None:
    bar.close()
  for name in os.listdir(out_dir):   # shards of an earlier, larger run
    if (_SHARD_RE.match(name) and name not in written) or name.endswith(
        ".array_record.tmp"):
      os.remove(os.path.join(out_dir, name))

  # --- manifest, CSVs, report -------------------------------------------------
  errors.sort(key=lambda r: (r["stage"] != "scan", r["path"], r["stack"], r["reason"]))
  num_records = {s: len(entries[s]) for s in SPLITS}
  manifest = {
      "schema_version": records.SCHEMA_VERSION,
      "kind": "pretrain",
      "taxonomy": taxonomy,
      "tasks": list(tx.TASKS),
      "classes": {t: list(tax.classes(t)) for t in ("sequence", "plane", "contrast",
                                                    "coverage")},
      "shape": list(shape),
      "dtype": "float16",
      "normalisation": {"CT": rs.normalisation_for("CT"),
                        "other": rs.normalisation_for("MR"),
                        "doc": "see radnet_jax/resample.py"},
      "splits": list(SPLITS),
      "num_records": num_records,
      "num_errors": len(errors),
      "shards": shards,
      "counts": counts,
      "config": {"shape": list(shape), "taxonomy": taxonomy,
                 "split": list(split), "seed": seed,
                 "records_per_shard": records_per_shard,
                 "writer_options": WRITER_OPTIONS,
                 "overrides_sha256": _file_digest(overrides),
                 "priors": _priors_id(priors, priors_obj),
                 "hash_paths": hash_paths, "cache_version": CACHE_VERSION},
  }
  report.write_errors_csv(os.path.join(out_dir, "errors.csv"), errors)
  report.write_labels_csv(os.path.join(out_dir, "labels.csv"),
                          sorted(label_rows, key=lambda r: r["stack"]))
  montages = montage.write(out_dir, {t: tax.classes(t) for t in
                                     ("sequence", "plane", "contrast", "coverage")})
  reasons = collections.Counter(f"{e['stage']}: {e['reason'][:80]}" for e in errors)
  report.write_report_md(os.path.join(out_dir, "report.md"), manifest,
                         {t: dict(c) for t, c in prov_counts.items()}, reasons,
                         montages)
  _atomic_write(os.path.join(out_dir, MANIFEST),
                json.dumps(manifest, indent=1, sort_keys=True).encode())
  if not keep_work:
    shutil.rmtree(os.path.join(out_dir, WORK_DIR), ignore_errors=True)

  summary = {"stacks": len(stacks), "converted": len(jobs) - len(failed),
             "cached": cached, "failed": len(failed) + sum(
                 e["stage"] == "label" for e in errors),
             "skipped_by_scan": sum(e["stage"] == "scan" for e in errors),
             "num_records": num_records,
             "num_shards": {s: len(shards[s]) for s in SPLITS},
             "seconds": time.perf_counter() - t0}
  if progress:
    _print_summary(summary)
  return summary


def _shard_record(cached: Mapping[str, Any], entry: Mapping[str, Any], split: str,
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


def _counts(items: list[dict], tax: tx.Taxonomy) -> dict:
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
