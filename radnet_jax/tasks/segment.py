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
* the source's preprocessing contract (``radnet_jax.contract``): with a
  pretraining run as ``init_from``, the trunk is fed the intensity mapping it
  was pretrained on (and its learnable input curve), and ``model.backbone``
  is the source's model (``resolve_source``); ``config.intensity_from =
  "config"`` keeps ``config.data.window`` instead, and says so in the log;
* evaluation on whole volumes with the same code as inference on new CTs
  (``radnet_jax.inference.segment``: sliding windows of the patch shape,
  largest-connected-component post-processing), optional liver-slab
  proposal (``radnet_jax.tasks.proposal``), Dice / ASSD
  (``radnet_jax.training.seg_metrics``) on the record grid; predicted masks
  written as NIfTI in each case's original geometry; ``results.json``;
* the run's contract (spacing, HU window, orientation, patch shape, labels)
  written to ``<workdir>/contract.json``: what inference reads.

Batches: ``volume`` float32 ``(B, d, h, w, 1)``, ``label`` int32
``(B, d, h, w)`` (0 background, 1 liver[, 2 tumour] per ``num_classes``).
"""
from __future__ import annotations

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

from radnet_jax import contract as contract_lib
from radnet_jax import phantom
from radnet_jax.phantom import lits as phantom_lits
from radnet_jax.data import segment as seg_input
from radnet_jax.dicom import nifti
from radnet_jax.inference import segment as seg_inference
from radnet_jax.inference import sliding_window
from radnet_jax.labels import lits
from radnet_jax.models import factory
from radnet_jax.models import vnet
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
  """Cache folder of the phantom LiTS set for ``data_cfg`` (nifti/ + shards-*).

  The phantom's version is in the name, so shards converted from an older
  LiTS phantom are never reused after the phantom changes."""
  name = (f"lits-phantom-v{phantom_lits.VERSION}-n{int(data_cfg['phantom_n'])}"
          f"-s{int(data_cfg['phantom_seed'])}")
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


# ---------------------------------------------------------------- evaluate ---
def evaluate(predict_fn: sliding_window.PredictFn, recs: Sequence[Mapping],
             roi: Sequence[int], eval_cfg: Mapping, num_classes: int, *,
             pad_value: float = 0.0, proposer=None, save_dir: str | None = None,
             overlay_dir: str | None = None) -> dict:
  """Dice/ASSD over whole volumes (record grid); optional NIfTI/overlay output.

  Sliding windows of ``roi`` (the patch shape) padded with ``pad_value``
  (``inference.segment.segment_volume``, as on new CTs).
  """
  ev = seg_metrics.SegEvaluator(classes=lits.report_classes(num_classes),
                                compute_assd=eval_cfg.get("assd", True))
  prop_rows = []
  for rec in recs:
    z = None
    if proposer is not None:
      z = proposer.propose(rec["volume"])
      prop_rows.append(proposer.score_case(z, rec["mask"]))
    pred = seg_inference.segment_volume(predict_fn, rec["volume"], tuple(roi), eval_cfg,
                                        pad_value=pad_value, z_range=z)
    ref = rec["mask"] if num_classes == 3 else seg_input.map_labels(rec["mask"], 2).astype(np.uint8)
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


def _trunk_fields(kwargs: Mapping[str, Any]) -> dict:
  return {k: v for k, v in dict(kwargs or {}).items() if k in vnet._TRUNK_FIELDS}  # pylint: disable=protected-access


def resolve_source(config: ml_collections.ConfigDict, workdir: str
                   ) -> tuple[ml_collections.ConfigDict, str]:
  """The run's effective config and its transfer source ("" = scratch).

  What the trunk was pretrained on decides what it is fed:

  * resuming (``<workdir>/contract.json`` exists): the preprocessing and
    backbone the run started with;
  * ``init_from`` a pretraining run: its contract's CT intensity mapping
    replaces ``config.data.window`` / ``out_range`` and its learnable input
    curve (``model.kwargs.input_windows``) goes in front of the trunk, unless
    ``config.intensity_from == "config"`` (logged either way); an empty
    ``model.backbone`` becomes the source's model (preset + trunk kwargs);
  * ``init_from = "medicalnet:PATH[:depth=N]"``: the backbone is the file's
    ResNet (depth, width, shortcut read from it); MedicalNet weights carry
    no contract, so ``config.data.window`` stays (logged);
  * scratch: an empty ``model.backbone`` is ``config.pretrain``'s model.
  """
  d = config.to_dict()
  model, data = d["model"], d["data"]
  knob = str(d.get("intensity_from", "source"))
  if knob not in ("source", "config"):
    raise ValueError(f"config.intensity_from must be 'source' or 'config', got {knob!r}")
  resnet = model.get("name") == "resnet_vnet"
  own = contract_lib.read(workdir)
  src = ""
  if own is not None and _checkpoints_exist(workdir):
    ct = own.intensity_for("CT")
    data["window"], data["out_range"] = list(ct.window), list(ct.out_range)
    data["spacing"] = list(own.spacing_mm)
    model.update({k: v for k, v in own.model.items() if k in ("backbone",)})
    if "input_windows" in dict(own.model.get("kwargs") or {}):
      model.setdefault("kwargs", {})["input_windows"] = own.model["kwargs"]["input_windows"]
    log.info("preprocessing: resuming with the run's own contract (%s)",
             contract_lib.summary(own))
    return ml_collections.ConfigDict(d), (resolve_init(config) if config.init_from else "")
  if config.init_from:
    src = resolve_init(config)
  source = transfer.source_contract(src) if src else None
  if source is not None and source.task == contract_lib.PRETRAIN:
    ct = source.intensity_for("CT")
    windows = dict(source.model.get("kwargs") or {}).get("input_windows") or ()
    if knob == "source":
      if ct.kind != "window":
        raise ValueError(f"{src}: source CT intensity {ct.spec} is not an HU window")
      log.info("transfer: the trunk is fed the intensities it was pretrained on: CT %s "
               "(from %s's contract) instead of config.data.window %s -> %s "
               "(--config.intensity_from=config keeps the config's)", ct.spec, src,
               tuple(data["window"]), tuple(data["out_range"]))
      data["window"], data["out_range"] = list(ct.window), list(ct.out_range)
      if windows and resnet:
        model.setdefault("kwargs", {})["input_windows"] = [list(w) for w in windows]
        log.info("transfer: with the source's learnable input curve (windows %s)",
                 [tuple(w) for w in windows])
    else:
      log.warning("transfer: config.intensity_from=config: the trunk is fed CT "
                  "ct_window(%g,%g)->[%g,%g] although %s was pretrained on %s",
                  *data["window"], *data["out_range"], src, ct.spec)
    derived = source.model.get("name")
    trunk = _trunk_fields(source.model.get("kwargs"))
    derived = {"preset": derived, **trunk} if trunk else derived
  elif src and transfer.is_medicalnet(src):
    derived = transfer.medicalnet_backbone(src)
    log.info("transfer: %s carries no preprocessing contract: the trunk is fed "
             "config.data.window ct_window(%g,%g)->[%g,%g]", src, *data["window"],
             *data["out_range"])
  else:
    pre = d.get("pretrain") or {}
    derived = (pre.get("model") or {}).get("name") or None
  if resnet:
    if not model.get("backbone"):
      if not derived:
        raise ValueError("config.model.backbone is empty and there is no transfer source "
                         "or config.pretrain to take it from")
      model["backbone"] = derived
      log.info("model: backbone %s (from %s)", derived, src or "config.pretrain")
    elif derived and model["backbone"] != derived:
      log.warning("model: config.model.backbone=%s but the source %s was trained as %s: "
                  "the transfer reports every tensor that does not fit", model["backbone"],
                  src or "config.pretrain", derived)
  return ml_collections.ConfigDict(d), src


def check_shards(manifest: Mapping[str, Any], config: ml_collections.ConfigDict,
                 shards_dir: str) -> None:
  """Raises ValueError unless the shards hold what the run's contract says
  the network is fed (spacing, HU window and range; ``resolve_source``)."""
  want = prep_config(config.data)
  built = manifest.get("config") or {}
  spacing = tuple(float(s) for s in built.get("spacing", ()))
  if manifest.get("normalisation") != want.normalisation or \
      not np.allclose(spacing, want.spacing):
    lo, hi = want.window
    a, b = want.out_range
    raise ValueError(
        f"{shards_dir}: shards built as {manifest.get('normalisation')} at {spacing} mm, "
        f"but this run feeds the network {want.normalisation} at {want.spacing} mm "
        f"(config.data, with a pretraining init_from: the source's contract). Rebuild "
        f"them (python -m data_prep.build_seg_shards ... --window={lo:g},{hi:g} "
        f"--range={a:g},{b:g} --spacing {','.join(f'{s:g}' for s in want.spacing)}) or "
        f"set --config.intensity_from=config")


def _checkpoints_exist(workdir: str) -> bool:
  """Whether ``workdir`` already holds a training checkpoint (a resume)."""
  try:
    checkpoints.resolve(workdir, "latest")
    return True
  except FileNotFoundError:
    return False


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
  config, src = resolve_source(config, workdir)
  patch = tuple(int(s) for s in config.input_shape)   # training patches = sliding windows
  pad_value = float(config.data.out_range[0])   # the intensity of air: padding

  # ------------------------------------------------------------------ mesh --
  mesh = trainer.make_mesh(config.num_devices or None)
  local_batch = distributed.check_batch(config.batch_size, mesh=mesh)

  # ------------------------------------------------------------------ data --
  shards_dir = ensure_shards(config.data)
  manifest = segdata.load_manifest(shards_dir)
  check_shards(manifest, config, shards_dir)
  train_cases = seg_input.select_cases(manifest["splits"]["train"], config.data.n_train,
                             config.data.subset_seed)
  log.info("data: %d training volume(s) of %d, %d val, %d test, from %s",
           len(train_cases), len(manifest["splits"]["train"]),
           len(manifest["splits"]["val"]), len(manifest["splits"]["test"]), shards_dir)
  aug = config.augment.to_dict() if config.augment.enabled else None
  train_ds = seg_input.train_dataset(
      shards_dir, train_cases, patch=patch, batch_size=local_batch, seed=config.seed,
      num_classes=config.num_classes, fg_prob=config.data.fg_prob, augment_cfg=aug,
      pad_value=pad_value, num_threads=config.data.threads,
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
  if distributed.is_main_process():   # what inference will prepare CTs as
    contract_lib.write(workdir, contract_lib.for_segment(config))
  val_recs = segdata.load_records(shards_dir, "val")
  ckpt = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints,
                                  best_metric="val/liver/dice_global" if val_recs else None)
  reports = []

  def init(st):  # no checkpoint in the workdir: the pretrained trunk, if any
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
    res = evaluate(seg_inference.predictor(model, st), val_recs, patch,
                   dict(eval_cfg, assd=False), config.num_classes, pad_value=pad_value)
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
    proposer = proposal.train_proposer(config, shards_dir, train_cases, src, workdir)
  test_recs = segdata.load_records(shards_dir, "test")
  results = {"checkpoint": which, "shards_dir": shards_dir, "n_train": len(train_cases),
             "train_cases": train_cases, "init_from": config.init_from,
             "transfer": report.summary() if report else "scratch",
             "num_steps": total_steps, "train_seconds": train_s}
  for split, recs in (("test", test_recs), ("val", val_recs)):
    if not recs:
      continue
    out = evaluate(seg_inference.predictor(model, state), recs, patch, eval_cfg,
                   config.num_classes, pad_value=pad_value, proposer=proposer,
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
