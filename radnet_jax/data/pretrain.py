"""grain input pipeline: ArrayRecord shards -> augmented, batched examples.

An *example* (one volume) and a *batch* are flat dicts of numpy arrays::

  volume         float32 (D, H, W, 1)   normalised intensities, channel last
  sequence       int32   ()             class index, -1 = unknown
  plane          int32   ()             class index, -1 = unknown
  contrast       int32   ()             class index, -1 = unknown
  coverage       float32 (9,)           multi-hot over COVERAGE_BANDS
  coverage_mask  float32 ()             1 = coverage known
  spacing        float32 ()             slice spacing in mm, NaN = unknown
  mask           float32 ()             1 = real example, 0 = padding (eval)

With ``augment.on_device`` training examples also carry ``rotate_degrees``
and ``noise_std`` (float32 ``()``): the rotation and noise drawn here but
applied inside the train step (``radnet_jax.data.device_augment``).

Batches add a leading ``B`` axis. Training (``train_dataset``) reads this
process's slice of the records (``jax.process_index()`` of
``jax.process_count()``), shuffles by seed with a fresh order each epoch
(or samples class-balanced), augments with label-safe transforms
(``radnet_jax.data.augment``), and batches with ``drop_remainder``. The returned
grain ``IterDataset``'s iterator has ``get_state``/``set_state``; the trainer
saves that state with every checkpoint, so a resumed run sees exactly the
batches an uninterrupted run would have seen. Evaluation
(``eval_batches``) reads every record once, centre-cropped, and pads the last
batch with ``mask == 0`` examples so metrics can be exact.
"""
from __future__ import annotations

import collections
import math
from typing import Iterator, Mapping, Sequence

import grain
import numpy as np

from radnet_jax.data import augment as augment_lib
from radnet_jax.shards import records
from radnet_jax.labels import taxonomy as tax

CLASS_TASKS = tax.CLASSIFICATION_TASKS
NUM_BANDS = len(tax.COVERAGE_BANDS)


def source(paths: Sequence[str]) -> grain.sources.ArrayRecordDataSource:
  """Random-access source over ArrayRecord shard files (raises if none)."""
  paths = [str(p) for p in paths]
  if not paths:
    raise ValueError("no shard files given (is config.data.shards_dir right, "
                     "and does it hold shards for this split?)")
  return grain.sources.ArrayRecordDataSource(paths)


def to_example(rec: Mapping, shape: Sequence[int],
               rng: np.random.Generator | None = None,
               augment_cfg: Mapping | None = None) -> dict:
  """A decoded shard record -> one example dict (see module docstring).

  With ``rng`` and ``augment_cfg`` the volume is augmented (training);
  otherwise it is centre-cropped/padded to ``shape`` (evaluation).
  """
  vol = rec["volume"]
  deferred = None
  if rng is not None and augment_cfg is not None:
    if augment_cfg.get("on_device"):
      deferred = {}
    vol = augment_lib.augment(vol, shape, rng, augment_cfg, deferred)
  else:
    vol = augment_lib.crop_or_pad(np.asarray(vol, np.float32), shape)
  t = rec.get("targets", {})
  ex = {"volume": np.asarray(vol, np.float32)[..., None]}
  if deferred is not None:
    ex.update(deferred)   # applied in the train step (device_augment)
  for task in CLASS_TASKS:
    v = t.get(task, -1)
    ex[task] = np.int32(-1 if v is None else v)
  cov = rec.get("coverage")
  ex["coverage"] = (np.zeros(NUM_BANDS, np.float32) if cov is None
                    else np.asarray(cov, np.float32).reshape(NUM_BANDS))
  ex["coverage_mask"] = np.float32(t.get("coverage_mask", 0) or 0)
  ex["spacing"] = np.float32(records.spacing_target(t.get("spacing")))
  ex["mask"] = np.float32(1.0)
  return ex


def _decode(data: bytes, what: str) -> dict:
  try:
    return records.decode(data)
  except ValueError as e:
    raise ValueError(f"{what}: {e}") from e


def record_targets(paths: Sequence[str]) -> list[dict]:
  """Reads every record's ``targets`` (one pass; used for balance weights)."""
  src = source(paths)
  out = []
  for i in range(len(src)):
    rec = _decode(src[i], f"record {i} of {list(paths)[:1]}...")
    out.append(dict(rec.get("targets", {})))
  return out


def label_counts(targets: Sequence[Mapping], taxonomy: tax.Taxonomy) -> dict:
  """Per-task counts of known labels: {task: int64 (num_classes,)}.

  For ``coverage`` the counts are positives per band among known records.
  """
  counts = {t: np.zeros(taxonomy.num_classes[t], np.int64) for t in CLASS_TASKS}
  for tg in targets:
    for t in CLASS_TASKS:
      v = tg.get(t, -1)
      if v is not None and 0 <= v < len(counts[t]):
        counts[t][v] += 1
  return counts


def manifest_label_counts(shards_dir: str, split: str, taxonomy: tax.Taxonomy
                          ) -> dict | None:
  """Per-class counts of ``split`` from the converter's manifest.json, or None.

  Same format as ``label_counts`` (no pass over the records needed).
  """
  if not records.has_manifest(shards_dir):
    return None
  counts = records.read_manifest(shards_dir, "pretrain").get("counts", {}).get(split)
  if not counts:
    return None
  return {t: np.array([int(counts.get(t, {}).get(c, 0)) for c in taxonomy.classes(t)],
                      np.int64) for t in CLASS_TASKS}


def balance_weights(targets: Sequence[Mapping], keys: Sequence[str],
                    power: float = 1.0) -> np.ndarray:
  """Per-record sampling weights ~ 1 / count(group)**power, summing to 1.

  The group of a record is the tuple of its targets for ``keys`` (e.g.
  ("sequence", "plane")), so a CT-chest-dominated archive is drawn with each
  (sequence, plane) combination about equally often at ``power=1``. A
  multi-label target (``coverage``, a vector of bands) groups by its band
  set, with unknown coverage (``coverage_mask`` 0) a group of its own.
  """
  def part(tg: Mapping, k: str):
    v = tg.get(k, -1)
    if k == "coverage" and not tg.get("coverage_mask", 1):
      return "unknown"
    if isinstance(v, (np.ndarray, list, tuple)):
      return tuple(int(x > 0.5) for x in np.asarray(v, np.float64).reshape(-1))
    return v

  groups = [tuple(part(tg, k) for k in keys) for tg in targets]
  freq = collections.Counter(groups)
  w = np.array([freq[g] ** -float(power) for g in groups], np.float64)
  return w / w.sum()


def train_dataset(paths: Sequence[str], *, shape: Sequence[int], batch_size: int,
                  seed: int, augment_cfg: Mapping | None, balance_keys: Sequence[str] = (),
                  balance_power: float = 1.0, num_threads: int = 2,
                  prefetch: int = 4, workers: int = 0,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Infinite training dataset of this process's batches.

  Args:
    paths: ArrayRecord files of the train split.
    shape: (D, H, W) model input shape in voxels.
    batch_size: per-process batch size (global batch / process count).
    seed: shuffling / sampling / augmentation seed.
    augment_cfg: augmentation knobs (``radnet_jax.data.augment.augment``); None
      disables augmentation (centre crop only).
    balance_keys: targets that define sampling groups; empty = plain shuffle.
    balance_power: 1 = fully balanced groups, 0 = natural frequencies.
    num_threads, prefetch: grain ReadOptions (threads in this process).
    workers: grain worker processes (``mp_prefetch``); 0 = in-process.
    process_index, process_count: this host's slice of the records.
  Returns:
    grain ``IterDataset``; ``iter()`` gives a checkpointable iterator.
  """
  src = source(paths)
  shape = tuple(int(s) for s in shape)
  base = grain.MapDataset.source(src)[process_index::process_count]
  n = len(base)
  if n == 0:
    raise ValueError(f"process {process_index}/{process_count} has no training "
                     f"records in {list(paths)}")
  if n < batch_size:
    raise ValueError(f"{n} training records on this process but batch_size is "
                     f"{batch_size}: lower config.batch_size or add data")

  def load(data: bytes, rng: np.random.Generator) -> dict:
    return to_example(_decode(data, "train record"), shape, rng, augment_cfg)

  if balance_keys:
    recs = [_decode(base[i], f"train record {i}").get("targets", {}) for i in range(n)]
    cdf = np.cumsum(balance_weights(recs, balance_keys, balance_power))

    def draw(_, rng: np.random.Generator) -> dict:
      i = min(int(np.searchsorted(cdf, rng.uniform() * cdf[-1], side="right")), n - 1)
      return load(base[i], rng)

    ds = grain.MapDataset.range(n).repeat().random_map(draw, seed=seed)
  else:
    ds = base.shuffle(seed=seed).repeat().random_map(load, seed=seed + 1)
  ds = ds.batch(batch_size, drop_remainder=True)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(num_threads, 1),
                                            prefetch_buffer_size=max(prefetch, 1)))
  if workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=max(prefetch // workers, 1)))
  return it


def pad_batch(batch: Mapping[str, np.ndarray], batch_size: int) -> dict:
  """Pads a partial batch to ``batch_size`` with masked, unknown-label rows."""
  n = len(batch["mask"])
  if n == batch_size:
    return dict(batch)
  fill = {t: -1 for t in CLASS_TASKS}
  fill.update(spacing=np.nan, mask=0.0, coverage_mask=0.0)
  out = {}
  for k, v in batch.items():
    pad = np.full((batch_size - n,) + v.shape[1:], fill.get(k, 0), v.dtype)
    out[k] = np.concatenate([v, pad], axis=0)
  return out


def num_eval_batches(num_records: int, batch_size: int, process_count: int = 1) -> int:
  """Batches per process so that every process runs the same number."""
  return max(1, math.ceil(math.ceil(num_records / process_count) / batch_size))


def eval_batches(paths: Sequence[str], *, shape: Sequence[int], batch_size: int,
                 num_threads: int = 2, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """Every record of ``paths`` once, in order, in padded batches with ``mask``.

  Each process reads a disjoint slice and yields the same number of batches
  (fully padded ones where its slice is shorter), so a jit eval step over a
  multi-host mesh stays in lockstep. Padded rows have ``mask == 0`` and
  unknown labels, so accumulating with the mask is exact.
  """
  src = source(paths)
  shape = tuple(int(s) for s in shape)
  total = num_eval_batches(len(src), batch_size, process_count)
  ds = grain.MapDataset.source(src)[process_index::process_count]
  ds = ds.map(lambda d: to_example(_decode(d, "eval record"), shape))
  ds = ds.batch(batch_size, drop_remainder=False)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(num_threads, 1),
                                            prefetch_buffer_size=2))
  count = 0
  for batch in it:
    yield pad_batch(batch, batch_size)
    count += 1
  template = None
  while count < total:
    if template is None:
      ex = to_example({"volume": np.zeros(shape, np.float32), "targets": {}}, shape)
      template = {k: np.asarray(v)[None] for k, v in ex.items()}
      template["mask"] = np.zeros(1, np.float32)
    yield pad_batch({k: v[:0] for k, v in template.items()}, batch_size)
    count += 1


def split_paths(shards_dir: str, split: str) -> list[str]:
  """Shard files of ``split`` ("train" | "val" | "test") in ``shards_dir``.

  Uses the converter's manifest (``radnet_jax.shards.convert.shard_paths``) when
  available, else files named ``<split>*.array_record*``. Empty list if none.
  """
  try:
    from radnet_jax.shards import convert  # pylint: disable=g-import-not-at-top
    return [str(p) for p in convert.shard_paths(shards_dir, split)]
  except (ImportError, AttributeError, FileNotFoundError, KeyError):
    import glob  # pylint: disable=g-import-not-at-top
    import os  # pylint: disable=g-import-not-at-top
    return sorted(glob.glob(os.path.join(shards_dir, f"{split}*.array_record*")))


def count_records(paths: Sequence[str]) -> int:
  """Number of records in ``paths`` (0 for none)."""
  return len(source(paths)) if paths else 0
