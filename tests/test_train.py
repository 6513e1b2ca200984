"""Pretraining: masked loss, mesh equivalence, no recompiles, end-to-end, resume."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import pytest

from experiments import pretrain
from radnet_jax.training import checkpoints
from radnet_jax.training import distributed
from radnet_jax.training import loop
from radnet_jax.tasks import pretrain as train
from radnet_jax.training import trainer
from tests import synthetic_shards as ss

SHAPE = (8, 16, 16)
WEIGHTS = {"sequence": 1.0, "plane": 1.0, "contrast": 1.0, "coverage": 1.0, "spacing": 0.5}


def _batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  return {"volume": rng.normal(size=(n,) + SHAPE + (1,)).astype(np.float32),
          "sequence": np.array([0, 1, -1, 3, 4, -1, 2, 0][:n], np.int32),
          "plane": np.array([0, 1, 2, 0, 1, 2, -1, 0][:n], np.int32),
          "contrast": np.array([0, 1, 0, 1, -1, 0, 1, 0][:n], np.int32),
          "coverage": (rng.uniform(size=(n, 9)) > 0.7).astype(np.float32),
          "coverage_mask": np.array([1, 1, 0, 1, 1, 0, 1, 1][:n], np.float32),
          "spacing": np.array([1., 2., np.nan, 5., 3., 1.5, np.nan, 2.][:n], np.float32),
          "mask": np.ones(n, np.float32)}


def _outputs(seed=0, n=8):
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  return {"sequence": jax.random.normal(k[0], (n, 5)), "plane": jax.random.normal(k[1], (n, 3)),
          "contrast": jax.random.normal(k[2], (n, 2)), "coverage": jax.random.normal(k[3], (n, 9)),
          "spacing": jax.random.normal(k[4], (n, 1))}


def test_unknown_labels_contribute_nothing():
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  out = _outputs()
  # jitted: one compile instead of dozens of eager per-op compiles.
  loss_fn = jax.jit(lambda o: train.multitask_loss(o, batch, weights=WEIGHTS)[0])
  base = loss_fn(out)
  grads = jax.jit(jax.grad(loss_fn))(out)
  # Rows with an unknown label get exactly zero gradient for that task.
  assert np.all(np.asarray(grads["sequence"])[[2, 5]] == 0)
  assert np.all(np.asarray(grads["plane"])[6] == 0)
  assert np.all(np.asarray(grads["coverage"])[[2, 5]] == 0)
  assert np.all(np.asarray(grads["spacing"])[[2, 6]] == 0)
  assert np.any(np.asarray(grads["sequence"])[0] != 0)
  # Changing their logits does not change the loss.
  out2 = dict(out, sequence=out["sequence"].at[2].set(100.0))
  assert float(loss_fn(out2)) == pytest.approx(float(base), rel=1e-6)
  # Per-task mean over known examples: equals a loss on the known rows only.
  known = np.array([0, 1, 3, 4, 6, 7])
  sub = {k: v[known] for k, v in batch.items()}
  metrics = jax.jit(lambda o, b: train.multitask_loss(o, b, weights=WEIGHTS)[1])
  m = metrics({k: v[known] for k, v in out.items()}, sub)
  mfull = metrics(out, batch)
  assert float(mfull["sequence_loss"]) == pytest.approx(float(m["sequence_loss"]), rel=1e-6)
  # All unknown (or all padding): zero loss, finite zero gradient.
  pad = dict(batch, mask=jnp.zeros(8))
  l0, g0 = jax.jit(jax.value_and_grad(
      lambda o: train.multitask_loss(o, pad, weights=WEIGHTS)[0]))(out)
  assert float(l0) == 0.0 and all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(g0))


def test_class_weights():
  w = train.class_weights_from_counts({"plane": np.array([90, 10, 0])})["plane"]
  np.testing.assert_allclose(w, [100 / 180, 100 / 20, 0.0], rtol=1e-6)


def _run_steps(num_devices, steps=3):
  mesh = trainer.make_mesh(num_devices)
  model = ss.TinyCNN(heads={"sequence": 5, "plane": 3, "contrast": 2, "coverage": 9,
                            "spacing": 1})
  tx, sched = trainer.make_optimizer({"name": "adamw", "lr": 1e-2, "warmup_steps": 1,
                                      "grad_clip": 1.0, "weight_decay": 1e-4}, 10)
  state = trainer.create_train_state(model, tx, SHAPE + (1,), 0, mesh)
  traces = []

  def loss_fn(out, batch):
    traces.append(1)  # runs only while tracing
    return train.multitask_loss(out[0], batch, weights=WEIGHTS)

  step = trainer.make_train_step(model, tx, loss_fn, mesh, sched)
  losses = []
  for i in range(steps):
    state, m = step(state, trainer.put_batch(_batch(seed=i), mesh))
    losses.append(float(m["loss"]))
  return state, losses, len(traces)


def test_one_vs_eight_devices_and_no_recompilation():
  assert jax.device_count() >= 8, "conftest sets 8 simulated CPU devices"
  s1, l1, t1 = _run_steps(1)
  s8, l8, t8 = _run_steps(8)
  assert t1 == 1 and t8 == 1  # traced once, no recompiles across steps
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(s1.params)),
                  jax.tree.leaves(jax.device_get(s8.params))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(s1.batch_stats)),
                  jax.tree.leaves(jax.device_get(s8.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_batch_must_divide_devices():
  with pytest.raises(ValueError, match="not divisible by the device count 8.*8 or 16"):
    distributed.check_batch(12, mesh=trainer.make_mesh(8))
  assert distributed.check_batch(12, mesh=trainer.make_mesh(4)) == 12  # one process


def test_divergence_nan_and_explosion():
  d = loop.Divergence(factor=100.0, window=3)
  assert d.check({"loss": float("nan")}).startswith("non-finite training loss")
  assert d.check({"loss": 2.0, "grad_norm": float("inf")}).startswith("non-finite gradient")
  for x in (4.0, 2.0, 3.0):
    assert d.check({"loss": x}) is None
  assert d.check({"loss": 299.0}) is None           # 99.7x the median 3.0: healthy
  # The window holds the last 3 healthy losses (2, 3, 299): median 3.
  reason = d.check({"loss": 301.0})
  assert reason is not None and "100x the median 3" in reason
  assert loop.Divergence(factor=0.0, window=3, history=[1.0]).check({"loss": 1e30}) is None


def tiny_config(shards_dir, steps=4):
  c = pretrain.get_config("tiny")
  c.data.shards_dir = shards_dir
  c.model.name = "tests.synthetic_shards:TinyCNN"
  c.model.kwargs = ml_collections.ConfigDict()  # kwargs belong to the named model
  c.num_steps = steps
  c.num_devices = 2
  return c


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  return ss.write_shards(str(tmp_path_factory.mktemp("sh")))


@pytest.fixture(scope="module")
def straight_run(shards, tmp_path_factory):
  """One uninterrupted tiny run, shared by the end-to-end and resume tests."""
  wd = str(tmp_path_factory.mktemp("straight"))
  return wd, train.train_and_evaluate(tiny_config(shards), wd)


def test_train_and_evaluate_end_to_end(straight_run):
  wd, out = straight_run
  assert set(out) == {"val", "test"}
  assert out["test"]["sequence"]["n"] == 10  # 11 test records, one unknown sequence
  for f in ("config.json", "metrics.jsonl", "results.json", "results.md",
            "plots/test_plane.png"):
    assert os.path.exists(os.path.join(wd, f)), f
  res = json.load(open(os.path.join(wd, "results.json")))
  assert 0.0 <= res["test"]["summary"]["plane_acc"] <= 1.0
  assert res["test"]["checkpoint"].startswith("best@")
  lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert any("train/loss" in l for l in lines) and any("val/mean_accuracy" in l for l in lines)
  r = checkpoints.restore(wd, prefer="latest")
  assert r.step == 4 and r.config["model"]["name"].endswith("TinyCNN")
  assert isinstance(jax.tree.leaves(r.params)[0], np.ndarray) and jax.tree.leaves(r.batch_stats)


def test_train_with_rotation_and_noise_in_the_step(shards, tmp_path, monkeypatch):
  # augment.on_device: the host batches carry the drawn angle and noise level,
  # the jitted step (2-device mesh) applies them, traced once.
  from radnet_jax.data import device_augment
  seen = []
  real = device_augment.augment
  monkeypatch.setattr(device_augment, "augment",
                      lambda b, k: seen.append(sorted(b)) or real(b, k))
  cfg = tiny_config(shards, steps=3)
  assert cfg.augment.enabled and cfg.augment.rotate_degrees > 0
  cfg.augment.on_device = "true"   # a string field: "auto", "true", "false"
  out = train.train_and_evaluate(cfg, str(tmp_path))
  assert len(seen) == 1 and {"rotate_degrees", "noise_std"} <= set(seen[0])
  assert out["test"]["sequence"]["n"] == 10
  losses = [l["train/loss"] for l in map(json.loads, open(
      os.path.join(tmp_path, "metrics.jsonl"))) if "train/loss" in l]
  assert losses and np.isfinite(losses).all()


def test_kill_and_resume_matches_uninterrupted(shards, straight_run, tmp_path, monkeypatch):
  cfg = tiny_config(shards, steps=4)
  straight, ref = straight_run

  resumed = str(tmp_path / "resumed")
  real = trainer.make_train_step

  def killing_make_train_step(*a, **kw):
    step_fn, calls = real(*a, **kw), []

    def wrapped(state, batch):
      calls.append(1)
      if len(calls) == 3:  # killed during step 3, after the step-2 checkpoint
        raise KeyboardInterrupt("simulated preemption")
      return step_fn(state, batch)
    return wrapped

  monkeypatch.setattr(trainer, "make_train_step", killing_make_train_step)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(cfg, resumed)
  monkeypatch.setattr(trainer, "make_train_step", real)
  assert checkpoints.Checkpointer(resumed).latest_step() == 2
  out = train.train_and_evaluate(cfg, resumed)

  ra = checkpoints.restore(straight, prefer="latest")
  rb = checkpoints.restore(resumed, prefer="latest")
  assert ra.step == rb.step == 4
  for a, b in zip(jax.tree.leaves(ra.params), jax.tree.leaves(rb.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert train.summary(ref["test"]) == pytest.approx(train.summary(out["test"]), rel=1e-5)
