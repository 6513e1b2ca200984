"""Pretraining: multi-task 3D ResNet on metadata-derived labels.

``train_and_evaluate(config, workdir)`` is the one entry (``run.py`` calls
it). Tasks and heads: sequence / plane / contrast (softmax), coverage
(9 sigmoid bands), spacing (regression on log mm). Unknown labels are masked
out of their task's loss. Resume order: a checkpoint in ``workdir`` (exact
resume: model, optimizer, step, RNG, data iterator), else
``config.init_from`` (params by name), else from scratch.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Iterable, Mapping

import jax
import ml_collections
import numpy as np

from radnet_jax import contract as contract_lib
from radnet_jax.data import device_augment
from radnet_jax.data import pretrain as input_pipeline
from radnet_jax.labels import taxonomy as tax
from radnet_jax.models import factory
from radnet_jax.shards import demo
from radnet_jax.shards import records
from radnet_jax.training import checkpoints
from radnet_jax.training import distributed
from radnet_jax.training import loop
from radnet_jax.training import metrics as metrics_lib
from radnet_jax.training import trainer
from radnet_jax.training.losses import class_weights_from_counts, multitask_loss  # noqa: F401 (re-exported)

log = logging.getLogger("radnet_jax")

CLASS_TASKS = tax.CLASSIFICATION_TASKS


# -------------------------------------------------------------- evaluation ---
def _eval_output(out, batch):
  outputs = {k: v for k, v in out[0].items() if k != "embedding"}
  labels = {k: v for k, v in batch.items() if k != "volume"}
  return outputs, labels


def evaluate(eval_step, state, batches: Iterable[Mapping[str, np.ndarray]], mesh,
             taxonomy: tax.Taxonomy) -> dict:
  """Exact per-task metrics over every batch (padding masked). Returns
  {task: evaluator result} for the tasks the model has heads for."""
  evals = {t: metrics_lib.ClassificationEvaluator(taxonomy.classes(t)) for t in CLASS_TASKS}
  evals["coverage"] = metrics_lib.MultiLabelEvaluator(tax.COVERAGE_BANDS)
  evals["spacing"] = metrics_lib.RegressionEvaluator()
  seen = set()
  for batch in batches:
    outputs, labels = jax.device_get(eval_step(state, trainer.put_batch(batch, mesh)))
    mask = labels["mask"]
    for t in CLASS_TASKS:
      if t in outputs:
        seen.add(t)
        evals[t].update(outputs[t], labels[t], mask)
    if "coverage" in outputs:
      seen.add("coverage")
      evals["coverage"].update(outputs["coverage"], labels["coverage"],
                               mask * labels["coverage_mask"])
    if "spacing" in outputs:
      seen.add("spacing")
      evals["spacing"].update(np.exp(np.asarray(outputs["spacing"], np.float64)).reshape(-1),
                              labels["spacing"], mask)
  return {t: evals[t].result() for t in (*CLASS_TASKS, "coverage", "spacing") if t in seen}


def summary(results: Mapping[str, Mapping]) -> dict[str, float]:
  """Flat scalars for logging and best-checkpoint selection.

  ``mean_accuracy`` = mean of the softmax tasks' accuracies and the coverage
  exact match (NaN entries ignored).
  """
  s = {}
  for t in CLASS_TASKS:
    if t in results:
      s[f"{t}_acc"] = results[t]["accuracy"]
  if "coverage" in results:
    s["coverage_exact"] = results["coverage"]["exact_match"]
  if "spacing" in results:
    s["spacing_mae_mm"] = results["spacing"]["mae_mm"]
  accs = [v for k, v in s.items() if (k.endswith("_acc") or k == "coverage_exact") and v == v]
  s["mean_accuracy"] = float(np.mean(accs)) if accs else float("nan")
  return s


def write_results(workdir: str, results: Mapping[str, Any], split: str, extra: Mapping) -> str:
  """results.json, results.md and confusion PNGs for ``split``; returns the md."""
  md = metrics_lib.results_markdown(results, title=f"{split} ({extra.get('checkpoint', '')})")
  if not distributed.is_main_process():
    return md
  path = os.path.join(workdir, "results.json")
  allres = {}
  if os.path.exists(path):
    with open(path) as f:
      allres = json.load(f)
  allres[split] = metrics_lib.jsonsafe({"metrics": results, "summary": summary(results),
                                        **extra})
  with open(path, "w") as f:
    json.dump(allres, f, indent=2)
  with open(os.path.join(workdir, f"results_{split}.md"), "w") as f:
    f.write(md)
  if split == "test":
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(md)
  for t in CLASS_TASKS:
    if t in results:
      metrics_lib.save_confusion_png(os.path.join(workdir, "plots", f"{split}_{t}.png"),
                                     results[t]["confusion"], results[t]["classes"],
                                     f"{t} ({split})")
  return md


# ------------------------------------------------------------------- train ---
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, validates (best checkpoint), tests; returns the test results.

  Writes to ``workdir``: config.json, contract.json (the preprocessing
  contract: shard shape, intensity mapping, orientation, taxonomy; what
  ``radnet_jax.load`` prepares inputs by), checkpoints/, best/, metrics.jsonl,
  tb/ (TensorBoard), results.json, results.md, results_<split>.md, plots/.
  """
  os.makedirs(workdir, exist_ok=True)
  t_start = time.time()
  if not config.get("verbose_checkpointing", False):
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save INFO flood
  taxonomy = tax.Taxonomy(config.taxonomy)
  shape = tuple(int(s) for s in config.input_shape)

  # ------------------------------------------------------------------ mesh --
  mesh = trainer.make_mesh(config.num_devices or None)
  local_batch = distributed.check_batch(config.batch_size, mesh=mesh)
  eval_local = distributed.check_batch(config.eval_batch_size, mesh=mesh)
  log.info("mesh: %d device(s) (%s), %d process(es); global batch %d",
           mesh.devices.size, jax.devices()[0].platform, jax.process_count(),
           config.batch_size)

  # ------------------------------------------------------------------ data --
  shards_dir = config.data.shards_dir
  if not shards_dir:
    shards_dir = demo.ensure_phantom_shards(config.data, config.taxonomy)
  else:
    log.info("data: shards from config.data.shards_dir = %s", shards_dir)
  paths = {s: input_pipeline.split_paths(shards_dir, s) for s in ("train", "val", "test")}
  counts = {s: input_pipeline.count_records(p) for s, p in paths.items()}
  log.info("data: %s records (train / val / test) in %s",
           " / ".join(str(counts[s]) for s in ("train", "val", "test")), shards_dir)
  if counts["train"] == 0:
    raise ValueError(f"no training records in {shards_dir}")

  class_weights = None
  if config.loss.class_balanced:
    label_counts = input_pipeline.manifest_label_counts(shards_dir, "train", taxonomy)
    if label_counts is None:  # no manifest: one pass over the train records
      label_counts = input_pipeline.label_counts(
          input_pipeline.record_targets(paths["train"]), taxonomy)
    class_weights = class_weights_from_counts(label_counts, config.loss.max_class_weight)
    log.info("class weights: %s", {k: np.round(v, 2).tolist()
                                   for k, v in class_weights.items()})
  augment_cfg = config.augment.to_dict() if config.augment.enabled else None
  aug_on_device = bool(augment_cfg) and device_augment.resolve_on_device(
      augment_cfg.get("on_device", False))
  if augment_cfg is not None:
    augment_cfg["on_device"] = aug_on_device
    log.info("augmentation: rotation and noise %s", "in the jitted train step"
             if aug_on_device else "on the host (input pipeline)")
  train_ds = input_pipeline.train_dataset(
      paths["train"], shape=shape, batch_size=local_batch, seed=config.seed,
      augment_cfg=augment_cfg,
      balance_keys=tuple(config.data.balance_keys), balance_power=config.data.balance_power,
      num_threads=config.data.threads, prefetch=config.data.prefetch,
      workers=config.data.workers, process_index=jax.process_index(),
      process_count=jax.process_count())
  train_iter = iter(train_ds)

  def eval_data(split):
    return input_pipeline.eval_batches(
        paths[split], shape=shape, batch_size=eval_local, num_threads=config.data.threads,
        process_index=jax.process_index(), process_count=jax.process_count())

  # ----------------------------------------------------------------- model --
  model = factory.pretrain_model(config, taxonomy)
  total_steps = int(config.num_steps)
  tx, schedule = trainer.make_optimizer(config.optim, total_steps)
  state = trainer.create_train_state(model, tx, shape + (1,), config.seed, mesh)
  log.info("model: %s, %.2fM parameters, input %s, heads %s", config.model.name,
           trainer.param_count(state.params) / 1e6, shape, dict(model.heads))

  # -------------------------------------------------------- update step ----
  loss_cfg = config.loss
  # numpy, so they become constants of the jitted step (a committed jax array
  # closed over would carry a single-device sharding into a multi-device mesh).
  cw = None if class_weights is None else {k: np.asarray(v, np.float32)
                                           for k, v in class_weights.items()}

  def loss_fn(out, batch):
    return multitask_loss(out[0], batch, weights=loss_cfg.weights.to_dict(),
                          class_weights=cw, label_smoothing=loss_cfg.label_smoothing,
                          spacing_loss=loss_cfg.spacing_loss, huber_delta=loss_cfg.huber_delta)

  train_step = trainer.make_train_step(
      model, tx, loss_fn, mesh, schedule,
      preprocess=device_augment.augment if aug_on_device else None)
  eval_step = trainer.make_eval_step(model, mesh, _eval_output)

  # --------------------------------------------------------------- restore --
  checkpoints.save_config(workdir, config)
  if jax.process_index() == 0:   # what inference will prepare inputs as
    manifest = records.read_manifest(shards_dir) if records.has_manifest(shards_dir) else None
    contract_lib.write(workdir, contract_lib.for_pretrain(config, manifest))
  ckpt = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints,
                                  best_metric=config.best_metric if counts["val"] else None,
                                  best_mode=config.best_mode)

  def init(st):  # no checkpoint in the workdir: pretrained weights by name, if any
    return checkpoints.init_from(st, config.init_from, tuple(config.init_skip))[0] \
        if config.init_from else st

  state, _ = loop.resume(ckpt, state, train_iter, init)
  start = int(jax.device_get(state.step))

  # ------------------------------------------------------------------ loop --
  writer, history = loop.open_metrics(workdir, total_steps, start, config.tensorboard)
  val_at = {}  # step -> val results of the latest validation pass

  def validate(st):
    res = evaluate(eval_step, st, eval_data("val"), mesh, taxonomy)
    val_at.clear()
    val_at[int(jax.device_get(st.step))] = res
    return summary(res)

  log.info("training steps %d -> %d", start, total_steps)
  fitted = loop.fit(state, train_step, train_iter, mesh, loop.Cadence.from_config(config),
                    evaluate=validate if counts["val"] else None, ckpt=ckpt, writer=writer,
                    workdir=workdir, loss_history=history)
  state = fitted.state
  if hasattr(train_iter, "close"):
    train_iter.close()

  # ------------------------------------------------------------------ test --
  tested_step = int(jax.device_get(state.step))
  which = f"last@{tested_step}"
  best = ckpt.best_record()
  if config.test_checkpoint == "best" and best is not None:
    if int(best["step"]) != tested_step:
      state, tested_step = ckpt.restore_best(state)
    which = f"best@{best['step']} ({best['metric']}={best['value']:.4f})" \
        if tested_step == int(best["step"]) else f"last@{tested_step} (best unreadable)"
  out = {}
  for split in ("val", "test"):
    if counts[split] == 0:
      continue
    if split == "val" and tested_step in val_at:
      res = val_at[tested_step]  # this checkpoint was just validated: no second pass
    else:
      res = evaluate(eval_step, state, eval_data(split), mesh, taxonomy)
    md = write_results(workdir, res, split, {"checkpoint": which, "shards_dir": shards_dir,
                                             "num_records": counts[split]})
    writer.write(total_steps, summary(res), f"final_{split}", console=False)
    out[split] = res
    if split == "test":
      log.info("test results (%s, %d held-out records):\n%s", which, counts[split], md)
  writer.close()
  ckpt.close()
  log.info("done in %.1f min; results in %s", (time.time() - t_start) / 60, workdir)
  return out
