"""Transfer of a pretrained ResNet3D trunk into a segmentation network.

The pretraining model (``ResNet3D``) keeps its encoder in ONE submodule named
``trunk``; ``vnet.ResNetVNet`` uses the same submodule name and parameter
names, so transfer is pytree surgery by name (``checkpoints.merge_params``):

* ``params['trunk']`` and ``batch_stats['trunk']`` of the checkpoint are copied
  into the segmentation model's ``trunk``;
* every other tensor (the decoder, the output conv) stays at its random init;
* a name in both with a different shape is reported and left at init, never
  dropped silently; a checkpoint that loads nothing raises.

Besides the trunk, the learnable input curve ``input_windows`` (pretraining's
soft-tissue window, ``models/intensity.py``) is copied when both networks
have one, so the trunk sees what it was trained on.

Sources: a pretraining workdir or checkpoint directory (``checkpoints.restore``
reads its best, else newest readable, step), or ``medicalnet:PATH[:depth=N]`` for Tencent
MedicalNet PyTorch weights (``radnet_jax.models.medicalnet.load_source``:
the depth, width and shortcut type are read from the file). What a source
was trained on is its preprocessing contract (``source_contract``): the
segmentation task feeds the trunk the source's intensity mapping and builds
its backbone from the source's model (``radnet_jax.tasks.segment``).

Freezing: ``freeze_for_steps(tx, params, k, patterns)`` zeroes the gradients
and updates of the matching parameters (default: the encoder) for the first
``k`` optimizer steps, so the random decoder settles before it can push
large gradients into the pretrained features.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from radnet_jax import contract as contract_lib
from radnet_jax.models import medicalnet
from radnet_jax.training import checkpoints

log = logging.getLogger("radnet_jax")

MEDICALNET_PREFIX = medicalnet.PREFIX
# Subtrees copied from the source: the encoder, and the input curve in front of it.
TRANSFERRED = ("trunk", "input_windows")


@dataclasses.dataclass
class TransferReport:
  """What a transfer did, by '/'-joined parameter name.

  loaded: copied from the checkpoint; random: left at init (not in the
  checkpoint's trunk: decoder, output head); mismatched: "name: ckpt shape vs
  model shape", left at init; unused: checkpoint trunk tensors the model has
  no slot for; batch_stats_loaded: count of BatchNorm statistics copied.
  """
  source: str
  step: int
  loaded: list[str]
  random: list[str]
  mismatched: list[str]
  unused: list[str]
  batch_stats_loaded: int = 0
  batch_stats_random: int = 0

  def summary(self) -> str:
    return (f"transfer from {self.source} (step {self.step}): {len(self.loaded)} "
            f"tensors loaded, {len(self.random)} random, {len(self.mismatched)} "
            f"shape mismatches, {len(self.unused)} unused; batch_stats "
            f"{self.batch_stats_loaded} loaded, {self.batch_stats_random} fresh")

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def is_medicalnet(source: str) -> bool:
  return str(source).startswith(MEDICALNET_PREFIX)


def load_source(path: str) -> tuple[dict, dict, int]:
  """(params, batch_stats, step) of a pretraining run, as numpy pytrees.

  ``path``: a workdir / checkpoint directory, or ``medicalnet:WEIGHTS[:depth=N]``.
  """
  if is_medicalnet(path):
    variables, info, report = medicalnet.load_source(path)
    log.info("%s: MedicalNet ResNet-%d (%s blocks, shortcut %s, width %d); %s", path,
             info["depth"], info["block"], info["shortcut_type"], info["num_filters"],
             report.summary().splitlines()[0])
    to_np = lambda t: jax.tree.map(np.asarray, jax.device_get(t))
    return to_np(variables["params"]), to_np(variables.get("batch_stats", {})), 0
  restored = checkpoints.restore(path)
  return restored.params, restored.batch_stats, restored.step


def source_contract(source: str) -> contract_lib.Contract | None:
  """The preprocessing contract of a transfer source: the ``contract.json``
  of its workdir, else derived from its ``config.json`` (logged); None for
  MedicalNet weights and for checkpoints without a config (nothing says
  what they were trained on)."""
  if is_medicalnet(source):
    return None
  _, workdir, _ = checkpoints.resolve(source)
  if workdir is None:
    log.warning("%s: no config.json beside the checkpoint: its preprocessing is unknown",
                source)
    return None
  c = contract_lib.read(workdir)
  return c if c is not None else contract_lib.derive(checkpoints.read_config(workdir), workdir)


def medicalnet_backbone(source: str) -> dict:
  """``model.backbone`` (ResNetVNet trunk spec) of MedicalNet weights, from the file."""
  path, _ = medicalnet.parse_source(source)
  return medicalnet.trunk_spec(medicalnet.describe(medicalnet.read_state_dict(path), path))


def transfer_variables(params: Mapping, batch_stats: Mapping, source: str,
                       src_prefix: str = "trunk", dst_prefix: str = "trunk",
                       strict: bool = True) -> tuple[dict, dict, TransferReport]:
  """Copies the checkpoint's ``src_prefix`` subtree into ``dst_prefix``.

  Args:
    params, batch_stats: the freshly initialised segmentation variables
      (numpy or jax arrays; sharded arrays keep their sharding).
    source: see ``load_source``.
    strict: raise if no tensor loads (wrong checkpoint or layout).
  Returns:
    (params, batch_stats, report).
  """
  ck_p, ck_bs, step = load_source(source)
  if src_prefix not in ck_p:
    raise ValueError(f"{source}: checkpoint has no '{src_prefix}' parameters "
                     f"(top-level keys: {sorted(ck_p)})")
  sub_p = {dst_prefix: ck_p[src_prefix]}
  # The input curve in front of the trunk travels with it when both nets have one.
  extra = [k for k in TRANSFERRED if k not in (src_prefix, dst_prefix)
           and k in ck_p and k in params]
  sub_p.update({k: ck_p[k] for k in extra})
  new_p, rep = checkpoints.merge_params(params, sub_p)
  bs_loaded = bs_random = 0
  new_bs = batch_stats
  if jax.tree.leaves(batch_stats):
    sub_bs = {dst_prefix: ck_bs.get(src_prefix, {})} if ck_bs else {}
    new_bs, rep_bs = checkpoints.merge_params(batch_stats, sub_bs)
    bs_loaded, bs_random = len(rep_bs["loaded"]), len(rep_bs["missing"])
    rep["mismatched"] += [f"batch_stats/{m}" for m in rep_bs["mismatched"]]
  report = TransferReport(source=source, step=step, loaded=rep["loaded"],
                          random=rep["missing"], mismatched=rep["mismatched"],
                          unused=rep["unused"], batch_stats_loaded=bs_loaded,
                          batch_stats_random=bs_random)
  log.info(report.summary())
  for name in report.mismatched:
    log.warning("  shape mismatch (left random): %s", name)
  for name in report.unused:
    log.warning("  checkpoint tensor not used: %s", name)
  if strict and not report.loaded:
    raise ValueError(f"{source}: no tensor of '{src_prefix}' matched the model "
                     f"(mismatched: {report.mismatched[:5]}); is it the same "
                     f"backbone preset and layout?")
  return new_p, new_bs, report


def transfer_state(state: Any, source: str, **kw) -> tuple[Any, TransferReport]:
  """``transfer_variables`` on a ``trainer.TrainState`` (optimizer stays fresh)."""
  p, bs, rep = transfer_variables(state.params, state.batch_stats, source, **kw)
  return state.replace(params=p, batch_stats=bs), rep


# ------------------------------------------------------------------ freezing


def path_mask(params: Any, patterns: Sequence[str]) -> Any:
  """Pytree of bools: True where the '/'-joined name fully matches a regex."""
  pats = [re.compile(p) for p in patterns]

  def name(path):
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(p.fullmatch(name(path)) for p in pats), params)


class _FreezeState(NamedTuple):
  count: jax.Array


def _zero_while(mask: Any, steps: int) -> optax.GradientTransformation:
  """Zeroes the masked leaves of the updates during the first ``steps`` calls."""

  def init(params):
    del params
    return _FreezeState(count=jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params
    frozen = state.count < steps
    updates = jax.tree.map(
        lambda u, m: jnp.where(frozen, jnp.zeros_like(u), u) if m else u,
        updates, mask)
    return updates, _FreezeState(count=state.count + 1)
  return optax.GradientTransformation(init, update)


def freeze_for_steps(tx: optax.GradientTransformation, params: Any, steps: int,
                     patterns: Sequence[str] = ("trunk/.*",)
                     ) -> optax.GradientTransformation:
  """``tx`` with the parameters matching ``patterns`` frozen for ``steps`` steps.

  Gradients are zeroed before ``tx`` (Adam moments stay clean) and updates
  after it (no weight decay drift), so a frozen tensor is bit-identical
  until step ``steps``. ``steps <= 0`` returns ``tx`` unchanged.
  """
  if steps <= 0:
    return tx
  mask = path_mask(params, patterns)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(f"freeze patterns {list(patterns)} match no parameter")
  return optax.chain(_zero_while(mask, steps), tx, _zero_while(mask, steps))


def trunk_equal(a: Mapping, b: Mapping, prefix: str = "trunk") -> bool:
  """True when every tensor of ``a[prefix]`` equals ``b[prefix]`` (tests, checks)."""
  la = jax.tree_util.tree_leaves_with_path(a[prefix])
  lb = dict(jax.tree_util.tree_leaves_with_path(b[prefix]))
  return all(np.array_equal(np.asarray(v), np.asarray(lb[k])) for k, v in la)
