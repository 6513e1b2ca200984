"""The one fit loop: every task trains through ``fit``.

A task (pretraining, segmentation, the slab proposal) supplies a jitted
``train_step(state, batch) -> (state, metrics)`` (``trainer.make_train_step``),
an iterator of host batches, and optionally ``evaluate(state) -> {name:
scalar}`` (validation) and a ``checkpoints.Checkpointer`` whose
``best_metric`` picks the best step among those scalars (``"val/<name>"``).
``fit`` does the rest, the same way for all of them:

* batches are sharded onto the mesh (``trainer.put_batch``); metrics stay on
  device and are fetched only at log steps (every ``log_every`` steps, the
  first step, and every evaluation / checkpoint step);
* at every log step the training loss is checked (``Divergence``): NaN/Inf,
  or a loss ``divergence_factor`` times the median of the recent logged
  losses, stops the run with ``FloatingPointError``. Evaluation, best
  promotion and checkpoints happen only after their step's check passed, so
  a diverged model is never saved nor promoted to best: the message names
  the checkpoints kept;
* on resume, ``metrics.jsonl`` is cut back to the restored step (no duplicate
  rows) and its logged losses seed the divergence median.

Resume order (``resume``): the workdir's newest readable checkpoint (exact:
model, optimizer, step, RNG, data iterator), else the task's ``init``
(``config.init_from``: pretrained weights), else scratch.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from radnet_jax.training import distributed
from radnet_jax.training import trainer

log = logging.getLogger("radnet_jax")

# evaluate(state) -> {metric name: scalar}; written as "val/<name>".
EvalFn = Callable[[Any], Mapping[str, float]]


@dataclasses.dataclass(frozen=True)
class Cadence:
  """When ``fit`` logs, evaluates, checkpoints, and what counts as divergence.

  Intervals of 0 disable evaluation / periodic checkpoints (the last step is
  always logged, and checkpointed when a Checkpointer is given).
  divergence_factor: a logged training loss above this multiple of the
    median of the last ``divergence_window`` logged losses is a divergence
    (0 = only NaN/Inf).
  """
  num_steps: int
  log_every: int
  eval_every: int = 0
  checkpoint_every: int = 0
  divergence_factor: float = 1000.0
  divergence_window: int = 50

  @classmethod
  def from_config(cls, config: Any) -> "Cadence":
    return cls(num_steps=int(config.num_steps), log_every=int(config.log_every),
               eval_every=int(config.eval_every),
               checkpoint_every=int(config.checkpoint_every),
               divergence_factor=float(config.divergence_factor),
               divergence_window=int(config.divergence_window))


class Divergence:
  """Detects a diverged run from the losses fetched at log steps."""

  def __init__(self, factor: float, window: int, history: Any = ()):
    self.factor = float(factor)
    self.losses = collections.deque((float(x) for x in history), maxlen=max(int(window), 1))

  def check(self, metrics: Mapping[str, float]) -> str | None:
    """None if healthy, else why not; a healthy loss joins the history."""
    loss = float(metrics.get("loss", 0.0))
    if not math.isfinite(loss):
      return f"non-finite training loss ({loss})"
    gnorm = metrics.get("grad_norm")
    if gnorm is not None and not math.isfinite(float(gnorm)):
      return f"non-finite gradient norm ({gnorm}) at training loss {loss:.4g}"
    if self.factor > 0 and self.losses:
      median = float(np.median(self.losses))
      if median > 0 and loss > self.factor * median:
        return (f"training loss {loss:.4g} is {loss / median:.3g}x the median "
                f"{median:.4g} of the last {len(self.losses)} logged losses "
                f"(config.divergence_factor = {self.factor:g})")
    self.losses.append(loss)
    return None


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


@dataclasses.dataclass
class FitResult:
  """state: after the last step; metrics: the last fetched training metrics;
  evaluated: (step, scalars) of the last evaluation; last_checkpoint: step."""
  state: Any
  metrics: dict
  evaluated: tuple[int, dict] | None
  last_checkpoint: int | None


def diverged_message(step: int, reason: str, workdir: str, ckpt: Any,
                     last_healthy: int | None) -> str:
  """The FloatingPointError text: what happened and which checkpoints are kept."""
  kept = []
  if ckpt is not None:
    latest = ckpt.latest_step()
    kept.append(f"the last checkpoint (step {latest}) in {workdir}/checkpoints is kept"
                if latest is not None else "no checkpoint was written yet")
    best = ckpt.best_record()
    if best is not None:
      kept.append(f"best stays step {best['step']}")
  healthy = f"the last healthy log step was {last_healthy}" if last_healthy is not None \
      else "no healthy log step in this run"
  return (f"training diverged at step {step}: {reason}; {healthy}; "
          f"{'; '.join(kept) or 'nothing was saved'}. Lower config.optim.lr, raise "
          f"warmup, or check the input data; rerunning resumes from the checkpoint kept.")


def resume(ckpt: Any, state: Any, data_iter: Any, init: Callable[[Any], Any] | None = None
           ) -> tuple[Any, bool]:
  """The documented resume order; returns (state, resumed from the workdir)."""
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state, data_iter)
    log.info("resumed from %s/checkpoints at step %d (model, optimizer, RNG, data "
             "iterator)", ckpt.workdir, int(jax.device_get(state.step)))
    return state, True
  if init is not None:
    state = init(state)
  return state, False


def truncate_metrics(workdir: str, step: int) -> list[float]:
  """Cuts ``metrics.jsonl`` back to ``step`` (rows after it, and the final_*
  rows a finished run adds, are redone by the resumed run); returns the
  training losses logged up to ``step`` (single-process runs only: in a
  multi-process job every process must take the same divergence decisions,
  and only process 0's disk is sure to hold the file). Process 0 rewrites it."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  keep, losses = [], []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut by a kill: dropped
      if int(row.get("step", 0)) > step or any(k.startswith("final_") for k in row):
        continue
      keep.append(line if line.endswith("\n") else line + "\n")
      if row.get("train/loss") is not None:
        losses.append(float(row["train/loss"]))
  if distributed.is_main_process():
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)
  return losses if jax.process_count() == 1 else []


def open_metrics(workdir: str, total_steps: int, start: int, tensorboard: bool
                 ) -> tuple[trainer.MetricWriter, list[float]]:
  """(writer appending to ``metrics.jsonl`` cut back to ``start``, the losses
  logged up to ``start`` for ``fit``'s ``loss_history``)."""
  history = truncate_metrics(workdir, start)
  return trainer.MetricWriter(workdir, total_steps, start, tensorboard), history


def fit(state: Any, train_step: Callable, batches: Iterator[Mapping[str, np.ndarray]],
        mesh: Any, cadence: Cadence, *, evaluate: EvalFn | None = None,
        ckpt: Any = None, writer: Any = None, workdir: str = "",
        loss_history: Any = ()) -> FitResult:
  """Trains ``state`` from its step to ``cadence.num_steps`` (see module doc).

  Args:
    state: a ``trainer.TrainState`` (restored or fresh), on ``mesh``.
    train_step: jitted, state-donating ``(state, batch) -> (state, metrics)``.
    batches: host batches (numpy, this process's share); a grain iterator
      when ``ckpt`` is given (its position is checkpointed).
    evaluate: validation, ``state -> {name: scalar}``; None = no validation.
    ckpt: ``checkpoints.Checkpointer`` (None: nothing saved).
    writer: ``trainer.MetricWriter`` (None: metrics only logged at the end).
    loss_history: logged losses before ``state.step`` (``truncate_metrics``).
  Raises:
    FloatingPointError: the run diverged (the message names what was kept).
  """
  c = cadence
  start = int(jax.device_get(state.step))
  monitor = Divergence(c.divergence_factor, c.divergence_window, loss_history)
  last_ckpt = ckpt.latest_step() if ckpt is not None else None
  last_healthy = start if start > 0 else None
  fetched: dict = {}
  evaluated = None

  def every(n, step):
    return n > 0 and step % n == 0

  for step in range(start + 1, c.num_steps + 1):
    state, m = train_step(state, trainer.put_batch(next(batches), mesh))
    is_last = step == c.num_steps
    do_eval = evaluate is not None and (every(c.eval_every, step) or is_last)
    do_ckpt = ckpt is not None and (every(c.checkpoint_every, step) or is_last)
    if not (every(c.log_every, step) or do_eval or do_ckpt or is_last
            or step == start + 1):
      continue
    # ---- log step: fetch, check health before anything is saved -------------
    fetched = {k: float(v) for k, v in jax.device_get(m).items()}
    reason = monitor.check(fetched)
    if reason is None and (do_eval or do_ckpt) and not bool(_all_finite(state.params)):
      reason = f"non-finite parameters after step {step} (training loss {fetched['loss']:.4g})"
    if reason is not None:
      if writer is not None:
        writer.write(step, fetched, "train")
      raise FloatingPointError(diverged_message(step, reason, workdir, ckpt, last_healthy))
    last_healthy = step
    if writer is not None:
      writer.write(step, fetched, "train")
      if step == start + 1:
        writer.reset_clock(step)  # exclude compilation from steps/s
    # ---- evaluation and best ----------------------------------------------
    if do_eval:
      scalars = {k: float(v) for k, v in evaluate(state).items()}
      evaluated = (step, scalars)
      if writer is not None:
        writer.write(step, scalars, "val")
        writer.reset_clock(step)  # steps/s and ETA measure training only
      if ckpt is not None and ckpt.maybe_save_best(
          step, state, {f"val/{k}": v for k, v in scalars.items()}):
        log.info("new best %s = %.4f at step %d", ckpt.best_metric,
                 scalars[ckpt.best_metric.split("/", 1)[-1]], step)
    # ---- checkpoint ----------------------------------------------------------
    if do_ckpt:
      ckpt.save(step, state, batches)
      last_ckpt = step
  return FitResult(state=state, metrics=fetched, evaluated=evaluated,
                   last_checkpoint=last_ckpt)

