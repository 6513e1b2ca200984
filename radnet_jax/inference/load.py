"""Restore a trained network anywhere, with the preprocessing contract of its run.

``load`` reads only the parameters and batch statistics of a training
checkpoint (no optimizer state, no mesh) as plain arrays on the default
device, whatever device count or host count wrote it, rebuilds the model from
the ``config.json`` saved beside the checkpoints (``models.factory``; the one
restore path ``training.checkpoints.restore`` falls back past unreadable
steps), and reads the run's preprocessing contract (``radnet_jax.contract``: shard shape or spacing,
intensity mapping, orientation, labels). Which task the run trained
(pretraining or segmentation) is what its contract (or, for older runs, its
``config.entry``) says.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from radnet_jax import contract as contract_lib
from radnet_jax.models import factory
from radnet_jax.training import checkpoints

log = logging.getLogger("radnet_jax")


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A restored network. Unpacks as ``model, variables, config = loaded``.

  model: the Flax module (``model.apply(variables, x, train=False)``).
  variables: {"params": ..., "batch_stats": ...} as jax arrays on the default
    device (batch_stats omitted when the model has none).
  config: the run's ``ml_collections.ConfigDict``.
  path: the checkpoint's ``state`` directory that was read.
  step: the training step of that checkpoint.
  contract: the run's preprocessing contract (``radnet_jax.contract``).
  """
  model: Any
  variables: dict
  config: Any
  path: str
  step: int
  contract: contract_lib.Contract

  def __iter__(self) -> Iterator[Any]:
    return iter((self.model, self.variables, self.config))

  @property
  def task(self) -> str:
    """"pretrain" or "segment"."""
    return self.contract.task

  @property
  def taxonomy(self) -> str:
    """Label taxonomy name the heads were trained on ("paper" | "extended")."""
    return str(self.contract.taxonomy or "paper")

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """``(D, H, W)`` voxels the network was trained on."""
    return tuple(self.contract.input_shape)

  @property
  def shard_shape(self) -> tuple[int, int, int]:
    """``(D, H, W)`` voxels a volume is resampled to before the centre crop
    (pretraining networks; from the contract, never from the shards folder)."""
    shape = self.contract.shard_shape
    if shape is None:
      raise ValueError(f"{self.path}: a {self.task} network resamples to "
                       f"{self.contract.spacing_mm} mm, not to a shard shape")
    return shape

  @property
  def heads(self) -> dict[str, int]:
    """Task -> output size of the model's heads ({} for segmentation nets)."""
    return {str(k): int(v) for k, v in dict(getattr(self.model, "heads", {}) or {}).items()}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}/{k}" if prefix else str(k)))
  else:
    out[prefix] = tree
  return out


def _compare(what: str, expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
  """Human-readable differences between model (expected) and checkpoint names/shapes."""
  problems = []
  missing = sorted(set(expected) - set(found))
  extra = sorted(set(found) - set(expected))
  shapes = [f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in sorted(set(expected) & set(found))
            if tuple(found[k].shape) != tuple(expected[k].shape)]
  for title, items in (("missing from the checkpoint", missing),
                       ("in the checkpoint but not in the model", extra),
                       ("shape mismatches", shapes)):
    if items:
      more = f" (+{len(items) - 6} more)" if len(items) > 6 else ""
      problems.append(f"{len(items)} {what} {title}: {', '.join(items[:6])}{more}")
  return problems


def config_of(restored: checkpoints.Restored, config: Any) -> ml_collections.ConfigDict:
  """The run's config: ``config`` if given, else the ``config.json`` beside
  the checkpoint (an unlocked private ConfigDict either way)."""
  if config is None:
    if restored.config is None:
      raise FileNotFoundError(
          f"{restored.path}: no {checkpoints.CONFIG_FILE} found beside this checkpoint "
          f"(expected in the run workdir two levels above the step folder); pass config= "
          f"(the run's ConfigDict or a dict) to load it")
    return ml_collections.ConfigDict(restored.config)
  if isinstance(config, ml_collections.ConfigDict):
    return ml_collections.ConfigDict(config.to_dict())
  return ml_collections.ConfigDict(dict(config))


def load(path: str, *, prefer: str = "best", config: Any = None,
         dtype: str | None = None) -> Loaded:
  """Restores a trained network for inference on this machine.

  Args:
    path: a run workdir (its best checkpoint if ``prefer == "best"`` and one
      exists, else the latest), its ``checkpoints/`` or ``best/`` folder, a
      step folder (``.../checkpoints/600``) or its ``state`` folder. Local or
      any ``etils.epath`` location (``gs://bucket/run``).
    prefer: "best" or "latest" when ``path`` is a workdir.
    config: the run's config (ConfigDict or dict) when no ``config.json`` sits
      beside the checkpoint; overrides it otherwise.
    dtype: compute dtype override (e.g. "float32" to run a bfloat16-trained
      model on a CPU); parameters keep their stored dtype.
  Returns:
    ``Loaded`` (unpacks as ``model, variables, config``): parameters and batch
    statistics only (no optimizer state), as jax arrays on the default device,
    whatever the device count of the run that wrote them, and the run's
    preprocessing contract.
  Raises:
    FileNotFoundError: ``path`` holds no checkpoint (or no config, see above).
    ValueError: the checkpoint's parameters do not match the model its config
      builds (each missing / unexpected / mis-shaped name is listed).
  """
  if prefer not in ("best", "latest"):
    raise ValueError(f"prefer must be 'best' or 'latest', got {prefer!r}")
  # The one restore path: newest readable best/latest step, params and
  # batch_stats only (no optimizer state), numpy on any device count.
  restored = checkpoints.restore(str(path), prefer)
  state_dir, step = restored.path, restored.step
  config = config_of(restored, config)
  if dtype is not None:
    config.model.dtype = str(dtype)
  contract = contract_lib.load(restored.workdir, config)

  # The model its config builds, and its variable shapes (no allocation).
  try:
    model = factory.from_config(config)
  except Exception as e:
    raise ValueError(f"{state_dir}: cannot build the {contract.task} model from its config "
                     f"(model={config.get('model')}): {type(e).__name__}: {e}") from e
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, *contract.input_shape, 1)), train=False))
  found = {"params": restored.params, "batch_stats": restored.batch_stats}
  problems = []
  for c in ("params", "batch_stats"):
    problems += _compare(c, _flat(abstract.get(c, {})), _flat(found[c]))
  if problems:
    raise ValueError(
        f"{state_dir}: checkpoint does not match the model its config builds "
        f"(model.name={config.model.get('name')!r}, taxonomy="
        f"{config.get('taxonomy', '-')!r}, heads {dict(getattr(model, 'heads', {}))}):\n  "
        + "\n  ".join(problems))
  variables = jax.device_put({c: v for c, v in found.items() if v})
  log.info("loaded %s (step %d): %s, %d parameters; %s", state_dir, step,
           config.model.get("name"), sum(int(np.prod(x.shape))
                                          for x in jax.tree.leaves(variables["params"])),
           contract_lib.summary(contract))
  return Loaded(model=model, variables=variables, config=config, path=state_dir,
                step=int(step), contract=contract)


def as_loaded(checkpoint: Any, prefer: str = "best") -> Loaded:
  """A ``Loaded`` as is, or ``load(checkpoint)`` for a path."""
  return checkpoint if isinstance(checkpoint, Loaded) else load(str(checkpoint), prefer=prefer)
