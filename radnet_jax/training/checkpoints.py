"""Orbax checkpoints: resume, best-by-metric, and portable parameter restore.

Workdir layout::

  <workdir>/config.json               the run's config (ml_collections as JSON)
  <workdir>/checkpoints/<step>/state  TrainState (params, batch_stats, opt, rng)
  <workdir>/checkpoints/<step>/data   grain iterator state (one JSON per process)
  <workdir>/best/<step>/state         TrainState of the best validation step
  <workdir>/best/best.json            {"step", "metric", "value"}

``Checkpointer`` keeps the last N training checkpoints (model, optimizer,
step, RNG and data iterator: an exact resume point) and, separately, the best
one by a validation metric. ``restore(path)`` is the one way to read a run's
parameters and batch statistics (``radnet_jax.load``, the transfer,
``init_from``, segmentation prediction): plain numpy arrays on any machine
(no mesh, any device count, no optimizer state read). ``merge_params`` maps a
loaded tree onto a freshly initialised one by name and reports loaded /
missing / mismatched entries (``--config.init_from``).

Damaged checkpoints: resume and ``restore`` try the newest (or best) step
first; a step that cannot be read (a truncated data file, a missing
``_METADATA`` or OCDBT manifest) is logged with the reason and the next older
one is tried (``best`` falls back to the training checkpoints); only when no
step restores is it an error, listing each step and why.

Size (~530 lines): this is the one restore path of the project (pretraining,
segmentation, transfer and inference all go through ``restore``), kept in one
module with the writer and the fallback rules it must agree with.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import sys
from typing import Any, Mapping, Sequence

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from radnet_jax.training import distributed

log = logging.getLogger("radnet_jax")

CONFIG_FILE = "config.json"


def _orbax_path(path: str) -> str:
  """``path`` as Orbax needs it: a local path made absolute (Orbax reads a
  relative one's metadata as None), a URL (``gs://...``) unchanged."""
  return path if "://" in path else os.path.abspath(path)


def _manager(directory: str, keep: int | None, items: Sequence[str]) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                      enable_async_checkpointing=False)
  return ocp.CheckpointManager(_orbax_path(directory), options=opts,
                               item_names=tuple(items))


def _abstract(state: Any) -> Any:
  """Restore target: the shapes, dtypes and shardings of ``state``'s arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


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
    """Restores the newest readable (or exactly ``step``) checkpoint into
    ``target_state``'s shardings and sets ``data_iter``'s position.

    An unreadable step (truncated data file, missing ``_METADATA`` or OCDBT
    manifest) is logged with its reason and the next older one is tried; the
    unreadable ones newer than the restored step are renamed
    ``<step>.unreadable`` (kept for inspection, out of the way of the saves
    that will redo those steps). Raises ``UnreadableCheckpoint`` when none
    restores. Returns the state.
    """
    steps = sorted(self.latest.all_steps(), reverse=True)
    if step is not None:
      steps = [s for s in steps if s == step]
    if not steps:
      raise FileNotFoundError(f"no checkpoint{'' if step is None else f' of step {step}'} "
                              f"in {self.workdir}/checkpoints")
    abstract = _abstract(target_state)
    base = os.path.join(self.workdir, "checkpoints")

    def read(step_dir):
      check_step_files(step_dir, ("state", "data"))
      return self.latest.restore(int(os.path.basename(step_dir)), args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          data=grain.checkpoint.CheckpointRestore(data_iter)))

    out, _, restored, skipped = _try_each(
        [(os.path.join(base, str(s)), s) for s in steps], read, f"resume {self.workdir}")
    if skipped:
      self._set_aside([s for s in steps if s > restored], base)
    return out["state"]

  def _set_aside(self, steps: Sequence[int], base: str) -> None:
    if distributed.is_main_process():
      for s in steps:
        src = os.path.join(base, str(s))
        dst = f"{src}.unreadable"
        if os.path.exists(dst):
          shutil.rmtree(dst)
        os.replace(src, dst)
        log.warning("moved the unreadable checkpoint %s aside to %s", src, dst)
    distributed.barrier("checkpoints_set_aside")  # all see the same steps before reload
    self.latest.reload()

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

  def restore_best(self, target_state: Any) -> tuple[Any, int]:
    """(state, step) of the best checkpoint with ``target_state``'s shardings;
    if it is unreadable (logged with the reason), of the newest readable
    training checkpoint instead (the data iterator position is not touched)."""
    rec = self.best_record()
    if self.best is None or rec is None:
      raise FileNotFoundError(f"no best checkpoint in {self.workdir}/best")
    abstract = _abstract(target_state)
    cands = [(os.path.join(self.workdir, "best", str(rec["step"])), int(rec["step"]))]
    cands += [(os.path.join(self.workdir, "checkpoints", str(s)), s)
              for s in sorted(self.latest.all_steps(), reverse=True)]

    def read(step_dir):
      check_step_files(step_dir)
      mgr = self.best if os.path.basename(os.path.dirname(step_dir)) == "best" else self.latest
      return mgr.restore(int(os.path.basename(step_dir)), args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]

    state, _, step, _ = _try_each(cands, read, f"best checkpoint of {self.workdir}")
    return state, step

  def close(self) -> None:
    self.latest.close()
    if self.best is not None:
      self.best.close()


def save_config(workdir: str, config: Any) -> str:
  """Writes the config as JSON beside the checkpoints (process 0)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if distributed.is_main_process():
    os.makedirs(workdir, exist_ok=True)
    text = config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort") \
        else json.dumps(dict(config), indent=2, default=str)
    with open(path, "w") as f:
      f.write(text)
  return path


def _step_dirs(d: epath.Path) -> list[int]:
  return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) \
      if d.exists() else []


def _workdir_of(step_dir: epath.Path) -> str | None:
  workdir = step_dir.parent.parent
  return str(workdir) if (workdir / CONFIG_FILE).exists() else None


def candidates(path: str, prefer: str = "best", step: int | None = None
               ) -> list[tuple[str, int]]:
  """Step folders that ``path`` can restore from, in the order to try them.

  ``path`` may be a workdir, its ``checkpoints/`` or ``best/`` folder, a step
  folder or its ``state`` folder. A workdir gives its best step, then its
  training checkpoints newest first (``prefer="latest"``: the training
  checkpoints first, then best); ``best/`` falls back to the training
  checkpoints beside it. ``step`` keeps only folders of that step. Returns
  [(step folder, step)] (step -1 for a step folder not named by a number).
  """
  if prefer not in ("best", "latest"):
    raise ValueError(f"prefer must be 'best' or 'latest', got {prefer!r}")
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"checkpoint path {path} does not exist")
  if p.name == "state":
    p = p.parent
  if (p / "state").exists():  # one step folder: nothing to fall back to
    n = int(p.name) if p.name.isdigit() else -1
    if step is not None and n != step:
      raise FileNotFoundError(f"{path} is step {n}, not step {step}")
    return [(str(p), n)]
  if (p / "checkpoints").exists() or (p / "best").exists():
    order = ("best", "checkpoints") if prefer == "best" else ("checkpoints", "best")
    folders = [p / o for o in order]
  elif p.name == "best":
    folders = [p, p.parent / "checkpoints"]
  else:
    folders = [p]
  out = [(str(f / str(s)), s) for f in folders for s in reversed(_step_dirs(f))
         if step is None or s == step]
  if not out:
    what = f"no checkpoint of step {step}" if step is not None else "no checkpoint"
    raise FileNotFoundError(f"{what} found under {path} (expected a run workdir, its "
                            f"checkpoints/ or best/ folder, or a step folder)")
  return out


def resolve(path: str, prefer: str = "best") -> tuple[str, str | None, int]:
  """(state folder, workdir or None, step) of the first of ``candidates``,
  without reading it (``restore`` is the one that reads and falls back)."""
  step_dir, step = candidates(path, prefer)[0]
  return str(epath.Path(step_dir) / "state"), _workdir_of(epath.Path(step_dir)), step


# Orbax restores run on an asyncio loop; when one read fails (a truncated
# data file) the loop is closed while tensorstore still completes the other
# reads: each completion reports "RuntimeError: Event loop is closed", and each
# abandoned read coroutine an exception on garbage collection, dozens of
# tracebacks on stderr that bury the one real error (which ``restore``
# reports itself, with the step and the reason). Only that teardown noise is
# dropped; every other error reaches the previous hooks.
def _teardown_noise(exc: BaseException | None, obj: Any = None) -> bool:
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    return True
  code = getattr(obj, "cr_code", None)
  return code is not None and "orbax" in code.co_filename and (
      isinstance(exc, GeneratorExit) or isinstance(getattr(exc, "__cause__", None),
                                                   GeneratorExit))


def _quiet_restore_teardown() -> None:
  """Installs (again, if something replaced them) the two filtering hooks."""
  if not getattr(sys.excepthook, "_radnet_filter", False):
    previous_excepthook = sys.excepthook

    def excepthook(kind, value, tb):
      if not _teardown_noise(value):
        previous_excepthook(kind, value, tb)
    excepthook._radnet_filter = True  # pylint: disable=protected-access
    sys.excepthook = excepthook
  if not getattr(sys.unraisablehook, "_radnet_filter", False):
    previous_unraisablehook = sys.unraisablehook

    def unraisablehook(unraisable):
      if not _teardown_noise(unraisable.exc_value, unraisable.object):
        previous_unraisablehook(unraisable)
    unraisablehook._radnet_filter = True  # pylint: disable=protected-access
    sys.unraisablehook = unraisablehook


class _quiet_absl:  # pylint: disable=invalid-name
  """absl at ERROR inside the block: Orbax warns that item folders have no
  ``_CHECKPOINT_METADATA`` (true of every ``state`` folder, and harmless)."""

  def __enter__(self):
    self._logger = logging.getLogger("absl")
    self._level = self._logger.level
    self._logger.setLevel(logging.ERROR)

  def __exit__(self, *exc):
    self._logger.setLevel(self._level)


def check_step_files(step_dir: str, items: Sequence[str] = ("state",)) -> None:
  """Raises ``UnreadableCheckpoint`` naming the first missing file Orbax needs
  (``<item>/_METADATA``; ``manifest.ocdbt`` of an OCDBT item)."""
  d = epath.Path(step_dir)
  for item in items:
    it = d / item
    if not it.exists():
      raise UnreadableCheckpoint(step_dir, f"{item}/ is missing")
    if item == "data":
      continue  # grain iterator state: JSON files, checked by its reader
    if not (it / "_METADATA").exists():
      raise UnreadableCheckpoint(step_dir, f"{item}/_METADATA is missing (the tree of "
                                           f"array names; the save was cut short?)")
    if any(c.name.startswith("ocdbt.process_") for c in it.iterdir()) \
        and not (it / "manifest.ocdbt").exists():
      raise UnreadableCheckpoint(step_dir, f"{item}/manifest.ocdbt is missing (the "
                                           f"index of the array data files)")


class UnreadableCheckpoint(ValueError):
  """A checkpoint step that cannot be restored; ``str`` says which and why."""

  def __init__(self, step_dir: str, reason: str):
    super().__init__(f"{step_dir}: {reason}")
    self.step_dir, self.reason = step_dir, reason


def describe_error(e: BaseException) -> str:
  """One line on why Orbax / tensorstore could not read a checkpoint."""
  msg = " ".join(str(e).split())
  if "OUT_OF_RANGE" in msg or "is not valid for value of size" in msg:
    return f"a data file is truncated or damaged ({msg[:300]})"
  if isinstance(e, AttributeError) and "tree" in msg:
    return ("its metadata (the tree of array names: _METADATA, or the OCDBT index "
            "it points into) is unreadable or damaged")
  return f"{type(e).__name__}: {msg[:300]}"


def _try_each(cands: Sequence[tuple[str, int]], read, what: str
              ) -> tuple[Any, str, int, list[str]]:
  """``read(step_dir)`` on each candidate until one succeeds.

  Logs each unreadable step with its reason and the step it falls back to;
  raises ``UnreadableCheckpoint`` listing every reason when none restores.
  """
  _quiet_restore_teardown()
  failures = []
  for step_dir, step in cands:
    try:
      with _quiet_absl():
        out = read(step_dir)
    except (KeyboardInterrupt, SystemExit, MemoryError):
      raise
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types
      reason = e.reason if isinstance(e, UnreadableCheckpoint) else describe_error(e)
      failures.append(f"{step_dir}: {reason}")
      log.warning("checkpoint %s (step %d) is unreadable: %s", step_dir, step, reason)
      continue
    if failures:
      log.warning("%s: falling back to %s (step %d); %d newer/preferred step(s) "
                  "unreadable", what, step_dir, step, len(failures))
    return out, step_dir, step, failures
  raise UnreadableCheckpoint(
      cands[0][0] if cands else "?",
      f"{what}: no checkpoint restores:\n  " + "\n  ".join(failures))


@dataclasses.dataclass
class Restored:
  """Parameters of a checkpoint as plain numpy pytrees (see ``restore``).

  params / batch_stats: Flax collections ({} when the model has none);
  config: the run's ``config.json`` as a dict (None when absent); step: the
  training step; path: the ``state`` folder read; workdir: the run folder
  (None for a bare step folder); skipped: "<step folder>: reason" of each
  newer or preferred step that was unreadable.
  """
  params: dict
  batch_stats: dict
  config: dict | None
  step: int
  path: str
  workdir: str | None
  skipped: list[str] = dataclasses.field(default_factory=list)


def _read_variables(state_dir: str) -> dict:
  """params, batch_stats and step of a saved TrainState (no optimizer state),
  as numpy arrays on any device count."""
  state_dir = _orbax_path(state_dir)
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(state_dir)
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
  tree = dict(tree)
  if "params" not in tree:
    raise UnreadableCheckpoint(state_dir, f"no 'params' entry (found {sorted(tree)}); "
                                          f"not a RadNet training checkpoint?")
  item = {c: tree[c] for c in ("params", "batch_stats", "step")
          if c in tree and (c == "step" or tree[c])}  # an empty batch_stats has no arrays
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  # A partial restore reads only these entries: the optimizer state (2x the
  # parameters for Adam) is never loaded.
  return ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))


def read_config(workdir: str | None) -> dict | None:
  """A run's ``config.json`` as a dict (None without a workdir)."""
  if workdir is None:
    return None
  p = epath.Path(workdir) / CONFIG_FILE
  try:
    return json.loads(p.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{p}: not valid JSON ({e})") from e


def restore(path: str, prefer: str = "best", step: int | None = None) -> Restored:
  """THE restore path: a run's parameters as numpy arrays, on any machine.

  Args:
    path: a run workdir, its ``checkpoints/`` or ``best/`` folder, a step
      folder or its ``state`` folder; local or any ``etils.epath`` location.
    prefer: for a workdir, "best" (the best validation step, falling back to
      the training checkpoints newest first) or "latest" (training
      checkpoints newest first, then best).
    step: restore exactly this step (no fallback to other steps).
  Returns:
    ``Restored``: params, batch_stats (no optimizer state, whatever device
    count or host count wrote them), config, step.
  Raises:
    FileNotFoundError: ``path`` holds no checkpoint.
    UnreadableCheckpoint: no candidate step restores (each reason listed).
  """
  cands = candidates(path, prefer, step)

  def read(step_dir):
    check_step_files(step_dir)
    return _read_variables(str(epath.Path(step_dir) / "state"))

  tree, step_dir, n, skipped = _try_each(cands, read, f"restore {path}")
  if n < 0 and "step" in tree:
    n = int(np.asarray(tree["step"]))
  workdir = _workdir_of(epath.Path(step_dir))
  return Restored(params=tree["params"], batch_stats=tree.get("batch_stats") or {},
                  config=read_config(workdir), step=int(n),
                  path=str(epath.Path(step_dir) / "state"), workdir=workdir,
                  skipped=skipped)


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
  src = restore(path)
  params, batch_stats, step = src.params, src.batch_stats, src.step
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
