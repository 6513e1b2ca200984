"""Generic training machinery, shared by pretraining and segmentation transfer.

A task (``radnet_jax.tasks.pretrain`` for pretraining, the segmentation transfer for
LiTS) supplies the model, a loss function, evaluators and its input pipeline;
this module supplies everything else:

* ``make_mesh`` / ``put_batch``: a 1-D data-parallel mesh (axis ``"data"``);
  batches sharded on their leading axis, parameters replicated. ``jax.jit``
  with ``NamedSharding``, no ``pmap``: BatchNorm statistics of a sharded
  batch are global under jit, so the same code runs on 1 CPU, 8 GPUs or a pod.
* ``make_optimizer``: optax AdamW or SGD+momentum, warmup + cosine decay,
  global-norm clipping, all from ``config.optim``.
* ``TrainState`` (a flax.struct pytree) and ``create_train_state``: shapes
  via ``jax.eval_shape``, then ``jit(init, out_shardings=...)`` so parameters
  are created directly with their sharding.
* ``make_train_step`` / ``make_eval_step``: jitted steps, state donated,
  step randomness ``fold_in(state.rng, state.step)``.
* ``MetricWriter``: console progress (steps/s, ETA), TensorBoard event files
  (tensorboardX) and ``metrics.jsonl`` in the workdir.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorboardX
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from radnet_jax.training import distributed

log = logging.getLogger("radnet_jax")

# loss_fn(model_output, batch) -> (scalar loss, {name: scalar metric})
LossFn = Callable[[Any, Mapping[str, jax.Array]], tuple[jax.Array, dict]]


@struct.dataclass
class TrainState:
  """Everything that a resumed run needs besides the data iterator.

  step: int32 scalar; params / batch_stats: Flax variable collections
  (batch_stats may be an empty dict); opt_state: optax state; rng: uint32 (2,)
  raw PRNG key from which each step folds in its own key.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


# -------------------------------------------------------------------- mesh ---
def make_mesh(num_devices: int | None = None, devices=None) -> Mesh:
  """1-D data-parallel mesh over the first ``num_devices`` devices (all by default)."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices) if num_devices is None else int(num_devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"asked for {n} devices but {len(devices)} are available")
  return jax.make_mesh((n,), ("data",), devices=devices[:n])


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """This process's numpy batch -> global jax arrays sharded on ``"data"``."""
  sh = data_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v))
          for k, v in batch.items()}


# --------------------------------------------------------------- optimizer ---
def make_schedule(cfg: Mapping, total_steps: int) -> optax.Schedule:
  """Linear warmup to ``cfg.lr`` then cosine decay to ``lr * final_lr_frac``."""
  warmup = int(cfg.get("warmup_steps", 0))
  decay = max(int(total_steps) - warmup, 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=float(cfg.get("init_lr_frac", 0.0)) * cfg["lr"], peak_value=cfg["lr"],
      warmup_steps=warmup, decay_steps=warmup + decay,
      end_value=float(cfg.get("final_lr_frac", 0.0)) * cfg["lr"])


def make_optimizer(cfg: Mapping, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """optax optimizer from ``cfg`` (``name``: "adamw" | "sgd"), with clipping.

  cfg keys: lr, warmup_steps, final_lr_frac, weight_decay, grad_clip (global
  norm; 0 = off), b1, b2, eps (AdamW), momentum, nesterov (SGD). Weight decay
  skips 1-D parameters (biases, norm scales).
  """
  schedule = make_schedule(cfg, total_steps)
  name = cfg.get("name", "adamw").lower()
  wd = float(cfg.get("weight_decay", 0.0))
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
  if name == "adamw":
    opt = optax.adamw(schedule, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                      eps=cfg.get("eps", 1e-8), weight_decay=wd, mask=decay_mask)
  elif name == "sgd":
    opt = optax.chain(
        optax.add_decayed_weights(wd, mask=decay_mask) if wd else optax.identity(),
        optax.sgd(schedule, momentum=cfg.get("momentum", 0.9),
                  nesterov=cfg.get("nesterov", True)))
  else:
    raise ValueError(f"unknown optimizer {name!r} (config.optim.name: adamw | sgd)")
  clip = float(cfg.get("grad_clip", 0.0))
  if clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(clip), opt)
  return opt, schedule


# ------------------------------------------------------------------- state ---
def create_train_state(model: flax.linen.Module, tx: optax.GradientTransformation,
                       input_shape: tuple, seed: int, mesh: Mesh,
                       init_kwargs: Mapping | None = None) -> TrainState:
  """Initialises the state directly replicated on ``mesh``.

  input_shape: per-example shape, e.g. (D, H, W, C); init uses a batch of 1.
  """
  kw = dict(init_kwargs or {"train": False})

  def init(init_key, step_rng):
    variables = model.init({"params": init_key, "dropout": init_key},
                           jnp.zeros((1,) + tuple(input_shape), jnp.float32), **kw)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=step_rng)

  # Parameters are drawn with the "unsafe_rbg" generator: XLA compiles the
  # threefry bit generation of every parameter tensor slowly on CPU (~18 s
  # for ResNetTiny vs ~2 s). Initial weights need no cryptographic-quality
  # streams; the per-step key stays a raw threefry key (uint32 (2,)), so
  # checkpoints keep their layout.
  init_key = jax.random.key(seed, impl="unsafe_rbg")
  step_rng = jax.random.split(jax.random.PRNGKey(seed))[1]
  abstract = jax.eval_shape(init, init_key, step_rng)
  shardings = jax.tree.map(lambda _: replicated(mesh), abstract)
  return jax.jit(init, out_shardings=shardings)(init_key, step_rng)


def param_count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ------------------------------------------------------------------- steps ---
def make_train_step(model: flax.linen.Module, tx: optax.GradientTransformation,
                    loss_fn: LossFn, mesh: Mesh,
                    schedule: optax.Schedule | None = None,
                    apply_kwargs: Mapping | None = None,
                    preprocess: Callable | None = None) -> Callable:
  """Jitted ``step(state, batch) -> (state, metrics)``; ``state`` is donated.

  ``preprocess(batch, key)``, if given, transforms the batch first inside the
  step (device-side augmentation) with key ``fold_in(fold_in(rng, step), 1)``.

  The model is called as ``model.apply(vars, batch["volume"], train=True)``
  with mutable batch_stats and a ``dropout`` key ``fold_in(rng, step)``;
  ``loss_fn(model_output, batch)`` returns the loss and scalar metrics.
  metrics add ``loss``, ``grad_norm`` and ``lr``; they stay on device until
  the caller fetches them (only at log steps).
  """
  akw = dict(apply_kwargs or {"train": True})
  rep = replicated(mesh)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if preprocess is not None:
      batch = preprocess(batch, jax.random.fold_in(rng, 1))

    def objective(params):
      variables = {"params": params}
      has_bs = bool(jax.tree.leaves(state.batch_stats))
      if has_bs:
        variables["batch_stats"] = state.batch_stats
      out, updates = model.apply(variables, batch["volume"], rngs={"dropout": rng},
                                 mutable=["batch_stats"] if has_bs else [], **akw)
      loss, metrics = loss_fn(out, batch)
      return loss, (metrics, updates.get("batch_stats", state.batch_stats))

    (loss, (metrics, new_bs)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_bs,
                              opt_state=opt_state)
    return new_state, metrics

  return jax.jit(step, out_shardings=(rep, rep), donate_argnums=(0,))


def _default_eval_output(out, batch):
  return out, {k: v for k, v in batch.items() if k != "volume"}


def make_eval_step(model: flax.linen.Module, mesh: Mesh,
                   output_fn: Callable[[Any, Any], Any] = _default_eval_output,
                   apply_kwargs: Mapping | None = None) -> Callable:
  """Jitted ``eval_step(state, batch) -> output_fn(model output, batch)``.

  Outputs are replicated, so every host can fetch the *global* batch's
  predictions and labels with ``jax.device_get`` (multi-host exact eval).
  Keep them small: return logits and labels, not feature maps or volumes.
  """
  akw = dict(apply_kwargs or {"train": False})

  def step(state: TrainState, batch):
    variables = {"params": state.params}
    if jax.tree.leaves(state.batch_stats):
      variables["batch_stats"] = state.batch_stats
    return output_fn(model.apply(variables, batch["volume"], **akw), batch)

  return jax.jit(step, out_shardings=replicated(mesh))


# ----------------------------------------------------------------- logging ---
class MetricWriter:
  """Console progress + TensorBoard + ``metrics.jsonl`` (process 0 writes)."""

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0,
               tensorboard: bool = True):
    self.workdir, self.total = workdir, int(total_steps)
    self.enabled = distributed.is_main_process()
    self._t0, self._s0 = time.time(), int(start_step)
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      if tensorboard:
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))

  def reset_clock(self, step: int) -> None:
    """Restarts the steps/s clock (call after compilation / eval pauses)."""
    self._t0, self._s0 = time.time(), int(step)

  def rate(self, step: int) -> float:
    dt = time.time() - self._t0
    return (step - self._s0) / dt if dt > 0 and step > self._s0 else float("nan")

  def write(self, step: int, metrics: Mapping[str, float], prefix: str = "train",
            console: bool = True) -> None:
    """Writes scalars; console line with steps/s and ETA for train metrics."""
    if not self.enabled:
      return
    flat = {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **{
        k: (v if math.isfinite(v) else None) for k, v in flat.items()}}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in flat.items():
        self._tb.add_scalar(k, v, step)
    if console:
      txt = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
      if prefix == "train":
        r = self.rate(step)
        eta = (self.total - step) / r if r == r and r > 0 else float("nan")
        eta_s = "?" if eta != eta else time.strftime("%M:%S", time.gmtime(eta)) \
            if eta < 3600 else f"{eta / 3600:.1f}h"
        log.info("step %d/%d  %s  (%.2f steps/s, ETA %s)", step, self.total, txt, r, eta_s)
      else:
        log.info("[%s] step %d  %s", prefix, step, txt)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()
