"""Model inputs from DICOM folders and NIfTI files, prepared as the training shards were.

Inputs go through exactly the preprocessing of the shards a pretraining
network was trained on (its contract, ``radnet_jax.contract``):
``dicom.scan`` -> ``convert.convert_stack_staged`` (the shard converter's
path: classic stacks stream onto the shard grid, others go through
``dicom.load_volume`` + ``convert.cache_record``; resample to the contract's
shard shape, modality-aware normalisation, float16) -> ``data.pretrain.
to_example`` (centre crop to the model input shape), i.e. what evaluation
saw. NIfTI inputs take ``dicom.nifti.load_nifti_volume`` + ``preprocess``.
Volumes load in a process pool (``workers``); one bad file or series is a
``SkippedInput`` with its reason, never an abort.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import sys
import types
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from radnet_jax import contract as contract_lib
from radnet_jax import dicom
from radnet_jax import labels as labels_lib
from radnet_jax import privacy
from radnet_jax.data import pretrain as input_pipeline
from radnet_jax.dicom import isolation
from radnet_jax.dicom import nifti
from radnet_jax.dicom.types import Volume
from radnet_jax.shards import convert
from radnet_jax.shards import labelling
from radnet_jax.shards import demo

@dataclasses.dataclass
class Prepared:
  """One series/stack ready for the network.

  key: PHI-free id of the stack (DICOM stack key, or hashed NIfTI path).
  x: float32 ``(D, H, W, 1)`` model input (shard preprocessing + centre crop).
  info: PHI-free descriptive columns (hashes, modality, geometry).
  labels: {task: Label} derived from the metadata ({} for NIfTI input).
  """
  key: str
  x: np.ndarray
  info: dict
  labels: dict


@dataclasses.dataclass(frozen=True)
class SkippedInput:
  """An input file or series that produced no prediction, and why."""
  path: str
  reason: str
  series: str = ""
  stage: str = "scan"


def load_nifti(path: str, modality: str | None = None) -> Volume:
  """A NIfTI file -> ``dicom.Volume`` in the canonical orientation
  (``radnet_jax.dicom.nifti.load_nifti_volume``, the one NIfTI reader)."""
  return nifti.load_nifti_volume(path, modality)


def check_contract(c: contract_lib.Contract, where: str = "") -> None:
  """Raises ValueError unless inputs prepared here honour the contract of a
  pretraining network: the shard converter's resampling onto
  ``c.shard_shape``, its intensity mapping and orientation."""
  if c.task != contract_lib.PRETRAIN:
    raise ValueError(f"{where}: a {c.task} network; these inputs are prepared for "
                     f"pretraining networks (segmentation: radnet_jax.inference.segment)")
  want = {k: v.spec for k, v in contract_lib.SHARD_INTENSITY.items()}
  got = {k: v.spec for k, v in c.intensity.items()}
  if got != want or c.orientation != contract_lib.ORIENT_PLANE:
    raise ValueError(f"{where}: the network was trained on inputs mapped as {got} in "
                     f"orientation {c.orientation!r}; this version prepares {want} in "
                     f"{contract_lib.ORIENT_PLANE!r}")


def preprocess(volume: Any, shard_shape: Sequence[int], input_shape: Sequence[int],
               key: str = "") -> tuple[np.ndarray, dict]:
  """A ``dicom.Volume`` -> the model input, exactly as the shards + evaluation.

  ``convert.cache_record`` (resample to ``shard_shape``, normalise by
  modality, float16) then ``input_pipeline.to_example`` (centre crop/pad to
  ``input_shape``).

  Returns:
    (x float32 ``(D, H, W, 1)`` = ``input_shape + (1,)``, cached record
    without its volume: modality, normalisation, geometry, metadata).
  """
  stack = types.SimpleNamespace(key=key, record=dict(volume.record or {}))
  cached = convert.cache_record(stack, volume, tuple(int(s) for s in shard_shape))
  return _model_input(cached, input_shape)


def _model_input(cached: dict, input_shape: Sequence[int]) -> tuple[np.ndarray, dict]:
  """Cache record -> (centre-cropped float32 ``input_shape + (1,)``, the rest)."""
  ex = input_pipeline.to_example({"volume": cached.pop("volume")},
                                 tuple(int(s) for s in input_shape))
  return ex["volume"], cached


def _label_record(metadata: Mapping[str, Any], key: str, taxonomy: str, priors: Any) -> dict:
  """Labels of a stack's stored metadata, as the shard converter labels them."""
  record = dict(metadata)
  record.setdefault("StackKey", key)
  return labels_lib.label(record, taxonomy=taxonomy, priors=priors)


def _prepare_stack(stack: Any, shard_shape: tuple, input_shape: tuple, taxonomy: str,
                   priors: Any) -> Prepared | SkippedInput:
  """Model input + labels for one DICOM stack; never raises."""
  stage = "load"
  series = str(stack.record.get("SeriesHash", ""))
  try:
    # The shard converter's own path (streaming onto the shard grid, or
    # load_volume when it declines): the same record as the training shards.
    cached = convert.convert_stack_staged(stack, shard_shape)
    stage = "preprocess"
    x, cached = _model_input(cached, input_shape)
    stage = "label"
    md = cached["metadata"]
    # The rules read the raw free text the scan kept in memory (never stored).
    labels = _label_record(labelling.labelling_record(md, stack.record), stack.key,
                           taxonomy, priors)
    geo = cached["geometry"]
    info = {"source": "dicom", "series_hash": series, "stack_key": stack.key,
            "study_hash": str(md.get("StudyHash", "")),
            "patient_hash": str(md.get("PatientHash", "")),
            "modality": cached["modality"],
            "series_description": str(md.get("SeriesDescription", "") or ""),
            "n_files": len(stack.files),
            "shape": "x".join(str(s) for s in geo["orig_shape"]),
            "spacing_mm": "x".join(f"{s:.3g}" for s in geo["orig_spacing"])}
    return Prepared(stack.key, x, info, labels)
  except Exception as e:  # noqa: BLE001 - one bad series never stops the run
    where = stack.files[0] if stack.files else ""
    if isinstance(e, convert.StageError):
      stage = "load" if e.stage == "load" else "preprocess"
      e = e.error
    return SkippedInput(where, f"{type(e).__name__}: {e}", series, stage)


def _prepare_nifti(path: str, rel: str, salt: str, shard_shape: tuple, input_shape: tuple,
                   modality: str | None) -> Prepared | SkippedInput:
  key = privacy.hash_id(rel, salt)
  stage = "load"
  try:
    vol = load_nifti(path, modality)
    stage = "preprocess"
    x, cached = preprocess(vol, shard_shape, input_shape, key)
    geo = cached["geometry"]
    info = {"source": "nifti", "series_hash": key, "stack_key": key, "study_hash": "",
            "patient_hash": "", "modality": cached["modality"],
            "modality_source": vol.record["ModalitySource"], "series_description": "",
            "n_files": 1, "shape": "x".join(str(s) for s in geo["orig_shape"]),
            "spacing_mm": "x".join(f"{s:.3g}" for s in geo["orig_spacing"])}
    return Prepared(key, x, info, {})
  except Exception as e:  # noqa: BLE001
    return SkippedInput(path, f"{type(e).__name__}: {e}", key, stage)


def _job(args: tuple) -> Prepared | SkippedInput:
  kind, payload = args[0], args[1:]
  return _prepare_stack(*payload) if kind == "dicom" else _prepare_nifti(*payload)


def _scrub(item: Any, root: str, salt: str, hash_paths: bool) -> Any:
  """A SkippedInput with its path relative to ``root`` (or hashed) and ``root``
  removed from the reason; other items unchanged."""
  if not isinstance(item, SkippedInput):
    return item
  base = os.path.abspath(root)
  base_dir = base if os.path.isdir(base) else os.path.dirname(base)
  p = os.path.abspath(item.path) if item.path else ""
  rel = os.path.relpath(p, base_dir) if p and (p == base_dir or p.startswith(base_dir + os.sep)) \
      else os.path.basename(p)
  reason = str(item.reason)
  for b in sorted({base, base_dir, os.path.realpath(base_dir), str(root).rstrip(os.sep)},
                  key=len, reverse=True):
    if b and b != os.sep:
      reason = reason.replace(b + os.sep, "").replace(b, ".")
  if hash_paths:
    if rel:
      reason = reason.replace(rel, privacy.hash_id(rel, salt))
    rel = privacy.hash_id(rel, salt)
  return dataclasses.replace(item, path=rel, reason=reason.replace("\n", " "))


def default_salt() -> str:
  """$RADNET_SALT, else a per-user salt kept in the radnet cache folder."""
  return privacy.load_or_create_salt(demo.cache_root())


def prepare_inputs(root: str, *, shard_shape: Sequence[int], input_shape: Sequence[int],
                   salt: str | None = None, taxonomy: str = "paper", priors: Any = None,
                   modality: str | None = None, workers: int = 1, progress: bool = False,
                   hash_paths: bool = False
                   ) -> tuple[Iterator[Prepared | SkippedInput], list[SkippedInput]]:
  """Finds every stack (DICOM) and volume (NIfTI) under ``root``.

  Args:
    root: a folder (searched recursively; DICOM and NIfTI may be mixed), one
      DICOM file or one ``.nii``/``.nii.gz`` file.
    shard_shape, input_shape: ``(D, H, W)`` of the training shards and of the
      network input (``Loaded.shard_shape`` / ``Loaded.input_shape``).
    salt: identifier hashing salt (default ``default_salt()``).
    taxonomy, priors: for the metadata labels (as in ``build.build_shards``).
    modality: modality of NIfTI inputs (None: guessed, see ``load_nifti``).
    workers: processes loading volumes (1 = in this process).
    progress: tqdm bars.
    hash_paths: report skipped files by salted hash of their relative path
      (folder names in archives may contain patient names).
  Returns:
    (iterator over Prepared / SkippedInput in a deterministic order, the
    files the scan skipped (non-images, localizers, unreadable files)).
    Skipped paths are relative to ``root``, and ``root`` is removed from the
    reasons, so reports never show where the archive lives.
  """
  if not os.path.exists(root):
    raise FileNotFoundError(f"{root}: input does not exist")
  salt = salt or default_salt()
  priors = labelling.load_priors(priors)
  shard_shape = tuple(int(s) for s in shard_shape)
  input_shape = tuple(int(s) for s in input_shape)
  jobs: list[tuple] = []
  skipped: list[SkippedInput] = []
  if os.path.isfile(root) and nifti.is_nifti(root):
    jobs.append(("nifti", root, os.path.basename(root), salt, shard_shape, input_shape,
                 modality))
  else:
    niftis = sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                    if nifti.is_nifti(p) and os.path.isfile(p)) if os.path.isdir(root) else []
    # dicom.scan's pool forks; forking a process that runs jax can deadlock.
    scan_workers = 1 if "jax" in sys.modules else workers
    res = dicom.scan(root, salt=salt, workers=scan_workers, progress=progress)
    nset = {os.path.abspath(p) for p in niftis}
    skipped += [SkippedInput(s.path, s.reason, s.series, "scan") for s in res.skipped
                if os.path.abspath(s.path) not in nset]
    jobs += [("dicom", s, shard_shape, input_shape, taxonomy, priors) for s in res.stacks]
    jobs += [("nifti", p, os.path.relpath(p, root), salt, shard_shape, input_shape, modality)
             for p in niftis]
  skipped = [_scrub(s, root, salt, hash_paths) for s in skipped]

  def run() -> Iterator[Prepared | SkippedInput]:
    bar = None
    if progress:
      bar = tqdm(total=len(jobs), desc="load", unit="stack")
    try:
      # Native pixel decoders run isolated (dicom.isolation): a decoder that
      # panics, crashes or hangs costs its input only, reported with the file.
      with contextlib.closing(isolation.map_isolated(_job, jobs, workers,
                                                     ordered=True)) as results:
        for index, kind, value in results:
          if kind != "ok":
            item = jobs[index][1]
            value = SkippedInput(
                item if isinstance(item, str) else (item.files[0] if item.files else ""),
                value, "" if isinstance(item, str) else
                str(item.record.get("SeriesHash", "")), "crash")
          yield _scrub(value, root, salt, hash_paths)
          if bar is not None:
            bar.update(1)
    finally:
      if bar is not None:
        bar.close()

  return run(), skipped
