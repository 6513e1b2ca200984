"""Use a trained network: ``load`` a checkpoint anywhere, ``predict`` a folder, ``embed``.

These are re-exported as ``radnet_jax.load``, ``radnet_jax.predict`` and
``radnet_jax.embed``::

  import radnet_jax
  model, variables, config = radnet_jax.load("workdirs/pretrain")
  report = radnet_jax.predict("workdirs/pretrain", "/data/dicom")
  report.write_csv("predictions.csv")           # + predictions_skipped.csv
  emb = radnet_jax.embed("workdirs/pretrain", "/data/dicom")
  emb.embedding                                 # (N, F) float32

``load`` reads only the parameters and batch statistics of a training
checkpoint (no optimizer state, no mesh) as plain arrays on the default
device, whatever device count or host count wrote it, and rebuilds the model
from the ``config.json`` saved beside the checkpoints.

Inputs go through exactly the preprocessing of the shards the network was
trained on: ``dicom.scan`` -> ``convert.convert_stack_staged`` (the shard
converter's path: classic stacks stream onto the shard grid, others go
through ``dicom.load_volume`` + ``convert.cache_record``; resample to the
shard shape, modality-aware normalisation, float16) ->
``input_pipeline.to_example`` (centre crop to the model input shape), i.e.
what evaluation saw. NIfTI inputs take ``load_nifti`` + ``preprocess``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import sys
import types
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from radnet_jax.dicom import isolation

log = logging.getLogger("radnet_jax")

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Tasks whose confident disagreement with the header raises ``qa_flag``.
QA_TASKS = ("sequence", "plane", "contrast", "coverage")
DEFAULT_THRESHOLD = 0.9
# A predicted slice spacing this many times off the header's is "disagree".
SPACING_RATIO = 1.5


# ============================================================================
# Load
# ============================================================================

@dataclasses.dataclass(frozen=True)
class Loaded:
  """A restored network. Unpacks as ``model, variables, config = loaded``.

  model: the Flax module (``model.apply(variables, x, train=False)``).
  variables: {"params": ..., "batch_stats": ...} as jax arrays on the default
    device (batch_stats omitted when the model has none).
  config: the run's ``ml_collections.ConfigDict``.
  path: the checkpoint's ``state`` directory that was read.
  step: the training step of that checkpoint.
  """
  model: Any
  variables: dict
  config: Any
  path: str
  step: int

  def __iter__(self) -> Iterator[Any]:
    return iter((self.model, self.variables, self.config))

  @property
  def taxonomy(self) -> str:
    """Label taxonomy name the heads were trained on ("paper" | "extended")."""
    return str(self.config.get("taxonomy", "paper"))

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """``(D, H, W)`` voxels the network was trained on."""
    shape = self.config.get("input_shape") or self.config.get("patch_shape")
    if not shape:
      raise ValueError(f"{self.path}: config has neither input_shape nor patch_shape")
    return tuple(int(s) for s in shape)

  @property
  def shard_shape(self) -> tuple[int, int, int]:
    """``(D, H, W)`` voxels of the shards (volumes are resampled to this first).

    From the training shards' manifest when ``config.data.shards_dir`` is
    readable here, else ``config.data.shard_shape`` (the demo corpus), else
    the input shape.
    """
    data = self.config.get("data") or {}
    shards_dir = data.get("shards_dir") if hasattr(data, "get") else None
    if shards_dir:
      try:
        from etils import epath  # pylint: disable=g-import-not-at-top
        manifest = epath.Path(shards_dir) / "manifest.json"
        if manifest.exists():
          shape = json.loads(manifest.read_text()).get("shape")
          if shape:
            return tuple(int(s) for s in shape)
      except Exception:  # noqa: BLE001 - unreachable storage: use the config
        pass
    shape = data.get("shard_shape") if hasattr(data, "get") else None
    return tuple(int(s) for s in shape) if shape else self.input_shape

  @property
  def heads(self) -> dict[str, int]:
    """Task -> output size of the model's heads ({} for segmentation nets)."""
    return {str(k): int(v) for k, v in dict(getattr(self.model, "heads", {}) or {}).items()}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}/{k}" if prefix else str(k)))
  else:
    out[prefix] = tree
  return out


def _compare(path: str, what: str, expected: Mapping[str, Any], found: Mapping[str, Any]
             ) -> list[str]:
  """Human-readable differences between model (expected) and checkpoint names/shapes."""
  problems = []
  missing = sorted(set(expected) - set(found))
  extra = sorted(set(found) - set(expected))
  shapes = [f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in sorted(set(expected) & set(found))
            if tuple(found[k].shape) != tuple(expected[k].shape)]
  for title, items in (("missing from the checkpoint", missing),
                       ("in the checkpoint but not in the model", extra),
                       ("shape mismatches", shapes)):
    if items:
      more = f" (+{len(items) - 6} more)" if len(items) > 6 else ""
      problems.append(f"{len(items)} {what} {title}: {', '.join(items[:6])}{more}")
  return problems


def _config_of(restored: Any, config: Any) -> Any:
  """The run's config: ``config`` if given, else the ``config.json`` beside
  the checkpoint (an unlocked private ConfigDict either way)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from radnet_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  if config is None:
    if restored.config is None:
      raise FileNotFoundError(
          f"{restored.path}: no {checkpoints.CONFIG_FILE} found beside this checkpoint "
          f"(expected in the run workdir two levels above the step folder); pass config= "
          f"(the run's ConfigDict or a dict) to load it")
    return ml_collections.ConfigDict(restored.config)
  if isinstance(config, ml_collections.ConfigDict):
    return ml_collections.ConfigDict(config.to_dict())
  return ml_collections.ConfigDict(dict(config))


def load(path: str, *, prefer: str = "best", config: Any = None,
         dtype: str | None = None) -> Loaded:
  """Restores a trained network for inference on this machine.

  Args:
    path: a run workdir (its best checkpoint if ``prefer == "best"`` and one
      exists, else the latest), its ``checkpoints/`` or ``best/`` folder, a
      step folder (``.../checkpoints/600``) or its ``state`` folder. Local or
      any ``etils.epath`` location (``gs://bucket/run``).
    prefer: "best" or "latest" when ``path`` is a workdir.
    config: the run's config (ConfigDict or dict) when no ``config.json`` sits
      beside the checkpoint; overrides it otherwise.
    dtype: compute dtype override (e.g. "float32" to run a bfloat16-trained
      model on a CPU); parameters keep their stored dtype.
  Returns:
    ``Loaded`` (unpacks as ``model, variables, config``): parameters and batch
    statistics only (no optimizer state), as jax arrays on the default device,
    whatever the device count of the run that wrote them.
  Raises:
    FileNotFoundError: ``path`` holds no checkpoint (or no config, see above).
    ValueError: the checkpoint's parameters do not match the model its config
      builds (each missing / unexpected / mis-shaped name is listed).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from radnet_jax.models import factory  # pylint: disable=g-import-not-at-top
  from radnet_jax.training import checkpoints  # pylint: disable=g-import-not-at-top

  if prefer not in ("best", "latest"):
    raise ValueError(f"prefer must be 'best' or 'latest', got {prefer!r}")
  # The one restore path: newest readable best/latest step, params and
  # batch_stats only (no optimizer state), numpy on any device count.
  restored = checkpoints.restore(str(path), prefer)
  state_dir, step = restored.path, restored.step
  config = _config_of(restored, config)
  if dtype is not None:
    config.model.dtype = str(dtype)

  # The model its config builds, and its variable shapes (no allocation).
  try:
    model = factory.from_config(config)
  except Exception as e:
    raise ValueError(f"{state_dir}: cannot build the model from its config "
                     f"(model={config.get('model')}): {type(e).__name__}: {e}") from e
  shape = tuple(int(s) for s in (config.get("input_shape") or config.get("patch_shape")
                                 or (16, 32, 32)))
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape, 1)), train=False))
  found = {"params": restored.params, "batch_stats": restored.batch_stats}
  problems = []
  for c in ("params", "batch_stats"):
    problems += _compare(state_dir, c, _flat(abstract.get(c, {})), _flat(found[c]))
  if problems:
    raise ValueError(
        f"{state_dir}: checkpoint does not match the model its config builds "
        f"(model.name={config.model.get('name')!r}, taxonomy="
        f"{config.get('taxonomy', '-')!r}, heads {dict(getattr(model, 'heads', {}))}):\n  "
        + "\n  ".join(problems))
  variables = jax.device_put({c: v for c, v in found.items() if v})
  log.info("loaded %s (step %d): %s, %d parameters", state_dir, step,
           config.model.get("name"), sum(int(np.prod(x.shape))
                                          for x in jax.tree.leaves(variables["params"])))
  return Loaded(model=model, variables=variables, config=config, path=state_dir,
                step=int(step))


# ============================================================================
# Inputs: DICOM stacks and NIfTI files -> model inputs
# ============================================================================

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


def is_nifti(path: str) -> bool:
  return str(path).lower().endswith(NIFTI_SUFFIXES)


def load_nifti(path: str, modality: str | None = None) -> Any:
  """A NIfTI file -> ``dicom.Volume`` in the canonical orientation.

  The last array axis of a NIfTI (``k``, the slice axis as written by
  dcm2niix and most converters) becomes D; the acquisition plane is the one
  the slice normal points along, and the volume is flipped/transposed to that
  plane's canonical orientation (``dicom.geometry.reorient``), as DICOM
  series are. RAS world coordinates are converted to LPS.

  Args:
    path: ``.nii`` or ``.nii.gz`` with a 3D volume (or 4D with one frame).
    modality: "CT" (values are HU) or "MR"/"PT"/...; None guesses CT when the
      1st percentile is below -500 (air in HU), else MR. It selects the
      intensity normalisation, so pass it when known.
  Returns:
    Volume: voxels float32 ``(D, H, W)``, affine ``(4, 4)`` LPS, spacing
    ``(3,)`` mm, record {"Modality", "ModalitySource"}.
  """
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  from radnet_jax.dicom import geometry  # pylint: disable=g-import-not-at-top
  from radnet_jax.dicom.types import Volume  # pylint: disable=g-import-not-at-top
  try:
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
  except Exception as e:  # noqa: BLE001 - nibabel raises many types
    raise ValueError(f"{path}: cannot read NIfTI ({type(e).__name__}: {e})") from e
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim != 3 or min(data.shape) < 1:
    raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
  aff = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(img.affine, np.float64)  # RAS->LPS
  if not np.isfinite(aff).all() or abs(np.linalg.det(aff[:3, :3])) < 1e-9:
    raise ValueError(f"{path}: degenerate or non-finite affine")
  vox = np.transpose(data, (2, 1, 0))   # (i, j, k) -> (k, j, i) = (D, H, W)
  aff = aff[:, [2, 1, 0, 3]]
  plane = geometry.plane_of(aff[:3, 0])
  vox, aff = geometry.reorient(vox, aff, plane)
  vox = np.ascontiguousarray(vox, np.float32)
  spacing = np.linalg.norm(aff[:3, :3], axis=0)
  source = "given"
  if modality is None:
    finite = vox[np.isfinite(vox)]
    modality = "CT" if finite.size and np.percentile(finite, 1) < -500 else "MR"
    source = "guessed from intensities"
  return Volume(vox, aff, spacing, {"Modality": str(modality).upper(),
                                    "ModalitySource": source})


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
  from radnet_jax.shards import convert  # pylint: disable=g-import-not-at-top
  stack = types.SimpleNamespace(key=key, record=dict(volume.record or {}))
  cached = convert.cache_record(stack, volume, tuple(int(s) for s in shard_shape))
  return _model_input(cached, input_shape)


def _model_input(cached: dict, input_shape: Sequence[int]) -> tuple[np.ndarray, dict]:
  """Cache record -> (centre-cropped float32 ``input_shape + (1,)``, the rest)."""
  from radnet_jax.data import pretrain as input_pipeline  # pylint: disable=g-import-not-at-top
  ex = input_pipeline.to_example({"volume": cached.pop("volume")},
                                 tuple(int(s) for s in input_shape))
  return ex["volume"], cached


def _label_record(metadata: Mapping[str, Any], key: str, taxonomy: str, priors: Any) -> dict:
  """Labels of a stack's stored metadata, as the shard converter labels them."""
  from radnet_jax import labels as lb  # pylint: disable=g-import-not-at-top
  record = dict(metadata)
  record.setdefault("StackKey", key)
  return lb.label(record, taxonomy=taxonomy, priors=priors)


def _prepare_stack(stack: Any, shard_shape: tuple, input_shape: tuple, taxonomy: str,
                   priors: Any) -> Prepared | SkippedInput:
  """Model input + labels for one DICOM stack; never raises."""
  from radnet_jax.shards import convert  # pylint: disable=g-import-not-at-top
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
    labels = _label_record(convert.labelling_record(md, stack.record), stack.key, taxonomy,
                           priors)
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
  from radnet_jax import privacy  # pylint: disable=g-import-not-at-top
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
  from radnet_jax import privacy  # pylint: disable=g-import-not-at-top
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
  from radnet_jax import privacy
  from radnet_jax.shards import demo  # pylint: disable=g-import-not-at-top
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
  from radnet_jax import dicom
  from radnet_jax.shards import convert  # pylint: disable=g-import-not-at-top
  if not os.path.exists(root):
    raise FileNotFoundError(f"{root}: input does not exist")
  salt = salt or default_salt()
  priors = convert.load_priors(priors)
  shard_shape = tuple(int(s) for s in shard_shape)
  input_shape = tuple(int(s) for s in input_shape)
  jobs: list[tuple] = []
  skipped: list[SkippedInput] = []
  if os.path.isfile(root) and is_nifti(root):
    jobs.append(("nifti", root, os.path.basename(root), salt, shard_shape, input_shape,
                 modality))
  else:
    niftis = sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                    if is_nifti(p) and os.path.isfile(p)) if os.path.isdir(root) else []
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
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm(total=len(jobs), desc="load", unit="stack")
    try:
      # Native pixel decoders run isolated (dicom.isolation): a decoder that
      # crashes or hangs costs its input only, reported with the file.
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


# ============================================================================
# Running the network
# ============================================================================

_APPLY_FNS: dict[int, tuple[Any, Any]] = {}


def _apply_fn(model: Any) -> Any:
  """Jitted ``(variables, x) -> (outputs, features)``; one per model object."""
  import jax  # pylint: disable=g-import-not-at-top
  hit = _APPLY_FNS.get(id(model))
  if hit is None or hit[0] is not model:
    def f(variables, x):
      out = model.apply(variables, x, train=False)
      return out if isinstance(out, (tuple, list)) else (out, [])
    hit = _APPLY_FNS[id(model)] = (model, jax.jit(f))
  return hit[1]


def run_batches(model: Any, variables: Any, xs: Sequence[np.ndarray], batch_size: int = 4,
                features: bool = False) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
  """The network on a list of ``(D, H, W, 1)`` inputs, in fixed-size batches.

  The last batch is padded (one compilation per input shape). Returns
  ({output name: (N, ...) float32} incl. "embedding", [per-stage feature maps
  (N, d, h, w, C)] when ``features`` else []).
  """
  import jax  # pylint: disable=g-import-not-at-top
  fn = _apply_fn(model)
  outs: dict[str, list] = {}
  feats: list[list] = []
  for i in range(0, len(xs), batch_size):
    chunk = [np.asarray(x, np.float32) for x in xs[i:i + batch_size]]
    n = len(chunk)
    chunk += [np.zeros_like(chunk[0])] * (batch_size - n)
    o, f = jax.device_get(fn(variables, np.stack(chunk)))
    o = o if isinstance(o, Mapping) else {"output": o}   # e.g. segmentation logits
    for k, v in o.items():
      outs.setdefault(k, []).append(np.asarray(v, np.float32)[:n])
    if features:
      if not feats:
        feats = [[] for _ in f]
      for lst, v in zip(feats, f):
        lst.append(np.asarray(v, np.float32)[:n])
  return ({k: np.concatenate(v) for k, v in outs.items()},
          [np.concatenate(v) for v in feats])


# ============================================================================
# Embeddings
# ============================================================================

@dataclasses.dataclass
class Embeddings:
  """Per-series features for linear probes and downstream models.

  keys: PHI-free ids (stack keys / hashed NIfTI paths, or "0", "1", ... for
    arrays), N of them.
  embedding: float32 ``(N, F)``: pooled last-stage features
    (``outputs["embedding"]``).
  features: per-stage feature maps ``[(N, d, h, w, C), ...]`` (stem, stage1..4)
    when requested, else [].
  info: per-series descriptive columns (for path inputs).
  labels: per-series {task: Label} from the metadata (for DICOM inputs).
  skipped: inputs that produced no embedding, with reasons.
  """
  keys: list
  embedding: np.ndarray
  features: list
  info: list
  labels: list
  skipped: list


def _as_loaded(model_or_loaded: Any, variables: Any) -> tuple[Any, Any, Loaded | None]:
  if isinstance(model_or_loaded, (str, os.PathLike)):
    model_or_loaded = load(str(model_or_loaded))
  if isinstance(model_or_loaded, Loaded):
    return model_or_loaded.model, model_or_loaded.variables, model_or_loaded
  if variables is None:
    raise ValueError("embed(model, ...) needs variables= (or pass a Loaded / path)")
  return model_or_loaded, variables, None


def embed(model_or_loaded: Any, volumes_or_path: Any, *, variables: Any = None,
          features: bool = False, batch_size: int = 4, salt: str | None = None,
          workers: int = 1, shard_shape: Sequence[int] | None = None,
          input_shape: Sequence[int] | None = None, progress: bool = False) -> Embeddings:
  """Per-series embeddings (and optionally per-stage feature maps).

  Args:
    model_or_loaded: a ``Loaded`` (from ``load``), a checkpoint path, or a
      bare Flax module with ``variables=``.
    volumes_or_path: a DICOM/NIfTI folder or file (ingested with the shards'
      preprocessing, one embedding per stack); a ``dicom.Volume`` or a list
      of them (preprocessed the same way); or model-ready arrays (already
      normalised): ``(D, H, W)``, ``(N, D, H, W)``, ``(N, D, H, W, C)`` or a
      list of ``(D, H, W[, C])``.
    variables: with a bare module.
    features: also return the per-stage feature maps (memory: N x maps).
    batch_size: volumes per network call.
    salt, workers, progress: as in ``prepare_inputs`` (path inputs).
    shard_shape, input_shape: preprocessing shapes for path/Volume inputs
      (default: the loaded run's).
  Returns:
    ``Embeddings`` (``embedding`` float32 ``(N, F)``).
  """
  from radnet_jax.dicom.types import Volume  # pylint: disable=g-import-not-at-top
  model, variables, loaded = _as_loaded(model_or_loaded, variables)
  src = volumes_or_path
  needs_shapes = isinstance(src, (str, os.PathLike, Volume)) or (
      isinstance(src, (list, tuple)) and src and isinstance(src[0], Volume))
  if needs_shapes:
    if loaded is None and (shard_shape is None or input_shape is None):
      raise ValueError("embed of a path or Volume with a bare module needs shard_shape= "
                       "and input_shape= (or pass a Loaded from radnet_jax.load)")
    shard_shape = tuple(shard_shape or loaded.shard_shape)
    input_shape = tuple(input_shape or loaded.input_shape)
  keys, xs, info, labels, skipped = [], [], [], [], []
  if isinstance(src, (str, os.PathLike)):
    it, skipped = prepare_inputs(str(src), shard_shape=shard_shape, input_shape=input_shape,
                                 salt=salt, taxonomy=loaded.taxonomy if loaded else "paper",
                                 workers=workers, progress=progress)
    skipped = list(skipped)
    for item in it:
      if isinstance(item, SkippedInput):
        skipped.append(item)
      else:
        keys.append(item.key)
        xs.append(item.x)
        info.append(item.info)
        labels.append(item.labels)
  elif needs_shapes:
    vols = [src] if isinstance(src, Volume) else list(src)
    for i, v in enumerate(vols):
      x, _ = preprocess(v, shard_shape, input_shape, str(i))
      keys.append(str(i))
      xs.append(x)
  else:
    if isinstance(src, (list, tuple)):
      arrs = [np.asarray(a, np.float32) for a in src]
      arrs = [a[..., None] if a.ndim == 3 else a for a in arrs]
    else:
      a = np.asarray(src, np.float32)
      if a.ndim == 3:
        a = a[None]
      if a.ndim == 4:
        a = a[..., None]
      arrs = list(a)
    for i, a in enumerate(arrs):
      if a.ndim != 4:
        raise ValueError(f"embed: volume {i} has shape {a.shape}; expected (D, H, W) or "
                         f"(D, H, W, C)")
    keys = [str(i) for i in range(len(arrs))]
    xs = arrs
  if not xs:
    return Embeddings([], np.zeros((0, 0), np.float32), [], info, labels, skipped)
  outs, feats = run_batches(model, variables, xs, batch_size, features)
  if "embedding" not in outs:
    raise ValueError(f"{type(model).__name__} returns no 'embedding' output (outputs: "
                     f"{sorted(outs)}); embed needs a ResNet3D-style classifier")
  return Embeddings(keys, outs["embedding"], feats, info, labels, skipped)


# ============================================================================
# Predict (header QA)
# ============================================================================

@dataclasses.dataclass
class Report:
  """Per-series predictions next to the metadata labels (the header-QA report).

  rows: one dict per stack (see ``predict`` for the columns).
  skipped: SkippedInput entries (files/series without a prediction).
  columns: the CSV column order.
  inputs: {stack key: float32 (D, H, W) model input} when requested.
  """
  rows: list
  skipped: list
  columns: list
  inputs: dict = dataclasses.field(default_factory=dict)

  @property
  def flagged(self) -> list:
    """Rows with ``qa_flag`` set."""
    return [r for r in self.rows if r.get("qa_flag")]

  def to_dataframe(self) -> Any:
    import pandas as pd  # pylint: disable=g-import-not-at-top
    return pd.DataFrame(self.rows, columns=self.columns)

  def write_csv(self, path: str, skipped_path: str | None = None) -> tuple[str, str]:
    """Writes the predictions CSV and the skipped-inputs CSV (default
    ``<path stem>_skipped.csv``); returns both paths."""
    import csv  # pylint: disable=g-import-not-at-top
    if skipped_path is None:
      stem = path[:-4] if path.lower().endswith(".csv") else path
      skipped_path = stem + "_skipped.csv"
    for p in (path, skipped_path):
      if os.path.dirname(p):
        os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(path, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
      w.writeheader()
      for r in self.rows:
        w.writerow({k: _csv_value(r.get(k, "")) for k in self.columns})
    with open(skipped_path, "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["path", "series_hash", "stage", "reason"])
      for s in self.skipped:
        w.writerow([s.path, s.series, s.stage, s.reason])
    return path, skipped_path


def _csv_value(v: Any) -> Any:
  if isinstance(v, bool):
    return int(v)
  if isinstance(v, float):
    return f"{v:.6g}"
  return v


def _softmax(z: np.ndarray) -> np.ndarray:
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _qa_columns(heads: Mapping[str, int], taxonomy: Any) -> list[str]:
  from radnet_jax.labels import taxonomy as tax  # pylint: disable=g-import-not-at-top
  cols = []
  for t in tax.CLASSIFICATION_TASKS:
    if t in heads:
      cols += [f"pred_{t}", f"prob_{t}", f"label_{t}", f"provenance_{t}", f"disagree_{t}"]
      cols += [f"p_{t}_{c}" for c in taxonomy.classes(t)]
  if "coverage" in heads:
    cols += ["pred_coverage", "label_coverage", "provenance_coverage", "disagree_coverage"]
    cols += [f"p_coverage_{b}" for b in tax.COVERAGE_BANDS]
  if "spacing" in heads:
    cols += ["pred_spacing_mm", "label_spacing_mm", "provenance_spacing", "disagree_spacing"]
  return cols


def qa_row(outputs: Mapping[str, np.ndarray], labels: Mapping[str, Any], taxonomy: Any,
           threshold: float = DEFAULT_THRESHOLD, qa_tasks: Sequence[str] = QA_TASKS) -> dict:
  """Prediction vs metadata columns for one series.

  Args:
    outputs: one series' head outputs {task: logits (K,)}; spacing = log mm.
    labels: {task: Label} from the metadata ({} = none).
    taxonomy: a ``labels.taxonomy.Taxonomy``.
    threshold: confidence needed to call a disagreement a QA flag.
    qa_tasks: tasks whose confident disagreement sets ``qa_flag``.
  Returns:
    {pred_<t>, prob_<t>, p_<t>_<class>, label_<t>, provenance_<t>,
    disagree_<t>, ..., qa_flag, qa_tasks, qa_confidence}. For a softmax task
    ``disagree_<t>`` = the header's label is known, in the taxonomy, and not
    the network's top class; it is *confident* when the top class has
    probability >= ``threshold``. For coverage, disagree = the predicted band
    set (p > 0.5) differs from the header's; confident when some band is
    predicted against the header with probability >= ``threshold``. Spacing
    disagrees when the prediction is more than 1.5x off (never flags: the
    header spacing is measured from slice positions).
  """
  from radnet_jax.labels import taxonomy as tax  # pylint: disable=g-import-not-at-top
  row: dict[str, Any] = {}
  flags, conf = [], 0.0
  for t in tax.CLASSIFICATION_TASKS:
    if t not in outputs:
      continue
    classes = taxonomy.classes(t)
    p = _softmax(np.asarray(outputs[t]).reshape(-1))
    k = int(np.argmax(p))
    lab = labels.get(t)
    row[f"pred_{t}"] = classes[k]
    row[f"prob_{t}"] = float(p[k])
    for c, pc in zip(classes, p):
      row[f"p_{t}_{c}"] = float(pc)
    row[f"label_{t}"] = lab.as_text() if lab is not None else tax.UNKNOWN
    row[f"provenance_{t}"] = lab.provenance if lab is not None else "unknown:no metadata"
    known = lab is not None and lab.known and lab.value in classes
    dis = bool(known and lab.value != classes[k])
    row[f"disagree_{t}"] = dis
    if dis and p[k] >= threshold and t in qa_tasks:
      flags.append(t)
      conf = max(conf, float(p[k]))
  if "coverage" in outputs:
    bands = tax.COVERAGE_BANDS
    p = 1.0 / (1.0 + np.exp(-np.asarray(outputs["coverage"], np.float64).reshape(-1)))
    pred = {b for b, pb in zip(bands, p) if pb > 0.5}
    row["pred_coverage"] = "|".join(b for b in bands if b in pred)
    for b, pb in zip(bands, p):
      row[f"p_coverage_{b}"] = float(pb)
    lab = labels.get("coverage")
    row["label_coverage"] = lab.as_text() if lab is not None else tax.UNKNOWN
    row["provenance_coverage"] = lab.provenance if lab is not None else "unknown:no metadata"
    known = lab is not None and lab.known and isinstance(lab.value, tuple)
    dis = bool(known and set(lab.value) != pred)
    row["disagree_coverage"] = dis
    if dis and "coverage" in qa_tasks:
      against = [pb if b not in lab.value else 1.0 - pb for b, pb in zip(bands, p)]
      c = max(against)
      if c >= threshold:
        flags.append("coverage")
        conf = max(conf, float(c))
  if "spacing" in outputs:
    pred_mm = float(np.exp(np.asarray(outputs["spacing"], np.float64).reshape(-1)[0]))
    row["pred_spacing_mm"] = pred_mm
    lab = labels.get("spacing")
    known = lab is not None and lab.known
    row["label_spacing_mm"] = float(lab.value) if known else float("nan")
    row["provenance_spacing"] = lab.provenance if lab is not None else "unknown:no metadata"
    row["disagree_spacing"] = bool(known and max(pred_mm / float(lab.value),
                                                 float(lab.value) / pred_mm) > SPACING_RATIO)
  row["qa_flag"] = bool(flags)
  row["qa_tasks"] = "|".join(flags)
  row["qa_confidence"] = conf if flags else float("nan")
  return row


INFO_COLUMNS = ["source", "series_hash", "stack_key", "study_hash", "patient_hash",
                "modality", "series_description", "n_files", "shape", "spacing_mm"]


def predict(checkpoint: Any, input: str, *, threshold: float = DEFAULT_THRESHOLD,  # pylint: disable=redefined-builtin
            qa_tasks: Sequence[str] = QA_TASKS, batch_size: int = 4,
            salt: str | None = None, priors: Any = None, modality: str | None = None,
            workers: int = 1, keep_inputs: bool = False, progress: bool = False,
            hash_paths: bool = True) -> Report:
  """Runs the network on every stack of a DICOM folder (or NIfTI file/folder).

  The header-QA report: per stack, the network's class and probabilities
  for each task next to the label derived from the metadata (and the rule
  that produced it), with ``disagree_<task>`` flags and an overall
  ``qa_flag`` where the pixels contradict the header with confidence.

  Args:
    checkpoint: a path as for ``load``, or a ``Loaded``.
    input: a DICOM folder tree, one DICOM file, a ``.nii[.gz]`` file, or a
      folder with NIfTI files (no metadata labels for NIfTI).
    threshold: probability of the network's top class (or of a coverage
      band against the header) needed for ``qa_flag``.
    qa_tasks: tasks that can raise ``qa_flag``.
    batch_size: volumes per network call.
    salt: identifier hashing salt (default: $RADNET_SALT or a per-user salt
      in the radnet cache); the same salt as the shards gives the same
      hashes (join with ``labels.csv`` or the phantom's ``truth.csv``).
    priors: label priors as in ``build.build_shards`` (None, "builtin", a
      file).
    modality: modality of NIfTI inputs ("CT", "MR"; None: guessed).
    workers: processes loading volumes.
    keep_inputs: keep each stack's model input in ``Report.inputs``.
    progress: tqdm progress bars.
    hash_paths: skipped files by salted hash of their relative path (default,
      as ``build_shards``: folder names may hold patient names); False: the path.
  Returns:
    ``Report``: ``rows`` with the columns ``source, series_hash, stack_key,
    study_hash, patient_hash, modality, series_description, n_files, shape,
    spacing_mm``; per softmax task ``pred_<t>, prob_<t>, label_<t>,
    provenance_<t>, disagree_<t>, p_<t>_<class>...``; ``pred_coverage,
    label_coverage, provenance_coverage, disagree_coverage,
    p_coverage_<band>...``; ``pred_spacing_mm, label_spacing_mm,
    provenance_spacing, disagree_spacing``; ``qa_flag, qa_tasks,
    qa_confidence``. ``skipped`` lists every file or stack without a
    prediction and why; nothing aborts the run.
  """
  from radnet_jax.labels import taxonomy as tax  # pylint: disable=g-import-not-at-top
  loaded = checkpoint if isinstance(checkpoint, Loaded) else load(str(checkpoint))
  heads = loaded.heads
  if not any(t in heads for t in (*tax.CLASSIFICATION_TASKS, "coverage")):
    raise ValueError(f"{loaded.path}: model {type(loaded.model).__name__} has no "
                     f"classification heads (config.entry="
                     f"{loaded.config.get('entry', 'radnet_jax.tasks.pretrain')}); predict needs a "
                     f"pretraining checkpoint (segmentation: radnet_jax.tasks.segment)")
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f"threshold must be in (0, 1], got {threshold}")
  taxonomy = tax.Taxonomy(loaded.taxonomy)
  it, skipped = prepare_inputs(str(input), shard_shape=loaded.shard_shape,
                               input_shape=loaded.input_shape, salt=salt,
                               taxonomy=loaded.taxonomy, priors=priors, modality=modality,
                               workers=workers, progress=progress, hash_paths=hash_paths)
  skipped = list(skipped)
  rows, inputs = [], {}
  pending: list[Prepared] = []

  def flush():
    if not pending:
      return
    outs, _ = run_batches(loaded.model, loaded.variables, [p.x for p in pending],
                          batch_size)
    for i, p in enumerate(pending):
      one = {k: v[i] for k, v in outs.items() if k != "embedding"}
      row = dict(p.info)
      row.update(qa_row(one, p.labels, taxonomy, threshold, qa_tasks))
      rows.append(row)
    pending.clear()

  for item in it:
    if isinstance(item, SkippedInput):
      skipped.append(item)
      continue
    if keep_inputs:
      inputs[item.key] = item.x[..., 0]
    pending.append(item)
    if len(pending) >= batch_size:
      flush()
  flush()
  extra = ["modality_source"] if any("modality_source" in r for r in rows) else []
  columns = INFO_COLUMNS + extra + _qa_columns(heads, taxonomy) + \
      ["qa_flag", "qa_tasks", "qa_confidence"]
  log.info("predict: %d stacks, %d flagged by header QA (threshold %.2f), %d skipped",
           len(rows), sum(bool(r["qa_flag"]) for r in rows), threshold, len(skipped))
  return Report(rows, skipped, columns, inputs)
