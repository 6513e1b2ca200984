"""Losses of pretraining and segmentation (jax, numpy and optax only).

Kept free of the input pipeline (grain) and the configs (ml_collections) so
that benchmarks on bare accelerator images (bench/gpu_check.py) use the very
functions the trainers use. ``radnet_jax.tasks.pretrain`` and ``radnet_jax.tasks.segment``
re-export them under the same names.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from radnet_jax.labels import taxonomy as tax

CLASS_TASKS = tax.CLASSIFICATION_TASKS


# ------------------------------------------------------------- pretraining ---
def _masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(w * v) / sum(w), and exactly 0 (with zero gradient) when sum(w) == 0."""
  denom = jnp.sum(weights)
  num = jnp.sum(jnp.where(weights > 0, values * weights, 0.0))
  return jnp.where(denom > 0, num / jnp.where(denom > 0, denom, 1.0), 0.0)


def class_weights_from_counts(counts: Mapping[str, np.ndarray], max_weight: float = 10.0
                              ) -> dict[str, np.ndarray]:
  """Inverse-frequency class weights ``N / (K * n_c)``, clipped to ``max_weight``.

  Classes without examples get weight 0 (they never appear as a target).
  """
  out = {}
  for task, c in counts.items():
    c = np.asarray(c, np.float64)
    k = max(int((c > 0).sum()), 1)
    w = np.where(c > 0, c.sum() / (k * np.maximum(c, 1)), 0.0)
    out[task] = np.minimum(w, max_weight).astype(np.float32)
  return out


def multitask_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], *,
                   weights: Mapping[str, float],
                   class_weights: Mapping[str, Any] | None = None,
                   label_smoothing: float = 0.0, spacing_loss: str = "huber",
                   huber_delta: float = 0.1) -> tuple[jax.Array, dict]:
  """Masked multi-task loss over a (global) batch.

  Args:
    outputs: head logits {task: (B, K)}; ``spacing`` (B, 1) predicts log(mm).
    batch: targets as in ``input_pipeline`` (-1 / NaN / coverage_mask 0 =
      unknown; ``mask`` 0 = padding).
    weights: per-task loss weight; a task with weight 0 or absent from
      ``outputs`` is skipped.
    class_weights: optional {task: (K,)} per-class weights (balancing).
    label_smoothing: for the softmax tasks.
    spacing_loss: "huber" or "l1" on log spacing.
    huber_delta: Huber transition, in log-mm units.
  Returns:
    (total loss, {"<task>_loss", "<task>_acc", "<task>_n", ...} scalars). Each
    task's loss is the mean over its known examples only, so an unknown
    label contributes exactly nothing (value and gradient).
  """
  valid = batch["mask"].astype(jnp.float32)
  total = jnp.zeros((), jnp.float32)
  m = {}
  for task in CLASS_TASKS:
    w = float(weights.get(task, 0.0))
    if w == 0.0 or task not in outputs:
      continue
    logits = outputs[task].astype(jnp.float32)
    labels = batch[task]
    known = ((labels >= 0) & (valid > 0)).astype(jnp.float32)
    safe = jnp.where(labels >= 0, labels, 0)
    onehot = optax.smooth_labels(jax.nn.one_hot(safe, logits.shape[-1]), label_smoothing) \
        if label_smoothing else jax.nn.one_hot(safe, logits.shape[-1])
    ce = optax.softmax_cross_entropy(logits, onehot)
    ew = known
    if class_weights is not None and task in class_weights:
      # one-hot product rather than a gather: works on batch-sharded labels
      # under any mesh (no gather of a replicated table by sharded indices).
      cwt = jnp.asarray(class_weights[task], jnp.float32)
      ew = known * jnp.sum(jax.nn.one_hot(safe, logits.shape[-1]) * cwt, axis=-1)
    loss = _masked_mean(ce, ew)
    total = total + w * loss
    m[f"{task}_loss"] = loss
    m[f"{task}_acc"] = _masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32),
                                    known)
  w = float(weights.get("coverage", 0.0))
  if w and "coverage" in outputs:
    logits = outputs["coverage"].astype(jnp.float32)
    known = batch["coverage_mask"].astype(jnp.float32) * valid
    bce = optax.sigmoid_binary_cross_entropy(logits, batch["coverage"]).mean(-1)
    loss = _masked_mean(bce, known)
    total = total + w * loss
    m["coverage_loss"] = loss
    exact = jnp.all((logits > 0) == (batch["coverage"] > 0.5), axis=-1)
    m["coverage_exact"] = _masked_mean(exact.astype(jnp.float32), known)
  w = float(weights.get("spacing", 0.0))
  if w and "spacing" in outputs:
    pred = outputs["spacing"].astype(jnp.float32).reshape(-1)
    sp = batch["spacing"]
    known = (jnp.isfinite(sp) & (sp > 0) & (valid > 0)).astype(jnp.float32)
    target = jnp.log(jnp.where(known > 0, sp, 1.0))
    err = pred - target
    per = optax.huber_loss(err, delta=huber_delta) if spacing_loss == "huber" else jnp.abs(err)
    loss = _masked_mean(per, known)
    total = total + w * loss
    m["spacing_loss"] = loss
    m["spacing_mae_mm"] = _masked_mean(jnp.abs(jnp.exp(pred) - jnp.where(known > 0, sp, 0.0)),
                                       known)
  return total, m


# ------------------------------------------------------------ segmentation ---
def seg_loss(logits: jax.Array, labels: jax.Array, num_classes: int,
             dice_weight: float = 1.0, ce_weight: float = 1.0,
             smooth: float = 1e-5) -> tuple[jax.Array, dict]:
  """Cross-entropy + soft Dice over the batch, foreground classes only.

  logits: ``(B, D, H, W, K)``; labels: int ``(B, D, H, W)``. The soft Dice
  pools intersections over the whole batch (stable for patches without
  liver). Metrics: ce, soft_dice, and a hard ``dice`` of the argmax.
  """
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  ce = -jnp.mean(jnp.sum(onehot * logp, axis=-1))
  p = jnp.exp(logp)
  axes = (0, 1, 2, 3)
  inter = jnp.sum(p * onehot, axis=axes)[1:]
  denom = jnp.sum(p, axis=axes)[1:] + jnp.sum(onehot, axis=axes)[1:]
  soft_dice = jnp.mean((2 * inter + smooth) / (denom + smooth))
  loss = ce_weight * ce + dice_weight * (1.0 - soft_dice)
  hard = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes, dtype=jnp.float32)
  hi = jnp.sum(hard * onehot, axis=axes)[1:]
  hd = jnp.sum(hard, axis=axes)[1:] + jnp.sum(onehot, axis=axes)[1:]
  dice = jnp.mean(jnp.where(hd > 0, 2 * hi / jnp.maximum(hd, 1), 1.0))
  return loss, {"ce": ce, "soft_dice": soft_dice, "dice": dice}
