"""The preprocessing contract of a trained network: what its input must be.

A network only works on inputs prepared exactly as its training data was:
resampled the same way to the same grid, the same intensity mapping, the same
canonical orientation, the same labels. Training writes all of it into
``<workdir>/contract.json`` when a run starts (``write``), and every reader of
a checkpoint (``radnet_jax.load`` / ``predict`` / ``embed``, the transfer of a
pretrained trunk, segmentation inference) takes it from there (``load``) and
nowhere else: not from the training shards' ``manifest.json`` (the shards may
be gone: a checkpoint copied to Colab) and not from ``config.data`` (the paper
config says ``52,208,208`` while its shards may have been built at another
shape). A workdir written before contracts existed gets one derived once from
its config and, when still readable, its shards' manifest, with a warning.

Fields (``Contract``):

==============  ==============================================================
task            "pretrain" (multi-task ResNet3D) or "segment" (liver VNet)
input_shape     ``(D, H, W)`` voxels the network takes (pretraining input /
                segmentation patch and sliding-window size)
resampling      {"to": "shape", "shape": [D, H, W]} (pretraining: the whole
                volume onto the shard grid) or {"to": "spacing",
                "spacing_mm": [d, h, w]} (segmentation); ``method`` names the
                resampler (``radnet_jax.resample``, extent preserving)
intensity       modality ("CT", "other") -> ``Intensity``: an HU window mapped
                linearly onto ``out_range`` (clipped), or robust percentiles
                mapped onto ``out_range``
orientation     "plane" (``dicom.geometry.reorient``: each acquisition plane's
                canonical voxel order) or "axial-IPL" (``dicom.nifti``: D
                inferior, H posterior, W left)
model           {"name", "kwargs"} of the trained network (the transfer
                derives its backbone and input curve from it)
taxonomy        label taxonomy of the pretraining heads, ``classes`` per task
labels          segmentation label vocabulary {value: name}, ``num_classes``
==============  ==============================================================

This module imports no jax: the lowest layer that both training tasks and
inference may import.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping, Sequence

import ml_collections
from etils import epath

from radnet_jax import resample
from radnet_jax.labels import lits
from radnet_jax.labels import taxonomy as tax
from radnet_jax.shards import records

log = logging.getLogger("radnet_jax")

CONTRACT_FILE = "contract.json"
VERSION = 1
PRETRAIN, SEGMENT = "pretrain", "segment"
ENTRIES = {PRETRAIN: "radnet_jax.tasks.pretrain", SEGMENT: "radnet_jax.tasks.segment"}
ORIENT_PLANE, ORIENT_AXIAL = "plane", "axial-IPL"
RESAMPLER = "radnet_jax.resample: separable linear, anti-aliased, extent preserving"


@dataclasses.dataclass(frozen=True)
class Intensity:
  """One modality's intensity mapping.

  kind: "window" (values clipped to [lo, hi], e.g. HU, mapped linearly onto
    ``out_range``) or "percentile" (the volume's lo-th and hi-th percentiles
    mapped onto ``out_range``, clipped).
  """
  kind: str
  lo: float
  hi: float
  out_range: tuple[float, float]

  def __post_init__(self):
    if self.kind not in ("window", "percentile"):
      raise ValueError(f"intensity kind must be 'window' or 'percentile', got {self.kind!r}")
    if not float(self.hi) > float(self.lo):
      raise ValueError(f"intensity mapping needs hi > lo, got ({self.lo}, {self.hi})")

  @property
  def window(self) -> tuple[float, float]:
    return float(self.lo), float(self.hi)

  @property
  def spec(self) -> str:
    """The normalisation string of records and manifests."""
    a, b = self.out_range
    name = "ct_window" if self.kind == "window" else "pct"
    return f"{name}({self.lo:g},{self.hi:g})->[{a:g},{b:g}]"

  def to_dict(self) -> dict:
    return {"kind": self.kind, "lo": float(self.lo), "hi": float(self.hi),
            "out_range": [float(v) for v in self.out_range], "spec": self.spec}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Intensity":
    return cls(str(d["kind"]), float(d["lo"]), float(d["hi"]),
               tuple(float(v) for v in d["out_range"]))


# What the shard converter does today (radnet_jax.resample.normalise).
SHARD_INTENSITY = {
    "CT": Intensity("window", *resample.CT_WINDOW, (-1.0, 1.0)),
    "other": Intensity("percentile", *resample.PERCENTILES, (0.0, 1.0)),
}


@dataclasses.dataclass(frozen=True)
class Contract:
  """The input contract of one trained network (see the module docstring)."""
  task: str
  input_shape: tuple[int, int, int]
  resampling: Mapping[str, Any]
  intensity: Mapping[str, Intensity]
  orientation: str
  model: Mapping[str, Any]
  taxonomy: str | None = None
  classes: Mapping[str, Sequence[str]] | None = None
  labels: Mapping[str, str] | None = None
  num_classes: int | None = None
  origin: str = "training"

  def __post_init__(self):
    if self.task not in ENTRIES:
      raise ValueError(f"contract task must be one of {sorted(ENTRIES)}, got {self.task!r}")

  @property
  def entry(self) -> str:
    return ENTRIES[self.task]

  @property
  def shard_shape(self) -> tuple[int, int, int] | None:
    """``(D, H, W)`` a whole volume is resampled to (pretraining), else None."""
    shape = self.resampling.get("shape")
    return tuple(int(s) for s in shape) if shape else None

  @property
  def spacing_mm(self) -> tuple[float, float, float] | None:
    """Voxel size in mm of the resampled grid (segmentation), else None."""
    sp = self.resampling.get("spacing_mm")
    return tuple(float(s) for s in sp) if sp else None

  def intensity_for(self, modality: str | None) -> Intensity:
    key = "CT" if (modality or "").upper() == "CT" else "other"
    if key not in self.intensity:
      raise ValueError(f"the network was trained on {sorted(self.intensity)} intensities "
                       f"only, not on {modality or 'unknown'} input")
    return self.intensity[key]

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["version"] = VERSION
    d["input_shape"] = list(self.input_shape)
    d["intensity"] = {k: v.to_dict() for k, v in self.intensity.items()}
    d["resampling"] = dict(self.resampling)
    d["model"] = _jsonable(self.model)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Contract":
    if int(d.get("version", VERSION)) > VERSION:
      raise ValueError(f"contract version {d['version']} is newer than this radnet_jax "
                       f"understands ({VERSION})")
    return cls(task=str(d["task"]), input_shape=tuple(int(s) for s in d["input_shape"]),
               resampling=dict(d["resampling"]),
               intensity={k: Intensity.from_dict(v) for k, v in d["intensity"].items()},
               orientation=str(d["orientation"]), model=dict(d.get("model") or {}),
               taxonomy=d.get("taxonomy"), classes=d.get("classes"), labels=d.get("labels"),
               num_classes=d.get("num_classes"), origin=str(d.get("origin", "training")))


def _jsonable(v: Any) -> Any:
  if hasattr(v, "to_dict"):
    v = v.to_dict()
  if isinstance(v, Mapping):
    return {str(k): _jsonable(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_jsonable(x) for x in v]
  return v


def _get(config: Any, key: str, default: Any = None) -> Any:
  return config.get(key, default) if hasattr(config, "get") else default


def task_of(config: Any) -> str:
  """The task a run's config trains, from ``config.entry`` (default pretraining)."""
  entry = str(_get(config, "entry") or ENTRIES[PRETRAIN])
  for task, e in ENTRIES.items():
    if entry == e:
      return task
  raise ValueError(f"config.entry {entry!r} is not a known task ({sorted(ENTRIES.values())})")


def _model(config: Any) -> dict:
  m = _get(config, "model") or {}
  out = {"name": str(_get(m, "name", "")), "kwargs": _jsonable(_get(m, "kwargs") or {})}
  if _get(m, "backbone"):
    out["backbone"] = _jsonable(_get(m, "backbone"))
  return out


def for_pretrain(config: Any, manifest: Mapping[str, Any] | None = None,
                 origin: str = "training") -> Contract:
  """The contract of a pretraining run on shards described by ``manifest``.

  The shard shape and taxonomy come from the manifest (what the shards
  really hold), else from ``config.data.shard_shape`` / ``config.taxonomy``.
  Raises ValueError when the shards' normalisation is not the one this code
  applies to new inputs (``radnet_jax.resample.normalise``).
  """
  data = _get(config, "data") or {}
  input_shape = tuple(int(s) for s in config.input_shape)
  shape = (manifest or {}).get("shape") or _get(data, "shard_shape") or input_shape
  taxonomy = str((manifest or {}).get("taxonomy") or _get(config, "taxonomy", "paper"))
  if manifest and manifest.get("normalisation"):
    norm = manifest["normalisation"]
    want = {"CT": SHARD_INTENSITY["CT"].spec, "other": SHARD_INTENSITY["other"].spec}
    got = {k: norm.get(k) for k in want}
    if got != want:
      raise ValueError(f"the shards were normalised as {got}, but inputs are prepared as "
                       f"{want} (radnet_jax.resample): rebuild the shards")
  t = tax.Taxonomy(taxonomy)
  return Contract(
      task=PRETRAIN, input_shape=input_shape,
      resampling={"to": "shape", "shape": [int(s) for s in shape], "method": RESAMPLER},
      intensity=dict(SHARD_INTENSITY), orientation=ORIENT_PLANE, model=_model(config),
      taxonomy=taxonomy,
      classes={k: list(t.classes(k)) for k in tax.CLASSIFICATION_TASKS}
      | {"coverage": list(tax.COVERAGE_BANDS)},
      origin=origin)


def for_segment(config: Any, origin: str = "training") -> Contract:
  """The contract of a segmentation run: ``config.data`` spacing and HU
  window (as the run resolved them, see ``tasks.segment``), the input
  (patch and sliding-window) shape, the LiTS labels of ``config.num_classes``."""
  data = config.data
  n = int(config.num_classes)
  ct = Intensity("window", float(data.window[0]), float(data.window[1]),
                 tuple(float(v) for v in data.out_range))
  return Contract(
      # patch_shape: the name in configs written before input_shape was the one name.
      task=SEGMENT, input_shape=tuple(int(s) for s in (_get(config, "input_shape")
                                                       or config.patch_shape)),
      resampling={"to": "spacing", "spacing_mm": [float(s) for s in data.spacing],
                  "method": RESAMPLER},
      intensity={"CT": ct}, orientation=ORIENT_AXIAL, model=_model(config),
      labels=lits.vocabulary(n), num_classes=n, origin=origin)


def for_config(config: Any, manifest: Mapping[str, Any] | None = None,
               origin: str = "training") -> Contract:
  """``for_pretrain`` or ``for_segment``, by the config's task."""
  if task_of(config) == SEGMENT:
    return for_segment(config, origin)
  return for_pretrain(config, manifest, origin)


def path(workdir: str) -> epath.Path:
  return epath.Path(workdir) / CONTRACT_FILE


def write(workdir: str, contract: Contract) -> str:
  """Writes ``<workdir>/contract.json`` atomically; returns its path.

  A run that resumes rewrites the same contract; one whose preprocessing
  changed against the contract its checkpoints were trained with raises
  (they would be read with the wrong preprocessing).
  """
  p = path(workdir)
  old = read(workdir) if _has_checkpoints(workdir) else None
  if old is not None and old.origin == "training":
    a, b = old.to_dict(), contract.to_dict()
    diff = sorted(k for k in a if k not in ("model",) and a[k] != b.get(k))
    if diff:
      raise ValueError(f"{p}: this run's preprocessing differs from the contract its "
                       f"checkpoints were trained with ({', '.join(diff)}); use a new "
                       f"workdir")
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.parent / (CONTRACT_FILE + ".tmp")
  tmp.write_text(json.dumps(contract.to_dict(), indent=1, sort_keys=True))
  if os.path.exists(str(tmp)):
    os.replace(str(tmp), str(p))
  else:  # remote storage: no atomic rename
    tmp.rename(p)
  return str(p)


def _has_checkpoints(workdir: str) -> bool:
  d = epath.Path(workdir) / "checkpoints"
  return d.exists() and any(c.name.isdigit() for c in d.iterdir())


def read(workdir: str) -> Contract | None:
  """The contract written into ``workdir``, or None when there is none."""
  p = path(workdir)
  if not p.exists():
    return None
  try:
    return Contract.from_dict(json.loads(p.read_text()))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{p}: not a valid preprocessing contract ({type(e).__name__}: {e})") \
        from e


def derive(config: Any, where: str = "") -> Contract:
  """A contract for a workdir written before contracts existed: from its
  config (a ConfigDict or the ``config.json`` dict) and, when still
  readable, its training shards' manifest (logged)."""
  if not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(dict(config))
  manifest = None
  shards_dir = _get(_get(config, "data") or {}, "shards_dir")
  if task_of(config) == PRETRAIN and shards_dir:
    try:
      manifest = records.read_manifest(shards_dir)
    except (OSError, ValueError) as e:  # gone or unreadable: the config says the rest
      log.info("%s: shards manifest not readable (%s)", where, e)
  c = for_config(config, manifest, origin="derived from config.json"
                 + (" + shards manifest" if manifest else "") + " (no contract.json)")
  log.warning("%s: no %s (written before preprocessing contracts): derived from its "
              "config%s: %s", where or "workdir", CONTRACT_FILE,
              " and the shards' manifest" if manifest else "", summary(c))
  return c


def load(workdir: str | None, config: Any) -> Contract:
  """The contract of a workdir (``read``), else ``derive``d from ``config``."""
  c = read(workdir) if workdir else None
  return c if c is not None else derive(config, workdir or "checkpoint")


def summary(c: Contract) -> str:
  """One line: task, input, resampling, intensities, orientation."""
  res = (f"resampled to {'x'.join(str(s) for s in c.shard_shape)} voxels" if c.shard_shape
         else f"resampled to {'x'.join(f'{s:g}' for s in c.spacing_mm)} mm")
  inten = ", ".join(f"{k} {v.spec}" for k, v in c.intensity.items())
  return (f"{c.task}: input {'x'.join(str(s) for s in c.input_shape)}, {res}, {inten}, "
          f"orientation {c.orientation}")
