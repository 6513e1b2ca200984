"""The archive runner: DICOM folders -> labelled, PHI-free ArrayRecord shards.

``build_shards(input_dir, out_dir)`` runs, in order (one function per stage
below; the per-stack work is ``radnet_jax.shards.convert``):

1. **scan** (``radnet_jax.dicom.scan``): headers only, stacks + skip reasons.
2. **convert** each stack in a process pool (all cores by default):
   ``convert.convert_stack_staged`` -> float16 cache record. Each worker
   holds at most one volume and writes its result to the *work cache*
   ``out_dir/.work/<config>/<stack>.rec`` (write to a temporary name, then
   atomic rename). A stack whose cache file exists is not converted again:
   this is what makes a killed run resumable. The cache is keyed by the
   volume settings (shape, normalisation, salt), so a run with another shape
   never reuses stale volumes.
3. **label** in sorted StackKey order (deterministic): ``labelling.label_entry``
   on each cached stack's header, its split from the hashed patient.
   Labelling at assembly time means a re-run with a corrected ``--overrides``
   file reuses every cached volume and only rewrites the shards.
4. **write shards**: ``{split}-{index:05d}-of-{count:05d}.array_record``
   (``group_size:1`` for cheap random access by grain), written to temporary
   names and renamed, so a kill during assembly leaves no half-written shard
   under a final name.
5. **report**: ``manifest.json``, ``errors.csv``, ``labels.csv``,
   ``report.md``, ``montage_<task>.png`` (see ``radnet_jax.shards.report``).

Determinism: same input + same salt (``out_dir/.salt``, see
``radnet_jax.privacy.load_or_create_salt``) -> byte-identical shards, manifest
and CSVs, whatever the number of workers and however often the run was
interrupted. The work cache is kept (``keep_work=True``) so that re-runs are
cheap; it costs about as much disk as the shards; pass ``keep_work=False``
(``--clean-work``) to delete it after a successful run.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from typing import Any, Iterator, Mapping, Sequence

from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from radnet_jax import dicom
from radnet_jax.dicom import isolation
from radnet_jax import privacy
from radnet_jax import resample as rs
from radnet_jax.labels import taxonomy as tx
from radnet_jax.shards import convert
from radnet_jax.shards import labelling
from radnet_jax.shards import records
from radnet_jax.shards import report
from radnet_jax.shards.convert import (CACHE_VERSION, DEFAULT_RECORDS_PER_SHARD,
                                       DEFAULT_SHAPE, DEFAULT_SPLIT, MANIFEST, SPLITS,
                                       WORK_DIR, WRITER_OPTIONS)

__all__ = ["build_shards", "CACHE_VERSION", "DEFAULT_RECORDS_PER_SHARD",
           "DEFAULT_SHAPE", "DEFAULT_SPLIT", "MANIFEST", "SPLITS", "WORK_DIR",
           "WRITER_OPTIONS"]


# ----------------------------------------------------------------------------
# Per-stack jobs (run in the pool workers)
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Job:
  stack: Any            # radnet_jax.dicom.Stack
  shape: tuple
  cache_path: str


class RunStopped(RuntimeError):
  """The machine, not the data, stopped the run (a full or read-only disk,
  no permission on the output, out of memory). Nothing about it is written
  to errors.csv; rerunning once it is fixed resumes from the work cache."""


def _run_job(job: _Job) -> tuple:
  """Pool entry point: converts one stack into its cache file.

  Returns ("ok", key), ("error", key, stage, reason) for a property of the
  data (one bad series never stops the conversion) or ("fatal", key,
  reason) for an environment error (``convert.environment_error``; any
  failure to write the cache file). The worker holds at most one volume
  (none on the streaming path).
  """
  key = job.stack.key
  try:
    data = records.encode(convert.convert_stack_staged(job.stack, job.shape))
  except convert.StageError as e:
    env = convert.environment_error(e.error)
    return ("fatal", key, env) if env else ("error", key, e.stage, str(e))
  except BaseException as e:  # noqa: BLE001 - a panic is a BaseException
    if isolation.is_fatal(e):
      raise
    env = convert.environment_error(e)
    return ("fatal", key, env) if env else (
        "error", key, "resample", f"{type(e).__name__}: {e}")
  try:
    convert.atomic_write(job.cache_path, data)
  except OSError as e:
    return ("fatal", key, convert.environment_error(e) or
            f"cannot write the work cache {job.cache_path}: {e}")
  return ("ok", key)


def _run_jobs(jobs: list[_Job], workers: int, on_result,
              file_timeout_s: float = isolation.DEFAULT_FILE_TIMEOUT_S) -> None:
  """Runs jobs, calling on_result per job (in completion order).

  Native pixel decoders run only in worker processes (``dicom.isolation``):
  a worker that crashes or hangs on a file is attributed to its job (stage
  "crash" or "timeout", naming the file), replaced, and the others go on.
  With ``workers == 1`` jobs run in this process until one needs a native
  decoder (compressed pixel data); those go to one long-lived worker.
  """
  env = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
  # closing(): an on_result that raises (RunStopped) stops the workers at once.
  with contextlib.closing(isolation.map_isolated(
      _run_job, jobs, workers, file_timeout_s=file_timeout_s, env=env)) as results:
    for index, kind, value in results:
      if kind == "ok":
        on_result(value)
      elif kind == "raised":   # _run_job never raises: a bug, logged per stack
        on_result(("error", jobs[index].stack.key, "crash", value))
      else:
        on_result(("error", jobs[index].stack.key, kind, value))


# ----------------------------------------------------------------------------
# Stages of build_shards
# ----------------------------------------------------------------------------

def _error_row(scrub: convert.PathScrubber, stack: Any, stage: str, reason: str) -> dict:
  return {"path": scrub.show(convert.stack_dir(stack.files)),
          "series": stack.record.get("SeriesHash", ""), "stack": stack.key,
          "stage": stage, "reason": scrub.text(reason, stack.files)}


def _check_args(shape: Sequence[int], taxonomy: str, split: Sequence[float],
                records_per_shard: int, input_dir: str, workers: int | None
                ) -> tuple[tuple, tuple, int]:
  """Validated (shape, split, workers); raises ValueError/FileNotFoundError."""
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
  return shape, split, workers


def _scan_stage(input_dir: str, salt: str, workers: int, progress: bool,
                scrub: convert.PathScrubber, errors: list[dict]) -> dict[str, Any]:
  """Stacks by key (sorted, first of duplicate keys); skips go to ``errors``."""
  scanned = dicom.scan(input_dir, salt=salt, workers=workers, progress=progress)
  for sk in scanned.skipped:
    errors.append({"path": scrub.show(sk.path), "series": sk.series, "stack": "",
                   "stage": "scan", "reason": scrub.text(sk.reason, [sk.path])})
  stacks: dict[str, Any] = {}
  for st in sorted(scanned.stacks, key=lambda s: s.key):
    if st.key in stacks:
      errors.append(_error_row(scrub, st, "scan", "duplicate stack key; kept the first"))
      continue
    stacks[st.key] = st
  return stacks


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
  for old in os.listdir(path):   # a run killed (or out of space) mid-write
    if ".tmp" in old:
      with contextlib.suppress(OSError):
        os.remove(os.path.join(path, old))
  return path


@contextlib.contextmanager
def _stop_on_os_error(what: str) -> Iterator[None]:
  """An OSError (or MemoryError) while writing our own output is the
  machine's, never the data's: it stops the run as ``RunStopped``."""
  try:
    yield
  except (OSError, MemoryError) as e:
    reason = convert.environment_error(e) or f"{type(e).__name__}: {e}"
    raise RunStopped(f"stopped while {what}: {reason}") from e


def _cache_path(cache: str, key: str) -> str:
  return os.path.join(cache, f"{privacy.safe_name(key)}.rec")


def _convert_stage(stacks: Mapping[str, Any], cache: str, shape: tuple, workers: int,
                   progress: bool, file_timeout_s: float
                   ) -> tuple[int, int, dict[str, tuple[str, str]]]:
  """Converts every stack not in the cache: (jobs run, cached, {key: (stage, reason)})."""
  jobs, cached = [], 0
  for key, st in stacks.items():
    path = _cache_path(cache, key)
    if os.path.exists(path):
      cached += 1
    else:
      jobs.append(_Job(st, shape, path))
  failed: dict[str, tuple[str, str]] = {}
  bar = tqdm(total=len(jobs), desc="convert", unit="stack") if progress and jobs else None

  def on_result(res: tuple) -> None:
    if res[0] == "fatal":
      raise RunStopped(f"stopped while converting stack {res[1]}: {res[2]}")
    if res[0] == "error":
      failed[res[1]] = (res[2], res[3])
    if bar is not None:
      bar.update(1)

  try:
    _run_jobs(jobs, workers, on_result, file_timeout_s)
  finally:
    if bar is not None:
      bar.close()
  return len(jobs), cached, failed


@dataclasses.dataclass
class _Labelled:
  entries: dict[str, list[dict]]                # split -> label entries + "path"
  rows: list[dict]                              # labels.csv
  provenance: dict[str, collections.Counter]    # task -> rule -> n
  montage: report.MontageCollector


def _label_stage(stacks: Mapping[str, Any], keys: Sequence[str], cache: str,
                 taxonomy: str, priors: Any, overrides: Any, split: tuple, seed: int,
                 scrub: convert.PathScrubber, errors: list[dict]) -> _Labelled:
  """Labels + split of each cached stack (reads only record headers)."""
  out = _Labelled({s: [] for s in SPLITS}, [],
                  collections.defaultdict(collections.Counter),
                  report.MontageCollector())
  for key in keys:
    path = _cache_path(cache, key)
    try:
      meta = convert.read_header(path)
      entry = labelling.label_entry(meta["metadata"], key, taxonomy, priors, overrides,
                                  scan_record=stacks[key].record)
    except Exception as e:  # noqa: BLE001
      errors.append(_error_row(scrub, stacks[key], "label", f"{type(e).__name__}: {e}"))
      continue
    md, texts, provs = entry["md"], entry["labels"], entry["provenance"]
    sp = convert.split_of(convert.patient_key(md, key), split, seed)
    for t in tx.TASKS:
      out.provenance[t][report.provenance_rule(provs[t])] += 1
    out.entries[sp].append({**entry, "path": path})
    out.rows.append({"stack": key, "series_hash": md.get("SeriesHash", ""), "split": sp,
                     "modality": meta.get("modality", ""), **texts,
                     **{f"{t}_provenance": provs[t] for t in tx.TASKS}})
    montage = out.montage
    if any(len(montage.slices[t][c]) < montage.per_class
           for t, c in ((t, v) for t in texts if t != "spacing"
                        for v in texts[t].split("|"))):
      montage.add(convert.read_record(path)["volume"], texts, key)
  return out


def _write_shards_stage(out_dir: str, entries: Mapping[str, list[dict]],
                        records_per_shard: int, taxonomy: str, progress: bool
                        ) -> dict[str, list[dict]]:
  """Writes the shards (sorted stack order, one record in memory); removes
  shards of an earlier, larger run. Returns {split: [{"file", "records"}]}."""
  shards: dict[str, list[dict]] = {s: [] for s in SPLITS}
  written = set()
  total = sum(len(v) for v in entries.values())
  bar = tqdm(total=total, desc="write shards", unit="record") if progress and total \
      else None
  for sp in SPLITS:
    items = entries[sp]
    n_shards = math.ceil(len(items) / records_per_shard)
    for i in range(n_shards):
      chunk = items[i * records_per_shard:(i + 1) * records_per_shard]
      name = convert.shard_name(sp, i, n_shards)
      tmp = os.path.join(out_dir, name + ".tmp")
      writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
      try:
        for e in chunk:
          cached_rec = convert.read_record(e["path"])
          writer.write(records.encode(convert.shard_record(cached_rec, e, sp, taxonomy)))
          if bar is not None:
            bar.update(1)
      finally:
        writer.close()
      os.replace(tmp, os.path.join(out_dir, name))
      shards[sp].append({"file": name, "records": len(chunk)})
      written.add(name)
  if bar is not None:
    bar.close()
  for name in os.listdir(out_dir):
    if (convert.SHARD_RE.match(name) and name not in written) or name.endswith(
        ".array_record.tmp"):
      os.remove(os.path.join(out_dir, name))
  return shards


def _manifest(shape: tuple, taxonomy: str, split: tuple, seed: int,
              records_per_shard: int, overrides: str | None, priors: Any,
              priors_obj: Any, hash_paths: bool, entries: Mapping[str, list[dict]],
              shards: Mapping[str, list[dict]], num_errors: int) -> dict:
  tax = tx.Taxonomy(taxonomy)
  return {
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
      "num_records": {s: len(entries[s]) for s in SPLITS},
      "num_errors": num_errors,
      "shards": dict(shards),
      "counts": {s: convert.counts(entries[s], tax) for s in SPLITS},
      "config": {"shape": list(shape), "taxonomy": taxonomy,
                 "split": list(split), "seed": seed,
                 "records_per_shard": records_per_shard,
                 "writer_options": WRITER_OPTIONS,
                 "overrides_sha256": convert.file_digest(overrides),
                 "priors": labelling.priors_id(priors, priors_obj),
                 "hash_paths": hash_paths, "cache_version": CACHE_VERSION},
  }


def _report_stage(out_dir: str, manifest: dict, errors: list[dict],
                  labelled: _Labelled, taxonomy: str) -> None:
  """errors.csv, labels.csv, montages, report.md, then manifest.json (last:
  its presence marks a finished run)."""
  tax = tx.Taxonomy(taxonomy)
  report.write_errors_csv(os.path.join(out_dir, "errors.csv"), errors)
  report.write_labels_csv(os.path.join(out_dir, "labels.csv"),
                          sorted(labelled.rows, key=lambda r: r["stack"]))
  montages = labelled.montage.write(out_dir, {t: tax.classes(t) for t in
                                              ("sequence", "plane", "contrast",
                                               "coverage")})
  reasons = collections.Counter(f"{e['stage']}: {e['reason'][:80]}" for e in errors)
  report.write_report_md(os.path.join(out_dir, "report.md"), manifest,
                         {t: dict(c) for t, c in labelled.provenance.items()}, reasons,
                         montages)
  convert.atomic_write(os.path.join(out_dir, MANIFEST),
                       json.dumps(manifest, indent=1, sort_keys=True).encode())


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


# ----------------------------------------------------------------------------
# The conversion
# ----------------------------------------------------------------------------

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
                 progress: bool = True,
                 file_timeout_s: float = isolation.DEFAULT_FILE_TIMEOUT_S) -> dict:
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
    file_timeout_s: a worker reading or decoding one file for longer is
      killed and the stack logged with stage "timeout" (a hung decoder, a
      stalled network read).
  Returns:
    a summary dict: stack counts (found, converted, cached, failed),
    skipped_by_scan, num_records and num_shards per split, seconds.
  Raises:
    RunStopped: an environment error (full or read-only disk, no permission
      on the output, out of memory); rerun once fixed to resume.
    FileNotFoundError, ValueError: bad arguments.
  """
  t0 = time.perf_counter()
  shape, split, workers = _check_args(shape, taxonomy, split, records_per_shard,
                                      input_dir, workers)
  with _stop_on_os_error(f"creating the output folder {out_dir}"):
    os.makedirs(out_dir, exist_ok=True)
    salt = privacy.load_or_create_salt(out_dir, salt)
  scrub = convert.PathScrubber(input_dir, salt, hash_paths)
  override_table = labelling.load_overrides(overrides, taxonomy)
  priors_obj = labelling.load_priors(priors)
  errors: list[dict] = []

  # --- scan -------------------------------------------------------------------
  stacks = _scan_stage(input_dir, salt, workers, progress, scrub, errors)

  # --- convert (parallel, resumable) ------------------------------------------
  with _stop_on_os_error("preparing the work cache"):
    cache = _cache_dir(out_dir, shape, salt)
  n_jobs, cached, failed = _convert_stage(stacks, cache, shape, workers, progress,
                                          file_timeout_s)
  for key, (stage, reason) in sorted(failed.items()):
    errors.append(_error_row(scrub, stacks[key], stage, reason))

  # --- label + split ----------------------------------------------------------
  labelled = _label_stage(stacks, [k for k in stacks if k not in failed], cache,
                          taxonomy, priors_obj, override_table, split, seed, scrub,
                          errors)

  # --- write shards -----------------------------------------------------------
  with _stop_on_os_error("writing the shards"):
    shards = _write_shards_stage(out_dir, labelled.entries, records_per_shard, taxonomy,
                                 progress)

  # --- manifest, CSVs, report -------------------------------------------------
  errors.sort(key=lambda r: (r["stage"] != "scan", r["path"], r["stack"], r["reason"]))
  manifest = _manifest(shape, taxonomy, split, seed, records_per_shard, overrides,
                       priors, priors_obj, hash_paths, labelled.entries, shards,
                       len(errors))
  with _stop_on_os_error("writing the reports"):
    _report_stage(out_dir, manifest, errors, labelled, taxonomy)
  if not keep_work:
    shutil.rmtree(os.path.join(out_dir, WORK_DIR), ignore_errors=True)

  summary = {"stacks": len(stacks), "converted": n_jobs - len(failed),
             "cached": cached, "failed": len(failed) + sum(
                 e["stage"] == "label" for e in errors),
             "skipped_by_scan": sum(e["stage"] == "scan" for e in errors),
             "num_records": manifest["num_records"],
             "num_shards": {s: len(shards[s]) for s in SPLITS},
             "seconds": time.perf_counter() - t0}
  if progress:
    _print_summary(summary)
  return summary
