"""Input-pipeline throughput vs what the train step consumes.

    python bench/input_pipeline.py                   # the demo config
    python bench/input_pipeline.py --variant paper   # paper shapes (no CPU step)
    python bench/input_pipeline.py --variant paper --on-device
        # rotation + noise left to the jitted step (augment.on_device)

Builds (or reuses, in --cache) a small phantom shard set with the config's
shard shape, then measures on this machine:

1. per core: one thread decoding ArrayRecord records and applying the
   config's label-safe augmentation (crop, rotation, flip, intensity), the
   work of `input_pipeline.to_example`; volumes/s and CPU-s per volume;
2. the grain pipeline exactly as training builds it
   (`input_pipeline.train_dataset`: shuffle, decode + augment, batch, the
   config's threads / prefetch), in-process and with worker processes;
3. the train step of the config's model at its batch size (jitted, Adam,
   float32 on CPU), volumes/s and CPU-s per volume (demo variant only: the
   paper model is sized for an accelerator).

With --on-device the host rows draw but do not apply the rotation and
noise (`config.augment.on_device`), and one more row times
`radnet_jax.data.device_augment.augment` jitted on this machine's JAX backend
(on CPU a stand-in: on a GPU those gathers are a small part of a step).

The last lines give pipeline volumes/s over train-step volumes/s (>= 1: the
pipeline keeps up) and the share of CPU time the pipeline takes when both
run on the same cores. For the paper variant they give the cores needed to
feed an accelerator step rate (--feed-vol-s, default 250 vol/s: ResNet-50 at
48x192x192, batch 32, bf16, on one H200 in bench/RESULTS.md).
"""
from __future__ import annotations

import gc
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import pretrain  # noqa: E402
from radnet_jax.shards import demo
from radnet_jax.data import pretrain as input_pipeline
from radnet_jax.shards import records  # noqa: E402
from radnet_jax.models.layers import usable_cores  # noqa: E402
from radnet_jax.cli import flags


def per_core(paths, shape, augment_cfg, n: int, seed: int = 0):
  """One thread: decode + augment n records; (vol/s, CPU-s per volume)."""
  src = input_pipeline.source(paths)
  rng = np.random.default_rng(seed)
  recs = [src[i % len(src)] for i in range(min(n, len(src)))]
  t, c = time.perf_counter(), time.process_time()
  for i in range(n):
    rec = records.decode(recs[i % len(recs)])
    ex = input_pipeline.to_example(rec, shape, rng, augment_cfg)
  wall, cpu = time.perf_counter() - t, time.process_time() - c
  assert ex["volume"].shape[:3] == tuple(shape), ex["volume"].shape
  return n / wall, cpu / n


def pipeline(paths, shape, batch, augment_cfg, data_cfg, workers: int,
             n_batches: int):
  """The training grain pipeline; (vol/s, CPU-s per volume in this process)."""
  ds = input_pipeline.train_dataset(
      paths, shape=shape, batch_size=batch, seed=0, augment_cfg=augment_cfg,
      balance_keys=tuple(data_cfg.balance_keys),
      balance_power=data_cfg.balance_power, num_threads=data_cfg.threads,
      prefetch=data_cfg.prefetch, workers=workers)
  it = iter(ds)
  # Drain what start-up buffered (the prefetch buffer and, with workers,
  # each worker's buffer) so that only steady-state production is timed.
  prefetch = max(int(data_cfg.prefetch), 1)
  warm = 1 + prefetch + (workers * max(prefetch // workers, 1) if workers else 0)
  for _ in range(warm):
    b = next(it)
  assert b["volume"].shape[:4] == (batch, *shape), b["volume"].shape
  t, c = time.perf_counter(), time.process_time()
  for _ in range(n_batches):
    next(it)
  wall, cpu = time.perf_counter() - t, time.process_time() - c
  if hasattr(it, "close"):          # stops worker processes (as train.py does)
    it.close()
  del it, ds
  gc.collect()                      # frees buffers
  return n_batches * batch / wall, cpu / (n_batches * batch)


def jax_backend() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.default_backend()


def device_side(paths, shape, augment_cfg, batch: int, steps: int):
  """`device_augment.augment` jitted on one batch; (vol/s, CPU-s per vol)."""
  import jax  # pylint: disable=g-import-not-at-top
  from radnet_jax.data import device_augment  # pylint: disable=g-import-not-at-top
  ds = input_pipeline.train_dataset(paths, shape=shape, batch_size=batch,
                                    seed=0, augment_cfg=augment_cfg)
  b = jax.device_put({k: v for k, v in next(iter(ds)).items()
                      if k in ("volume",) + device_augment.FIELDS})
  f = jax.jit(device_augment.augment)
  jax.block_until_ready(f(b, jax.random.key(0)))
  times, cpu = [], []
  for i in range(steps):
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(f(b, jax.random.key(i)))
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return batch / statistics.median(times), statistics.median(cpu) / batch


def train_step(config, batch: int, steps: int):
  """The config's model train step on CPU; (vol/s, CPU-s per volume)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from radnet_jax.models import resnet3d  # pylint: disable=g-import-not-at-top
  shape = tuple(config.input_shape)
  model = resnet3d.get_model(config.model.name, heads={"sequence": 5},
                             **config.model.kwargs.to_dict())
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, *shape, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 5, batch))
  v = jax.jit(lambda r: model.init(r, x, False))(jax.random.key(0, impl="unsafe_rbg"))
  tx = optax.adamw(1e-3)

  def step(state, x, y):
    p, s, o = state

    def loss(p):
      out, new = model.apply({"params": p, "batch_stats": s}, x, True,
                             mutable=["batch_stats"])
      ce = optax.softmax_cross_entropy_with_integer_labels(out[0]["sequence"], y)
      return ce.mean(), new["batch_stats"]
    (l, s), g = jax.value_and_grad(loss, has_aux=True)(p)
    u, o = tx.update(g, o, p)
    return (optax.apply_updates(p, u), s, o), l

  state = (v["params"], v["batch_stats"], tx.init(v["params"]))
  f = jax.jit(step, donate_argnums=0)
  state, l = f(state, x, y)
  l.block_until_ready()
  times, cpu = [], []
  for _ in range(steps):
    t, c = time.perf_counter(), time.process_time()
    state, l = f(state, x, y)
    l.block_until_ready()
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return batch / statistics.median(times), statistics.median(cpu) / batch


def main(argv=None) -> None:
  p = flags.Parser(description=__doc__.split("\n")[0])
  p.add_argument("--variant", default="demo", choices=("demo", "paper"))
  p.add_argument("--series", type=int, default=48,
                 help="phantom series to build shards from (small: the "
                      "pipeline cycles over them)")
  p.add_argument("--cache", default="",
                 help="where the phantom corpus / shards are kept "
                      "(default: a temporary directory)")
  p.add_argument("--per-core", type=int, default=64, help="volumes, test 1")
  p.add_argument("--batches", type=int, default=12, help="batches, test 2")
  p.add_argument("--workers", type=int, default=2,
                 help="grain worker processes for the second pipeline row")
  p.add_argument("--steps", type=int, default=6, help="train steps, test 3")
  p.add_argument("--batch", type=int, default=0,
                 help="batch size (default: the config's, capped at the "
                      "number of train records)")
  p.add_argument("--feed-vol-s", type=float, default=250.0)
  p.add_argument("--on-device", action="store_true",
                 help="augment.on_device: rotation + noise in the jitted step")
  a = p.parse_args(argv)
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  if not absl_flags.FLAGS.is_parsed():   # grain worker processes read absl flags
    absl_flags.FLAGS.mark_as_parsed()
  config = pretrain.get_config(a.variant)
  cache = a.cache or tempfile.mkdtemp(prefix="radnet_pipe_")
  data = config.data.to_dict()
  data.update(phantom_n=a.series, cache_dir=cache,
              convert_workers=usable_cores(), phantom_split=(0.9, 0.05, 0.05))
  t = time.time()
  shards = demo.ensure_phantom_shards(data, config.taxonomy)
  paths = input_pipeline.split_paths(shards, "train")
  shape = tuple(config.input_shape)
  aug = config.augment.to_dict() if config.augment.enabled else None
  if aug is not None:
    aug["on_device"] = a.on_device
  n_rec = input_pipeline.count_records(paths)
  batch = min(a.batch or config.batch_size, n_rec)
  print(f"# {usable_cores()} cores, variant {a.variant}: {n_rec} train records "
        f"{tuple(data['shard_shape'])} -> input {shape}, batch {batch}, "
        f"augment {'off' if not aug else 'on, rotation + noise in the step' if a.on_device else 'on'} (shards ready in {time.time() - t:.0f} s)")
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"# load average {load:.1f}")

  rows = []
  vs, cpv = per_core(paths, shape, aug, a.per_core)
  rows.append(("decode + augment, 1 thread", vs, cpv))
  threads = int(config.data.threads)
  vs_p, cpv_p = pipeline(paths, shape, batch, aug, config.data, 0, a.batches)
  rows.append((f"grain pipeline, {threads} threads, in-process", vs_p, cpv_p))
  if a.workers > 0:
    vs_w, _ = pipeline(paths, shape, batch, aug, config.data, a.workers,
                       a.batches)
    rows.append((f"grain pipeline, {a.workers} worker processes", vs_w, float("nan")))
  if a.on_device and aug:
    rows.append((f"rotation + noise jitted ({jax_backend()}), batch {batch}",
                 *device_side(paths, shape, aug, batch, a.steps)))
  step = None
  if a.variant == "demo":
    step = train_step(config, batch, a.steps)
    rows.append((f"train step {config.model.name}, batch {batch} (consumer)", *step))

  print(f"{'what':<52} {'vol/s':>8} {'CPU ms/vol':>11}")
  for name, v, c in rows:
    cs = "n/a" if c != c else f"{1000 * c:.1f}"
    print(f"{name:<52} {v:>8.1f} {cs:>11}")
  best = max(r[1] for r in rows if "pipeline" in r[0])
  if step is not None:
    share = cpv / (cpv + step[1])
    print(f"# the pipeline needs {share:.1%} of the CPU time of pipeline + "
          f"train step on the same cores")
    print(f"ratio pipeline/train step (vol/s): {best / step[0]:.2f}")
  else:
    print(f"# cores of decode + augment to feed {a.feed_vol_s:.0f} vol/s: "
          f"{a.feed_vol_s / vs:.1f} at {vs:.1f} vol/s per core")
    print(f"ratio pipeline/accelerator feed (vol/s): {best / a.feed_vol_s:.2f}")


if __name__ == "__main__":
  main()
