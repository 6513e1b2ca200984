"""Region proposal of liver slices: a slab classifier slides along the body axis.

The 3D-RADNet recipe: before segmenting, a classifier on the pretrained
backbone looks at thin axial slabs (``slab_depth`` slices, in-plane shrunk to
``in_plane`` voxels) and says whether the slab's centre slice contains
liver. Sliding it along D gives a per-slice liver score; the proposed z-range
is ``[first, last]`` slice scoring above ``threshold``, widened by
``margin`` slices. Segmentation then runs only inside it.

The classifier is ``ResNet3D`` (the pretraining preset) with one ``liver``
logit head; its ``trunk`` starts from the pretraining checkpoint (by name,
``radnet_jax.training.transfer``). It trains on slabs of the segmentation training
volumes, half with liver in the centre slice and half without.

Reported per case (``score_case``): liver slices, liver slices kept (recall)
and the fraction of slices discarded. If no slice passes the threshold the
whole volume is kept (a proposal must never silently drop the organ).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from radnet_jax import resample as resample_lib
from radnet_jax.models import factory
from radnet_jax.shards import seg as segdata
from radnet_jax.training import distributed
from radnet_jax.training import loop
from radnet_jax.training import trainer
from radnet_jax.training import transfer

log = logging.getLogger("radnet_jax")


def shrink(volume: np.ndarray, in_plane: Sequence[int]) -> np.ndarray:
  """(D, H, W) -> float32 (D, h, w): anti-aliased in-plane resize, D kept."""
  v = np.asarray(volume, np.float32)
  return resample_lib.resize(v, (v.shape[0],) + tuple(int(s) for s in in_plane))


def slabs_at(vol: np.ndarray, centres: Sequence[int], depth: int,
             pad_value: float) -> np.ndarray:
  """Slabs ``(n, depth, h, w, 1)`` centred on ``centres`` (edge slices padded)."""
  half = depth // 2
  padded = np.pad(vol, ((half, depth - half), (0, 0), (0, 0)), constant_values=pad_value)
  return np.stack([padded[c:c + depth] for c in centres])[..., None].astype(np.float32)


def slice_labels(mask: np.ndarray, min_voxels: int = 1) -> np.ndarray:
  """bool (D,): the slice holds at least ``min_voxels`` liver voxels."""
  return (np.asarray(mask) > 0).reshape(mask.shape[0], -1).sum(1) >= min_voxels


@functools.lru_cache(maxsize=8)
def _liver_prob_fn(model):
  """Jitted (variables, slabs) -> liver probability, one per model object."""
  def f(variables, x):
    out, _ = model.apply(variables, x, train=False)
    return jax.nn.sigmoid(out["liver"][:, 0].astype(jnp.float32))
  return jax.jit(f)


@dataclasses.dataclass
class SlabProposer:
  """A trained slab classifier and its sliding/threshold settings."""
  model: Any
  variables: Any
  slab_depth: int = 8
  in_plane: tuple[int, int] = (64, 64)
  threshold: float = 0.5
  margin: int = 2
  batch: int = 16
  pad_value: float = 0.0

  def slice_scores(self, volume: np.ndarray) -> np.ndarray:
    """Liver probability per slice, float32 ``(D,)``."""
    vol = shrink(volume, self.in_plane)
    d = vol.shape[0]
    out = np.zeros(d, np.float32)
    for s in range(0, d, self.batch):
      centres = list(range(s, min(s + self.batch, d)))
      n = len(centres)
      centres += [centres[-1]] * (self.batch - n)   # fixed shape: one compile
      x = slabs_at(vol, centres, self.slab_depth, self.pad_value)
      out[s:s + n] = np.asarray(_liver_prob_fn(self.model)(self.variables, x))[:n]
    return out

  def propose(self, volume: np.ndarray) -> tuple[int, int]:
    """Slice range ``[z0, z1)`` to segment (the whole volume if none passes)."""
    scores = self.slice_scores(volume)
    hit = np.flatnonzero(scores >= self.threshold)
    if hit.size == 0:
      return 0, len(scores)
    return (max(int(hit[0]) - self.margin, 0),
            min(int(hit[-1]) + 1 + self.margin, len(scores)))

  @staticmethod
  def score_case(z_range: tuple[int, int], mask: np.ndarray) -> dict:
    """Recall of liver slices and the fraction of slices discarded."""
    lab = slice_labels(mask)
    z0, z1 = z_range
    kept = np.zeros_like(lab)
    kept[z0:z1] = True
    return {"liver_slices": int(lab.sum()), "liver_slices_kept": int((lab & kept).sum()),
            "discarded_fraction": float(1.0 - kept.mean())}


def _bce(out, batch):
  logit = out[0]["liver"][:, 0].astype(jnp.float32)
  y = batch["label"]
  loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logit, y))
  acc = jnp.mean(((logit > 0).astype(jnp.float32) == y).astype(jnp.float32))
  return loss, {"accuracy": acc}


def train_proposer(config, shards_dir: str, cases: Sequence[str], init_from: str,
                   workdir: str | None = None) -> SlabProposer:
  """Trains the slab classifier on the training cases' volumes.

  ``config.proposal``: slab_depth, in_plane, steps, batch_size, lr,
  threshold, margin, min_voxels. ``config.model.backbone`` names the
  ResNet3D preset, or {"preset", **trunk kwargs} (the same as pretraining,
  so the trunk transfers; ``segment.resolve_source`` derives it).
  """
  pc = config.proposal
  t0 = time.time()
  recs = segdata.load_records(shards_dir, "train", cases)
  if not recs:
    raise ValueError(f"{shards_dir}: no training records for the proposal")
  in_plane = tuple(int(s) for s in pc.in_plane)
  pad = float(config.data.out_range[0])
  vols = [shrink(r["volume"], in_plane) for r in recs]
  labs = [slice_labels(r["mask"], int(pc.min_voxels)) for r in recs]
  pos = [(i, z) for i, l in enumerate(labs) for z in np.flatnonzero(l)]
  neg = [(i, z) for i, l in enumerate(labs) for z in np.flatnonzero(~l)]
  if not pos or not neg:
    raise ValueError("the proposal needs slices with and without liver in the "
                     "training volumes")
  mesh = trainer.make_mesh(config.num_devices or None)
  bsz = distributed.check_batch(int(pc.batch_size), mesh=mesh)
  model = factory.slab_classifier(config)
  steps = int(pc.steps)
  tx, schedule = trainer.make_optimizer(
      {"name": "adamw", "lr": float(pc.lr), "warmup_steps": min(10, steps // 5),
       "weight_decay": 1e-4, "grad_clip": 1.0}, steps)
  shape = (int(pc.slab_depth),) + in_plane + (1,)
  state = trainer.create_train_state(model, tx, shape, config.seed + 17, mesh)
  if init_from:
    state, rep = transfer.transfer_state(state, init_from)
    log.info("proposal: %s", rep.summary())
  step_fn = trainer.make_train_step(model, tx, _bce, mesh, schedule)

  def batches():  # half slabs with liver in the centre slice, half without
    rng = np.random.default_rng(config.seed + 17)
    while True:
      picks = [pos[k] for k in rng.integers(len(pos), size=bsz // 2)] + \
              [neg[k] for k in rng.integers(len(neg), size=bsz - bsz // 2)]
      x = np.concatenate([slabs_at(vols[i], [z], int(pc.slab_depth), pad) for i, z in picks])
      x = x + rng.normal(0, 0.02, x.shape).astype(np.float32)
      yield {"volume": x, "label": np.array([1.0] * (bsz // 2) + [0.0] * (bsz - bsz // 2),
                                           np.float32)}

  # The one fit loop, without checkpoints: metrics fetched at the first and
  # the last step only (log_every = steps).
  fitted = loop.fit(state, step_fn, batches(), mesh, loop.Cadence(
      num_steps=steps, log_every=steps, divergence_factor=float(config.divergence_factor),
      divergence_window=int(config.divergence_window)))
  state, m = fitted.state, fitted.metrics
  log.info("proposal: slab classifier trained, %d steps in %.0f s (last loss %.3f, "
           "acc %.2f)", steps, time.time() - t0, m.get("loss", float("nan")),
           m.get("accuracy", float("nan")))
  variables = {"params": state.params}
  if jax.tree.leaves(state.batch_stats):
    variables["batch_stats"] = state.batch_stats
  return SlabProposer(model=model, variables=jax.device_get(variables),
                      slab_depth=int(pc.slab_depth), in_plane=in_plane,
                      threshold=float(pc.threshold), margin=int(pc.margin),
                      batch=int(pc.get("infer_batch", 16)), pad_value=pad)
