"""Liver segmentation transfer: data, loss, training and evaluation.

``train_and_evaluate(config, workdir)`` is the ``config.entry`` of
``experiments/transfer_liver.py`` (``python run.py --config=...``). It reuses
``radnet_jax.training.loop`` (the one fit loop: logging, divergence checks,
best checkpoint, resume with the grain iterator state), ``radnet_jax.training.trainer``
(mesh, optimizer, jitted steps) and ``radnet_jax.models.factory`` (the network);
this module only supplies what is specific to segmentation:

* data: segmentation shards (``radnet_jax.shards.seg``); with an empty
  ``config.data.shards_dir`` the phantom LiTS set is generated and converted
  once into the cache (``radnet_jax.shards.demo.cache_root``);
* a grain pipeline of foreground-biased random patches
  (``radnet_jax.data.segment``): with probability ``config.data.fg_prob`` a
  patch is centred on a random liver voxel, else on a random voxel;
  intensity/noise/flip augmentation;
* loss: softmax cross-entropy + soft Dice over the foreground classes;
* transfer (``radnet_jax.training.transfer``): encoder weights from a pretraining
  checkpoint, optionally frozen for the first K steps;
* evaluation on whole volumes: sliding-window inference
  (``radnet_jax.inference.sliding_window``), optional liver-slab proposal
  (``radnet_jax.tasks.proposal``), largest-connected-component post-processing,
  Dice / ASSD (``radnet_jax.training.seg_metrics``) on the record grid; predicted masks
  written as NIfTI in each case's original geometry; ``results.json``.

Batches: ``volume`` float32 ``(B, d, h, w, 1)``, ``label`` int32
``(B, d, h, w)`` (0 background, 1 liver[, 2 tumour] per ``num_classes``).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from radnet_jax import phantom
from radnet_jax.data import segment as seg_input
from radnet_jax.dicom import nifti
from radnet_jax.inference import sliding_window as inference
from radnet_jax.models import factory
from radnet_jax.shards import demo
from radnet_jax.shards import seg as segdata
from radnet_jax.tasks import pretrain
from radnet_jax.tasks import proposal
from radnet_jax.training import checkpoints
from radnet_jax.training import distributed
from radnet_jax.training import loop
from radnet_jax.training import seg_metrics
from radnet_jax.training import trainer
from radnet_jax.training import transfer
from radnet_jax.training.losses import seg_loss  # noqa: F401 (re-exported)

log = logging.getLogger("radnet_jax")


# -------------------------------------------------------------------- data ---
def phantom_lits_dir(data_cfg: Mapping) -> str:
  """Cache folder of the phantom LiTS set for ``data_cfg`` (nifti/ + shards-*)."""
  name = f"lits-phantom-n{int(data_cfg['phantom_n'])}-s{int(data_cfg['phantom_seed'])}"
  return os.path.join(demo.cache_root(data_cfg.get("cache_dir", "")), name)


def prep_config(data_cfg: Mapping) -> segdata.SegPrepConfig:
  return segdata.SegPrepConfig(
      spacing=tuple(float(s) for s in data_cfg["spacing"]),
      window=tuple(float(s) for s in data_cfg["window"]),
      out_range=tuple(float(s) for s in data_cfg["out_range"]),
      val_fraction=float(data_cfg["val_fraction"]),
      test_fraction=float(data_cfg["test_fraction"]), seed=int(data_cfg["split_seed"]))


def ensure_shards(data_cfg: Mapping) -> str:
  """``data_cfg.shards_dir``, or the phantom LiTS set built (once) in the cache.

  A given ``lits_dir`` (a LiTS-format folder) is converted into
  ``<lits_dir>/../<name>-shards-<spacing>``-like cache folders the same way.
  Builds happen in ``*.partial`` folders renamed when complete.
  """
  if data_cfg.get("shards_dir"):
    return data_cfg["shards_dir"]
  cfg = prep_config(data_cfg)
  tag = "x".join(f"{s:g}" for s in cfg.spacing) + "-w" + "_".join(
      f"{w:g}" for w in cfg.window) + "-r" + "_".join(f"{r:g}" for r in cfg.out_range) \
      + f"-v{cfg.val_fraction:g}-t{cfg.test_fraction:g}-s{cfg.seed}"
  if data_cfg.get("lits_dir"):
    nifti_dir = data_cfg["lits_dir"]
    root = os.path.join(demo.cache_root(data_cfg.get("cache_dir", "")), "lits-shards",
                        os.path.basename(os.path.normpath(nifti_dir)))
  else:
    root = phantom_lits_dir(data_cfg)
    nifti_dir = os.path.join(root, "nifti")
    if not os.path.isdir(nifti_dir):
      tmp = nifti_dir + ".partial"
      shutil.rmtree(tmp, ignore_errors=True)
      log.info("data: generating the phantom LiTS set (%d volumes, seed %d) in %s",
               int(data_cfg["phantom_n"]), int(data_cfg["phantom_seed"]), nifti_dir)
      # workers=1: forking a process that already runs JAX threads can deadlock.
      phantom.make_lits(tmp, n=int(data_cfg["phantom_n"]),
                        seed=int(data_cfg["phantom_seed"]), workers=1, progress=False)
      os.replace(tmp, nifti_dir)
  shards = os.path.join(root, f"shards-{tag}")
  if os.path.exists(os.path.join(shards, "manifest.json")):
    log.info("data: reusing segmentation shards in %s", shards)
    return shards
  tmp = shards + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  log.info("data: converting %s to segmentation shards (%s)", nifti_dir, cfg)
  segdata.build_shards(nifti_dir, tmp, cfg, progress=False)
  shutil.rmtree(shards, ignore_errors=True)
  os.replace(tmp, shards)
  return shards


def _logits(out):
  return out[0] if isinstance(out, (tuple, list)) else out


_PREDICT_FNS: dict[int, tuple[Any, Any]] = {}


def _predict_probs_fn(model):
  """Jitted (variables, windows) -> softmax probabilities, one per model
  object (keyed by identity: Flax modules with dict fields do not hash)."""
  hit = _PREDICT_FNS.get(id(model))
  if hit is None or hit[0] is not model:
    def f(variables, x):
      return jax.nn.softmax(_logits(model.apply(variables, x, train=False))
                            .astype(jnp.float32), axis=-1)
    hit = _PREDICT_FNS[id(model)] = (model, jax.jit(f))
  return hit[1]


def predictor(model, state_or_vars) -> inference.PredictFn:
  """Softmax predictor for sliding windows; compiled once per window shape."""
  if hasattr(state_or_vars, "params"):
    variables = {"params": state_or_vars.params}
    if jax.tree.leaves(state_or_vars.batch_stats):
      variables["batch_stats"] = state_or_vars.batch_stats
  else:
    variables = state_or_vars
  # Plain single-device copies: the training state lives on the mesh (with
  # explicit data-axis shardings) but windows are blended on one device.
  variables = jax.device_put(jax.device_get(variables), jax.devices()[0])
  return functools.partial(_predict_probs_fn(model), variables)


# ---------------------------------------------------------------- evaluate ---
def segment_volume(predict_fn: inference.PredictFn, volume: np.ndarray,
                   eval_cfg: Mapping, z_range: tuple[int, int] | None = None
                   ) -> np.ndarray:
  """Label map ``(D, H, W)`` uint8 of a normalised record volume.

  Sliding window over ``z_range`` (slices [z0, z1), everything else
  background) or the whole volume; argmax; largest connected component when
  ``eval_cfg.lcc``.
  """
  vol = np.asarray(volume, np.float32)
  out = np.zeros(vol.shape, np.uint8)
  z0, z1 = (0, vol.shape[0]) if z_range is None else z_range
  if z1 <= z0:
    return out
  probs = inference.sliding_window_inference(
      vol[z0:z1, ..., None], tuple(eval_cfg["roi"]), predict_fn,
      overlap=eval_cfg["overlap"], sw_batch_size=eval_cfg["sw_batch_size"],
      mode=eval_cfg["mode"], pad_value=eval_cfg.get("pad_value", 0.0))
  out[z0:z1] = np.asarray(jnp.argmax(probs, axis=-1), np.uint8)
  if eval_cfg.get("lcc", True):
    out = seg_metrics.keep_largest_organ(out, organ=tuple(range(1, int(out.max()) + 1))
                                         or (1,))
  return out


def evaluate(predict_fn: inference.PredictFn, recs: Sequence[Mapping],
             eval_cfg: Mapping, num_classes: int, proposer=None,
             save_dir: str | None = None, overlay_dir: str | None = None) -> dict:
  """Dice/ASSD over whole volumes (record grid); optional NIfTI/overlay output."""
  classes = {"liver": (1, 2)} if num_classes == 2 else dict(seg_metrics.LITS_CLASSES)
  ev = seg_metrics.SegEvaluator(classes=classes, compute_assd=eval_cfg.get("assd", True))
  prop_rows = []
  for rec in recs:
    z = None
    if proposer is not None:
      z = proposer.propose(rec["volume"])
      prop_rows.append(proposer.score_case(z, rec["mask"]))
    pred = segment_volume(predict_fn, rec["volume"], eval_cfg, z)
    ref = rec["mask"] if num_classes == 3 else (rec["mask"] > 0).astype(np.uint8)
    ev.add(str(rec["case"]), pred, ref, rec["geometry"]["spacing"])
    if save_dir:
      nifti.save_nifti(pred, rec["geometry"],
                         os.path.join(save_dir, f"case-{rec['case']}.nii.gz"))
    if overlay_dir:
      save_overlay(os.path.join(overlay_dir, f"case-{rec['case']}.png"),
                   rec["volume"], ref, pred, title=f"case {rec['case']}")
  out = ev.summary()
  if prop_rows:
    kept = sum(r["liver_slices_kept"] for r in prop_rows)
    total = sum(r["liver_slices"] for r in prop_rows)
    out["proposal/recall"] = kept / total if total else 1.0
    out["proposal/discarded_fraction"] = float(np.mean(
        [r["discarded_fraction"] for r in prop_rows]))
  return out


def save_overlay(path: str, volume: np.ndarray, ref: np.ndarray, pred: np.ndarray,
                 title: str = "", n_slices: int = 3) -> str:
  """PNG of ``n_slices`` axial slices through the reference liver: image,
  reference contour (green) and prediction (red)."""
  # matplotlib: an optional, slow-to-import dependency needed only for overlays.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  zs = np.flatnonzero((ref > 0).any(axis=(1, 2)))
  if zs.size == 0:
    zs = np.arange(volume.shape[0])
  picks = zs[np.linspace(0, zs.size - 1, n_slices + 2).astype(int)[1:-1]]
  fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 3.4))
  for ax, z in zip(np.atleast_1d(axes), picks):
    ax.imshow(np.asarray(volume[z], np.float32), cmap="gray")
    if (ref[z] > 0).any():
      ax.contour(ref[z] > 0, levels=[0.5], colors="lime", linewidths=1)
    if (pred[z] > 0).any():
      ax.contour(pred[z] > 0, levels=[0.5], colors="red", linewidths=1)
    ax.set_title(f"z={z}", fontsize=8)
    ax.axis("off")
  fig.suptitle(f"{title} (green: reference, red: prediction)", fontsize=9)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=80, bbox_inches="tight")
  plt.close(fig)
  return path


# -------------------------------------------------------------------- init ---
def resolve_init(config: ml_collections.ConfigDict) -> str:
  """The pretraining checkpoint to start from ("" = scratch).

  ``init_from == "auto"``: the pretraining demo run cached at
  ``<cache>/pretrain-demo`` (``config.pretrain`` is trained there first if
  it has no checkpoint yet, via ``radnet_jax.tasks.pretrain.train_and_evaluate``).
  """
  src = config.init_from
  if src != "auto":
    return src
  pre = config.get("pretrain_workdir") or os.path.join(
      demo.cache_root(config.data.get("cache_dir", "")), "pretrain-demo")
  try:
    checkpoints.resolve(pre)
    log.info("init: reusing the cached pretraining run %s", pre)
    return pre
  except FileNotFoundError:
    pass
  if config.get("pretrain") is None:
    raise ValueError("init_from='auto' needs config.pretrain (the pretraining "
                     "config) or an existing pretraining workdir")
  log.info("init: no pretraining checkpoint in %s: running the pretraining demo "
           "first", pre)
  pretrain.train_and_evaluate(config.pretrain, pre)
  return pre


# ------------------------------------------------------------------- train ---
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the segmentation network, evaluates held-out volumes.

  Writes to ``workdir``: config.json, checkpoints/, best/ (when a val split
  exists), metrics.jsonl, tb/, results.json (per-case and global Dice, ASSD,
  transfer report, proposal recall), predictions/*.nii.gz (original
  geometry), plots/*.png overlays. Returns the results dict.
  """
  os.makedirs(workdir, exist_ok=True)
  t_start = time.time()
  patch = tuple(int(s) for s in config.patch_shape)

  # ------------------------------------------------------------------ mesh --
  mesh = trainer.make_mesh(config.num_devices or None)
  local_batch = distributed.check_batch(config.batch_size, mesh=mesh)

  # ------------------------------------------------------------------ data --
  shards_dir = ensure_shards(config.data)
  manifest = segdata.load_manifest(shards_dir)
  train_cases = seg_input.select_cases(manifest["splits"]["train"], config.data.n_train,
                             config.data.subset_seed)
  log.info("data: %d training volume(s) of %d, %d val, %d test, from %s",
           len(train_cases), len(manifest["splits"]["train"]),
           len(manifest["splits"]["val"]), len(manifest["splits"]["test"]), shards_dir)
  aug = config.augment.to_dict() if config.augment.enabled else None
  train_ds = seg_input.train_dataset(
      shards_dir, train_cases, patch=patch, batch_size=local_batch, seed=config.seed,
      num_classes=config.num_classes, fg_prob=config.data.fg_prob, augment_cfg=aug,
      pad_value=float(config.data.out_range[0]), num_threads=config.data.threads,
      prefetch=config.data.prefetch, process_index=jax.process_index(),
      process_count=jax.process_count())
  train_iter = iter(train_ds)

  # ----------------------------------------------------------------- model --
  model = factory.segmentation_model(config)
  total_steps = int(config.num_steps)
  tx, schedule = trainer.make_optimizer(config.optim, total_steps)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1,) + patch + (1,)), train=False))
  if config.freeze_encoder_steps > 0:
    tx = transfer.freeze_for_steps(tx, abstract["params"], config.freeze_encoder_steps,
                                   tuple(config.freeze_patterns))
  state = trainer.create_train_state(model, tx, patch + (1,), config.seed, mesh)
  log.info("model: %s (%s), %.2fM parameters, patch %s, %d classes", config.model.name,
           config.model.get("backbone", ""), trainer.param_count(state.params) / 1e6,
           patch, config.num_classes)

  def loss_fn(out, batch):
    return seg_loss(_logits(out), batch["label"], config.num_classes,
                    config.loss.dice_weight, config.loss.ce_weight)

  train_step = trainer.make_train_step(model, tx, loss_fn, mesh, schedule)

  # --------------------------------------------------------------- restore --
  checkpoints.save_config(workdir, config)
  val_recs = segdata.load_records(shards_dir, "val")
  ckpt = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints,
                                  best_metric="val/liver/dice_global" if val_recs else None)
  reports = []

  def init(st):  # no checkpoint in the workdir: the pretrained trunk, if any
    src = resolve_init(config)
    if not src:
      return st
    st, rep = transfer.transfer_state(st, src)
    reports.append(rep)
    return st

  state, _ = loop.resume(ckpt, state, train_iter, init)
  report = reports[0] if reports else None
  if report is not None:
    with open(os.path.join(workdir, "transfer_report.json"), "w") as f:
      json.dump(report.as_dict(), f, indent=1)
  start = int(jax.device_get(state.step))

  # ------------------------------------------------------------------ loop --
  writer, history = loop.open_metrics(workdir, total_steps, start, config.tensorboard)
  eval_cfg = config.eval.to_dict()

  def validate(st):
    res = evaluate(predictor(model, st), val_recs, dict(eval_cfg, assd=False),
                   config.num_classes)
    return {"liver/dice_global": res["liver/dice_global"]}

  t_train = time.time()
  state = loop.fit(state, train_step, train_iter, mesh, loop.Cadence.from_config(config),
                   evaluate=validate if val_recs else None, ckpt=ckpt, writer=writer,
                   workdir=workdir, loss_history=history).state
  train_s = time.time() - t_train

  # ------------------------------------------------------------------ test --
  which = f"last@{int(jax.device_get(state.step))}"
  best = ckpt.best_record()
  if config.test_checkpoint == "best" and best is not None:
    state, step = ckpt.restore_best(state)
    which = f"best@{step}" if step == int(best["step"]) else f"last@{step} (best unreadable)"
  proposer = None
  if config.proposal.enabled:
    proposer = proposal.train_proposer(config, shards_dir, train_cases,
                                       resolve_init(config) if config.init_from else "",
                                       workdir)
  test_recs = segdata.load_records(shards_dir, "test")
  results = {"checkpoint": which, "shards_dir": shards_dir, "n_train": len(train_cases),
             "train_cases": train_cases, "init_from": config.init_from,
             "transfer": report.summary() if report else "scratch",
             "num_steps": total_steps, "train_seconds": train_s}
  for split, recs in (("test", test_recs), ("val", val_recs)):
    if not recs:
      continue
    out = evaluate(predictor(model, state), recs, eval_cfg, config.num_classes,
                   proposer=proposer,
                   save_dir=os.path.join(workdir, "predictions") if config.eval.save_nifti
                   and split == "test" else None,
                   overlay_dir=os.path.join(workdir, "plots") if config.eval.save_overlays
                   and split == "test" else None)
    results[split] = out
    writer.write(total_steps, {k: v for k, v in out.items()
                               if isinstance(v, float)}, f"final_{split}", console=False)
    log.info("%s: liver Dice %.4f global, %.4f per case, ASSD %.2f mm (%d volumes)",
             split, out["liver/dice_global"], out["liver/dice_per_case"],
             out.get("liver/assd_mm", float("nan")), out["num_cases"])
  results["total_seconds"] = time.time() - t_start
  if distributed.is_main_process():
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(_jsonsafe(results), f, indent=2)
  writer.close()
  ckpt.close()
  log.info("done in %.1f min; results in %s/results.json", results["total_seconds"] / 60,
           workdir)
  return results


def _jsonsafe(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {str(k): _jsonsafe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonsafe(v) for v in obj]
  if isinstance(obj, (np.floating, float)):
    v = float(obj)
    return v if np.isfinite(v) else None
  if isinstance(obj, np.integer):
    return int(obj)
  return obj


# ----------------------------------------------------------------- predict ---
def load_seg_predictor(workdir: str, prefer: str = "latest"
                       ) -> tuple[inference.PredictFn, ml_collections.ConfigDict]:
  """(softmax predictor, run config) of a trained segmentation run.

  Uses the run's ``config.json`` (model, spacing, HU window, sliding-window
  settings) and its best or latest readable checkpoint (``prefer``;
  ``checkpoints.restore``).
  """
  restored = checkpoints.restore(workdir, prefer)
  if restored.config is None:
    raise FileNotFoundError(f"{workdir}: no config.json beside the checkpoint")
  config = ml_collections.ConfigDict(restored.config)
  variables = {"params": restored.params}
  if restored.batch_stats:
    variables["batch_stats"] = restored.batch_stats
  return predictor(factory.segmentation_model(config), variables), config


def predict_canonical(predict_fn: inference.PredictFn, config: ml_collections.ConfigDict,
                      hu: np.ndarray, affine: np.ndarray, geometry: dict
                      ) -> tuple[np.ndarray, dict]:
  """Canonical HU ``(D, H, W)`` (``nifti.load_nifti_canonical`` or
  ``segdicom.load_ct_canonical``) -> (uint8 label map on the record grid,
  geometry for ``nifti.to_original_grid`` / ``save_nifti``)."""
  vol, _, geometry = segdata.preprocess(hu, affine, geometry, prep_config(config.data))
  return segment_volume(predict_fn, vol, config.eval.to_dict()), geometry


def predict_nifti(workdir: str, nifti_path: str, out_path: str,
                  prefer: str = "latest") -> str:
  """Segments a CT NIfTI (HU) with a trained run; writes the uint8 mask NIfTI
  on the input's own voxel grid and affine. Returns ``out_path``.

  Uses the run's ``config.json`` (model, spacing, HU window, sliding-window
  settings) and its best or latest checkpoint. The slab proposal is not
  applied here (its classifier is not saved with the run). DICOM input:
  ``radnet_jax.cli.predict_seg``.
  """
  predict_fn, config = load_seg_predictor(workdir, prefer)
  hu, affine, geometry = nifti.load_nifti_canonical(nifti_path)
  pred, geometry = predict_canonical(predict_fn, config, hu, affine, geometry)
  return nifti.save_nifti(pred, geometry, out_path)
