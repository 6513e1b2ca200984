"""Segmentation input: few-shot case selection and foreground-biased patches.

``train_dataset`` is the grain pipeline of ``radnet_jax.tasks.segment``:
segmentation shards (``radnet_jax.shards.seg``) -> random patches, with
probability ``fg_prob`` centred on a random liver voxel, else on a random
voxel -> label-safe augmentation (intensity scale / shift, noise, flips) ->
batches. Batches: ``volume`` float32 ``(B, d, h, w, 1)``, ``label`` int32
``(B, d, h, w)`` (0 background, 1 liver[, 2 tumour] per ``num_classes``).
Infinite and checkpointable: the iterator state is saved with the model.
"""
from __future__ import annotations

import functools
from typing import Mapping, Sequence

import grain
import numpy as np

from radnet_jax.labels import lits
from radnet_jax.shards import records
from radnet_jax.shards import seg as segdata


def select_cases(train_cases: Sequence[str], n_train: int, seed: int) -> list[str]:
  """The first ``n_train`` cases of a seeded shuffle (all if n_train <= 0).

  Nested: the cases chosen for n are a subset of those for n + 1 (same seed).
  """
  cases = sorted(train_cases)
  order = np.random.default_rng(seed).permutation(len(cases))
  chosen = [cases[i] for i in order]
  return chosen if n_train <= 0 else chosen[:n_train]


def map_labels(mask: np.ndarray, num_classes: int) -> np.ndarray:
  """LiTS labels -> training classes: 2 classes = liver incl. tumour vs rest."""
  lits.label_values(num_classes)   # 2 or 3, else a clear error
  if num_classes == 2:
    return np.isin(mask, lits.CLASSES["liver"]).astype(np.int32)
  return mask.astype(np.int32)


def sample_patch(volume: np.ndarray, mask: np.ndarray, fg_index: np.ndarray,
                 patch: Sequence[int], rng: np.random.Generator, fg_prob: float,
                 pad_value: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """A ``patch``-sized crop ``(d, h, w)`` of volume and mask.

  Centred on a random foreground voxel (``fg_index``: flat indices) with
  probability ``fg_prob``, else on a uniform random voxel; axes shorter than
  the patch are padded (volume with ``pad_value``, mask with 0).
  """
  patch = tuple(int(p) for p in patch)
  shape = volume.shape
  if fg_index.size and rng.random() < fg_prob:
    centre = np.unravel_index(int(fg_index[rng.integers(fg_index.size)]), shape)
  else:
    centre = tuple(int(rng.integers(s)) for s in shape)
  sl, pads = [], []
  for c, s, p in zip(centre, shape, patch):
    if s >= p:
      start = int(np.clip(c - p // 2, 0, s - p))
      sl.append(slice(start, start + p))
      pads.append((0, 0))
    else:
      sl.append(slice(0, s))
      before = int(rng.integers(p - s + 1))
      pads.append((before, p - s - before))
  v = np.asarray(volume[tuple(sl)], np.float32)
  m = np.asarray(mask[tuple(sl)])
  if any(p != (0, 0) for p in pads):
    v = np.pad(v, pads, constant_values=pad_value)
    m = np.pad(m, pads)
  return v, m


def augment_patch(v: np.ndarray, m: np.ndarray, rng: np.random.Generator,
                  cfg: Mapping) -> tuple[np.ndarray, np.ndarray]:
  """Label-safe augmentation: intensity scale/shift, Gaussian noise, flips.

  cfg keys: scale (relative), shift (absolute, in normalised units),
  noise_std, flip_probs (per axis D, H, W).
  """
  if cfg.get("scale", 0):
    v = v * np.float32(1.0 + rng.uniform(-cfg["scale"], cfg["scale"]))
  if cfg.get("shift", 0):
    v = v + np.float32(rng.uniform(-cfg["shift"], cfg["shift"]))
  if cfg.get("noise_std", 0):
    v = v + rng.normal(0.0, cfg["noise_std"], v.shape).astype(np.float32)
  for ax, p in enumerate(cfg.get("flip_probs", (0.0, 0.0, 0.0))):
    if p and rng.random() < p:
      v, m = np.flip(v, ax), np.flip(m, ax)
  return np.ascontiguousarray(v, np.float32), np.ascontiguousarray(m)


def train_dataset(shards_dir: str, cases: Sequence[str], *, patch: Sequence[int],
                  batch_size: int, seed: int, num_classes: int, fg_prob: float,
                  augment_cfg: Mapping | None, pad_value: float = 0.0,
                  cache_size: int = 32, num_threads: int = 2, prefetch: int = 2,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Infinite, checkpointable grain dataset of patch batches (see module doc).

  Each process samples from its slice of ``cases``. Decoded volumes are kept
  in an LRU cache of ``cache_size`` cases.
  """
  path = segdata.shard_path(shards_dir, "train")
  src = grain.sources.ArrayRecordDataSource([path])
  index = [i for i in range(len(src)) if records.decode(src[i])["case"] in set(cases)]
  index = index[process_index::process_count]
  if not index:
    raise ValueError(f"{path}: none of the training cases {list(cases)[:5]} "
                     f"on process {process_index}/{process_count}")

  @functools.lru_cache(maxsize=cache_size)
  def load(i: int):
    rec = records.decode(src[i])
    return rec["volume"], rec["mask"], np.flatnonzero(rec["mask"] > 0)

  def draw(k: int, rng: np.random.Generator) -> dict:
    vol, mask, fg = load(index[k % len(index)])
    v, m = sample_patch(vol, mask, fg, patch, rng, fg_prob, pad_value)
    if augment_cfg is not None:
      v, m = augment_patch(v, m, rng, augment_cfg)
    return {"volume": v[..., None], "label": map_labels(m, num_classes)}

  ds = (grain.MapDataset.range(len(index)).shuffle(seed=seed).repeat()
        .random_map(draw, seed=seed + 1).batch(batch_size, drop_remainder=True))
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=max(num_threads, 1),
                                              prefetch_buffer_size=max(prefetch, 1)))
