"""Orbax checkpoints: resume, best-by-metric, and portable parameter restore.

Workdir layout::

  <workdir>/config.json               the run's config (ml_collections as JSON)
  <workdir>/checkpoints/<step>/state  TrainState (params, batch_stats, opt, rng)
  <workdir>/checkpoints/<step>/data   grain iterator state (one JSON per process)
  <workdir>/best/<step>/state         TrainState of the best validation step
  <workdir>/best/best.json            {"step", "metric", "value"}

``Checkpointer`` keeps the last N training checkpoints (model, optimizer,
step, RNG and data iterator: an exact resume point) and, separately, the best
one by a validation metric. ``restore_params(path)`` reads parameters and
batch statistics into plain numpy arrays on any machine (no mesh, any device
count, no optimizer needed). ``merge_params`` maps a loaded tree onto a
freshly initialised one by name and reports loaded / missing / mismatched
entries (``--config.init_from``).
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Mapping, Sequence

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger("radnet_jax")

CONFIG_FILE = "config.json"


def _manager(directory: str, keep: int | None, items: Sequence[str]) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                      enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=opts,
                               item_names=tuple(items))


class Checkpointer:
  """Last-N resumable checkpoints plus the best one by a validation metric.

  Args:
    workdir: run directory.
    keep: how many recent training checkpoints to keep.
    best_metric: name of the validation metric that selects the best
      checkpoint (e.g. "val/mean_accuracy"); None disables best tracking.
    best_mode: "max" or "min".
  """

  def __init__(self, workdir: str, keep: int = 2, best_metric: str | None = None,
               best_mode: str = "max"):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    self.workdir = workdir
    self.latest = _manager(os.path.join(workdir, "checkpoints"), keep, ("state", "data"))
    self.best_metric, self.best_mode = best_metric, best_mode
    self._best_path = os.path.join(workdir, "best", "best.json")
    self.best = _manager(os.path.join(workdir, "best"), 1, ("state",)) if best_metric else None

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, step: int, state: Any, data_iter: Any) -> None:
    """Saves state + data iterator state at ``step`` (blocking)."""
    args = {"state": ocp.args.StandardSave(state)}
    args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self.latest.save(int(step), args=ocp.args.Composite(**args), force=True)
    self.latest.wait_until_finished()

  def restore(self, target_state: Any, data_iter: Any, step: int | None = None) -> Any:
    """Restores the latest (or ``step``) checkpoint into ``target_state``'s
    shardings and sets ``data_iter``'s position; returns the state."""
    step = self.latest.latest_step() if step is None else step
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target_state)
    out = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        data=grain.checkpoint.CheckpointRestore(data_iter)))
    return out["state"]

  def best_record(self) -> dict | None:
    if not os.path.exists(self._best_path):
      return None
    with open(self._best_path) as f:
      return json.load(f)

  def maybe_save_best(self, step: int, state: Any, metrics: Mapping[str, float]) -> bool:
    """Saves ``state`` as best if ``metrics[best_metric]`` improved."""
    if self.best is None:
      return False
    if self.best_metric not in metrics:
      raise KeyError(f"best-checkpoint metric {self.best_metric!r} not among the "
                     f"validation metrics {sorted(metrics)}")
    value = float(metrics[self.best_metric])
    prev = self.best_record()
    if value != value:  # NaN never wins
      return False
    if prev is not None and prev["value"] is not None:
      better = value > prev["value"] if self.best_mode == "max" else value < prev["value"]
      if not better:
        return False
    self.best.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                   force=True)
    self.best.wait_until_finished()
    with open(self._best_path, "w") as f:
      json.dump({"step": int(step), "metric": self.best_metric, "value": value}, f)
    return True

  def restore_best(self, target_state: Any) -> Any:
    """The best checkpoint's state, with ``target_state``'s shardings."""
    rec = self.best_record()
    if self.best is None or rec is None:
      raise FileNotFoundError(f"no best checkpoint in {self.workdir}/best")
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target_state)
    return self.best.restore(rec["step"], args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]

  def close(self) -> None:
    self.latest.close()
    if self.best is not None:
      self.best.close()


def save_config(workdir: str, config: Any) -> str:
  """Writes the config as JSON beside the checkpoints (process 0)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    text = config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort") \
        else json.dumps(dict(config), indent=2, default=str)
    with open(path, "w") as f:
      f.write(text)
  return path


def _step_dirs(d: epath.Path) -> list[int]:
  return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) \
      if d.exists() else []


def resolve(path: str, prefer: str = "best") -> tuple[str, str | None, int]:
  """Finds the ``state`` item directory of a checkpoint.

  ``path`` may be a workdir (the best checkpoint if ``prefer == "best"`` and
  one exists, else the latest), a ``checkpoints/`` or ``best/`` directory
  (latest step in it), a step directory, or a ``state`` directory.
  Returns (state_dir, workdir or None, step).
  """
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"checkpoint path {path} does not exist")
  if p.name == "state":
    p = p.parent
  if (p / "state").exists():
    step = int(p.name) if p.name.isdigit() else -1
    workdir = p.parent.parent
    return str(p / "state"), str(workdir) if (workdir / CONFIG_FILE).exists() else None, step
  candidates = []
  if (p / "checkpoints").exists() or (p / "best").exists():
    order = ("best", "checkpoints") if prefer == "best" else ("checkpoints", "best")
    candidates = [p / o for o in order]
  else:
    candidates = [p]
  for c in candidates:
    steps = _step_dirs(c)
    if steps:
      return resolve(str(c / str(steps[-1])), prefer)
  raise FileNotFoundError(f"no checkpoint found under {path} (expected a run workdir, "
                          f"its checkpoints/ or best/ folder, or a step folder)")


def restore_state_tree(state_dir: str) -> dict:
  """Reads a saved TrainState as a nested dict of numpy arrays (any device count)."""
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(state_dir)
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def restore_params(path: str, prefer: str = "best") -> tuple[dict, dict, dict | None, int]:
  """Loads parameters without the optimizer, onto any machine.

  Args:
    path: a run workdir or a checkpoint directory (see ``resolve``).
    prefer: "best" or "latest" when ``path`` is a workdir.
  Returns:
    (params, batch_stats, config dict from ``config.json`` or None, step);
    arrays are plain numpy.
  """
  state_dir, workdir, step = resolve(path, prefer)
  tree = restore_state_tree(state_dir)
  config = None
  if workdir is not None:
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
      config = json.load(f)
  if step < 0 and "step" in tree:
    step = int(np.asarray(tree["step"]))
  return tree["params"], tree.get("batch_stats") or {}, config, int(step)


def _flatten(tree: Mapping, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(_flatten(v, name))
    else:
      out[name] = v
  return out


def _unflatten_like(template: Any, flat: Mapping, prefix: str = "") -> Any:
  if isinstance(template, Mapping):
    return {k: _unflatten_like(v, flat, f"{prefix}/{k}" if prefix else str(k))
            for k, v in template.items()}
  return flat[prefix]


def merge_params(init: Mapping, loaded: Mapping, skip: Sequence[str] = ()
                 ) -> tuple[dict, dict]:
  """Copies ``loaded`` entries into ``init`` by '/'-joined name.

  Names matching any regex in ``skip`` (e.g. ``"heads/.*"``) stay at their
  initial values. Returns (merged tree, report) with report lists
  ``loaded``, ``missing`` (in init, not in the checkpoint or skipped),
  ``mismatched`` ("name: ckpt shape vs model shape") and ``unused``.
  """
  fi, fl = _flatten(init), _flatten(loaded)
  pats = [re.compile(s) for s in skip]
  report = {"loaded": [], "missing": [], "mismatched": [], "unused": []}
  merged = {}
  for name, v in fi.items():
    src = fl.get(name)
    if src is None or any(p.fullmatch(name) for p in pats):
      report["missing"].append(name)
      merged[name] = v
    elif tuple(np.shape(src)) != tuple(np.shape(v)):
      report["mismatched"].append(f"{name}: {np.shape(src)} vs {np.shape(v)}")
      merged[name] = v
    else:
      merged[name] = np.asarray(src, dtype=np.asarray(v).dtype) if not hasattr(v, "sharding") \
          else jax.device_put(np.asarray(src, dtype=v.dtype), v.sharding)
      report["loaded"].append(name)
  report["unused"] = sorted(set(fl) - set(fi))
  return _unflatten_like(init, merged), report


def init_from(state: Any, path: str, skip: Sequence[str] = ()) -> tuple[Any, dict]:
  """Starts ``state`` (a TrainState) from another checkpoint's params/batch_stats.

  Mapped by name (``merge_params``); the optimizer, step and RNG stay fresh.
  Logs counts and every missing / mismatched name (never dropped silently).
  """
  params, batch_stats, _, step = restore_params(path)
  new_p, rep = merge_params(state.params, params, skip)
  new_bs, rep_bs = merge_params(state.batch_stats, batch_stats, skip) \
      if jax.tree.leaves(state.batch_stats) else (state.batch_stats, None)
  log.info("init_from %s (step %d): loaded %d params, %d missing (left at init), "
           "%d shape mismatches, %d unused in checkpoint", path, step,
           len(rep["loaded"]), len(rep["missing"]), len(rep["mismatched"]),
           len(rep["unused"]))
  for name in rep["missing"]:
    log.info("  missing: %s", name)
  for name in rep["mismatched"]:
    log.warning("  shape mismatch (left at init): %s", name)
  if rep_bs is not None:
    rep["batch_stats_loaded"] = len(rep_bs["loaded"])
  return state.replace(params=new_p, batch_stats=new_bs), rep
