"""``embed``: per-series embeddings (and per-stage feature maps) of a pretraining network."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from radnet_jax.dicom.types import Volume
from radnet_jax.inference import apply
from radnet_jax.inference import inputs as inputs_lib
from radnet_jax.inference import load as load_lib


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


def _as_loaded(model_or_loaded: Any, variables: Any
               ) -> tuple[Any, Any, load_lib.Loaded | None]:
  if isinstance(model_or_loaded, (str, os.PathLike)):
    model_or_loaded = load_lib.load(str(model_or_loaded))
  if isinstance(model_or_loaded, load_lib.Loaded):
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
  model, variables, loaded = _as_loaded(model_or_loaded, variables)
  src = volumes_or_path
  needs_shapes = isinstance(src, (str, os.PathLike, Volume)) or (
      isinstance(src, (list, tuple)) and src and isinstance(src[0], Volume))
  if needs_shapes:
    if loaded is None and (shard_shape is None or input_shape is None):
      raise ValueError("embed of a path or Volume with a bare module needs shard_shape= "
                       "and input_shape= (or pass a Loaded from radnet_jax.load)")
    if loaded is not None:
      inputs_lib.check_contract(loaded.contract, loaded.path)
    shard_shape = tuple(shard_shape or loaded.shard_shape)
    input_shape = tuple(input_shape or loaded.input_shape)
  keys, xs, info, labels, skipped = [], [], [], [], []
  if isinstance(src, (str, os.PathLike)):
    it, skipped = inputs_lib.prepare_inputs(str(src), shard_shape=shard_shape, input_shape=input_shape,
                                 salt=salt, taxonomy=loaded.taxonomy if loaded else "paper",
                                 workers=workers, progress=progress)
    skipped = list(skipped)
    for item in it:
      if isinstance(item, inputs_lib.SkippedInput):
        skipped.append(item)
      else:
        keys.append(item.key)
        xs.append(item.x)
        info.append(item.info)
        labels.append(item.labels)
  elif needs_shapes:
    vols = [src] if isinstance(src, Volume) else list(src)
    for i, v in enumerate(vols):
      x, _ = inputs_lib.preprocess(v, shard_shape, input_shape, str(i))
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
  outs, feats = apply.run_batches(model, variables, xs, batch_size, features)
  if "embedding" not in outs:
    raise ValueError(f"{type(model).__name__} returns no 'embedding' output (outputs: "
                     f"{sorted(outs)}); embed needs a ResNet3D-style classifier")
  return Embeddings(keys, outs["embedding"], feats, info, labels, skipped)
