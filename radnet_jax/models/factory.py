"""The one place a model is built from a run's config.

Every network this project trains or restores is built here, so training,
``radnet_jax.load`` and the transfer always agree on what a config means:

* ``from_config(config)``: the network a run's config trains (``config.entry``
  names the task: pretraining by default, ``radnet_jax.tasks.segment`` for the
  segmentation transfer). ``radnet_jax.load`` rebuilds a saved run with it.
* ``pretrain_model(config)``: ResNet3D (a preset named by ``model.name``, or
  ``"package.module:Factory"`` for a custom model with the same contract) with
  one head per task of ``config.loss.weights`` that has a positive weight.
* ``segmentation_model(config)``: ``ResNetVNet`` (encoder = the ResNet3D preset
  ``model.backbone``, the one pretraining used) or the classic ``VNet``.
* ``slab_classifier(config)``: the liver-slab proposal network, the
  ``model.backbone`` (a preset, or {"preset", **trunk kwargs}) with one
  ``liver`` logit.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

import jax.numpy as jnp
from flax.core import FrozenDict

from radnet_jax.labels import taxonomy as tax
from radnet_jax.models import resnet3d
from radnet_jax.models import vnet

PRETRAIN = "pretrain"
SEGMENT = "segment"
# config.entry -> kind of network it trains.
_ENTRY_KINDS = {"radnet_jax.tasks.pretrain": PRETRAIN, "radnet_jax.tasks.segment": SEGMENT}
SEGMENTATION_MODELS = ("resnet_vnet", "vnet")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def _kwargs(model_cfg: Any) -> dict:
  kw = _get(model_cfg, "kwargs") or {}
  return dict(kw.to_dict() if hasattr(kw, "to_dict") else kw)


def _dtype(model_cfg: Any) -> Any:
  return jnp.dtype(_get(model_cfg, "dtype") or "float32")


def kind(config: Any) -> str:
  """"pretrain" or "segment": what kind of network ``config`` trains."""
  entry = str(_get(config, "entry") or "radnet_jax.tasks.pretrain")
  if entry in _ENTRY_KINDS:
    return _ENTRY_KINDS[entry]
  # Configs written before the layout move name the old flat modules.
  short = entry.rsplit(".", 1)[-1]
  if short in ("train", "pretrain"):
    return PRETRAIN
  if short == "segment":
    return SEGMENT
  raise ValueError(f"config.entry {entry!r} is not a known task "
                   f"({', '.join(sorted(_ENTRY_KINDS))})")


def classifier(name: str, heads: Mapping[str, int], dtype: Any = jnp.float32,
               **kwargs: Any) -> Any:
  """A ResNet3D preset by ``name`` ("resnet_tiny", "resnet18", ...), or a
  custom ``"package.module:Factory"`` called as ``Factory(heads=, dtype=, **kwargs)``."""
  if ":" in name:
    mod, attr = name.split(":", 1)
    return getattr(importlib.import_module(mod), attr)(heads=heads, dtype=dtype, **kwargs)
  return resnet3d.get_model(name, heads=heads, dtype=dtype, **kwargs)


def pretrain_heads(config: Any, taxonomy: tax.Taxonomy | None = None) -> dict[str, int]:
  """Task -> output size, for the tasks with a positive loss weight."""
  taxonomy = taxonomy or tax.Taxonomy(str(_get(config, "taxonomy") or "paper"))
  weights = config.loss.weights
  return {t: taxonomy.num_classes[t] for t in tax.TASKS if float(weights.get(t, 0.0)) > 0}


def pretrain_model(config: Any, taxonomy: tax.Taxonomy | None = None) -> Any:
  """The multi-task pretraining network of ``config`` (see the module doc)."""
  m = config.model
  return classifier(str(m.name), pretrain_heads(config, taxonomy), _dtype(m), **_kwargs(m))


def segmentation_model(config: Any) -> Any:
  """The segmentation network of ``config`` (``model.name``: resnet_vnet | vnet)."""
  m = config.model
  name = str(m.name)
  if name == "resnet_vnet":
    return vnet.ResNetVNet(trunk=m.backbone, out_channels=int(config.num_classes),
                           dtype=_dtype(m), **_kwargs(m))
  if name == "vnet":
    return vnet.VNet(out_channels=int(config.num_classes), dtype=_dtype(m), **_kwargs(m))
  raise ValueError(f"unknown segmentation model {name!r} ({' | '.join(SEGMENTATION_MODELS)})")


def slab_classifier(config: Any) -> Any:
  """The proposal's slab classifier: ``model.backbone`` with one ``liver`` logit.

  It takes the segmentation trunk's convolution lowering (``conv_impl``) and
  nothing else from ``model.kwargs`` (the decoder's options do not apply).
  """
  kw = {k: v for k, v in _kwargs(config.model).items() if k in ("conv_impl",)}
  # A preset name, or {"preset": name, **trunk kwargs} (MedicalNet weights, a
  # paper stem: tasks/segment.resolve_source derives it from the source).
  backbone = config.model.backbone
  backbone = {"preset": backbone} if isinstance(backbone, str) else dict(backbone)
  return resnet3d.get_model(str(backbone.pop("preset")), heads=FrozenDict({"liver": 1}),
                            **backbone, **kw)


def from_config(config: Any) -> Any:
  """The network that a run's config trains (``config.entry`` picks the task)."""
  if kind(config) == SEGMENT:
    return segmentation_model(config)
  return pretrain_model(config)
