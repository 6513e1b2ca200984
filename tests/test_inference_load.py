"""radnet_jax.inference.load (radnet_jax.load): restore anywhere (8 devices -> 1),
clear errors, shapes.

``make_checkpoint`` (also used by the other inference tests, test_notebook,
test_docs, test_segment)
writes a real training workdir exactly as ``radnet_jax.tasks.pretrain`` does
(``Checkpointer`` with the grain iterator state, ``config.json``), from the
``experiments/pretrain.py:tiny`` config, on a mesh of ``num_devices``.
"""
import importlib.util
import json
import os
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUT_SHAPE = (8, 16, 16)
SHARD_SHAPE = (10, 20, 20)


def tiny_config():
  """experiments/pretrain.py:tiny with tiny shapes (the heads of the paper taxonomy)."""
  spec = importlib.util.spec_from_file_location(
      "pretrain_cfg", os.path.join(ROOT, "experiments", "pretrain.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("tiny")
  c.input_shape = INPUT_SHAPE
  c.data.shard_shape = SHARD_SHAPE
  return c


def _init_leaf(path, sds, rng):
  """Deterministic stand-in for the initialisers (no jit compile: fast tests)."""
  name = jax.tree_util.keystr(path)
  if "scale" in name or "var" in name:
    return np.ones(sds.shape, sds.dtype)
  if len(sds.shape) < 2:
    return np.zeros(sds.shape, sds.dtype)
  fan_in = int(np.prod(sds.shape[:-1]))
  return (rng.normal(size=sds.shape) * np.sqrt(2.0 / fan_in)).astype(sds.dtype)


def make_checkpoint(workdir: str, num_devices: int = 1, step: int = 3, seed: int = 0,
                    force: dict | None = None, config=None) -> dict:
  """Writes a training workdir with one checkpoint at ``step``.

  The TrainState (params, batch_stats, optimizer state, rng) has the exact
  structure ``trainer.create_train_state`` gives, replicated over a mesh of
  ``num_devices``, and is saved by ``checkpoints.Checkpointer`` as in
  training. Parameters are He-normal numpy draws (``seed``), not the jitted
  initialisers, so no XLA compile is needed.
  force: {task: class index} makes that head predict the class with
    probability ~1 whatever the input (zero kernel, bias +-20): a network
    whose disagreement with a header is known in advance.
  Returns the saved params as numpy (for comparisons).
  """
  from radnet_jax import contract
  from radnet_jax.training import checkpoints
  from radnet_jax.models import factory
  from radnet_jax.training import trainer
  from radnet_jax.labels import taxonomy as tax
  config = config or tiny_config()
  model = factory.pretrain_model(config, tax.Taxonomy(config.taxonomy))
  tx, _ = trainer.make_optimizer(config.optim, int(config.num_steps))
  mesh = trainer.make_mesh(num_devices)
  shape = (1, *tuple(config.input_shape), 1)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros(shape, np.float32),
                                               train=False))
  rng = np.random.default_rng(seed)
  variables = jax.tree_util.tree_map_with_path(lambda p, s: _init_leaf(p, s, rng),
                                               dict(abstract))
  params = variables["params"]
  for task, k in (force or {}).items():
    head = params[f"head_{task}"]
    head["kernel"] = np.zeros_like(head["kernel"])
    head["bias"] = np.where(np.arange(head["bias"].shape[0]) == k, 20.0, -20.0
                            ).astype(head["bias"].dtype)
  # Adam's moments and counters are zeros at init: the exact optimizer state.
  opt_state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), jax.eval_shape(tx.init, params))
  state = trainer.TrainState(step=np.int32(step), params=params,
                             batch_stats=variables.get("batch_stats", {}),
                             opt_state=opt_state, rng=np.zeros(2, np.uint32))
  state = jax.device_put(state, trainer.replicated(mesh))
  ck = checkpoints.Checkpointer(workdir, keep=1)
  ck.save(step, state, iter(grain.MapDataset.range(10).to_iter_dataset()))
  ck.close()
  checkpoints.save_config(workdir, config)
  contract.write(workdir, contract.for_pretrain(config))   # as train_and_evaluate does
  return jax.device_get(state.params)


def test_restore_8_device_checkpoint_on_1_device(tmp_path):
  wd = str(tmp_path / "run8")
  assert len(jax.devices()) == 8   # tests/conftest.py
  ref = make_checkpoint(wd, num_devices=8, step=5)
  np.save(tmp_path / "ref.npy", ref["head_plane"]["kernel"])
  x = np.random.default_rng(0).normal(size=(2, *INPUT_SHAPE, 1)).astype(np.float32)
  np.save(tmp_path / "x.npy", x)
  # A fresh process with ONE device loads the 8-device checkpoint and runs it.
  code = f"""
import jax, numpy as np, radnet_jax
assert len(jax.devices()) == 1, jax.devices()
model, variables, config = radnet_jax.load({wd!r})
assert set(variables) == {{"params", "batch_stats"}}, set(variables)
leaves = jax.tree.leaves(variables)
assert all(len(a.devices()) == 1 for a in leaves)
ref = np.load({str(tmp_path / 'ref.npy')!r})
np.testing.assert_array_equal(np.asarray(variables["params"]["head_plane"]["kernel"]), ref)
out, feats = model.apply(variables, np.load({str(tmp_path / 'x.npy')!r}), train=False)
np.save({str(tmp_path / 'out1.npy')!r}, np.asarray(out["sequence"]))
print("STEP", radnet_jax.load({wd + '/checkpoints/5'!r}).step)
"""
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "STEP 5" in res.stdout
  # Same outputs as this (8-device) process computes from the same checkpoint.
  import radnet_jax
  model, variables, _ = radnet_jax.load(wd)
  out, _ = model.apply(variables, x, train=False)
  np.testing.assert_allclose(np.load(tmp_path / "out1.npy"), np.asarray(out["sequence"]),
                             rtol=1e-5, atol=1e-5)


def test_load_variants_and_metadata(tmp_path):
  import radnet_jax
  wd = str(tmp_path / "run")
  ref = make_checkpoint(wd, step=7)
  loaded = radnet_jax.load(wd)
  model, variables, config = loaded
  assert loaded.step == 7
  assert loaded.input_shape == INPUT_SHAPE and loaded.shard_shape == SHARD_SHAPE
  assert loaded.taxonomy == "paper"
  assert loaded.heads == {"sequence": 5, "plane": 3, "contrast": 2, "coverage": 9,
                          "spacing": 1}
  assert config.model.name == "resnet_tiny"
  assert "opt_state" not in variables
  np.testing.assert_array_equal(np.asarray(variables["params"]["head_contrast"]["bias"]),
                                ref["head_contrast"]["bias"])
  # The same checkpoint through every path spelling.
  for p in (os.path.join(wd, "checkpoints"), os.path.join(wd, "checkpoints", "7"),
            os.path.join(wd, "checkpoints", "7", "state")):
    assert radnet_jax.load(p).path == loaded.path
  # dtype override for CPU inference of a bfloat16 run.
  assert radnet_jax.load(wd, dtype="bfloat16").config.model.dtype == "bfloat16"


def test_load_errors_name_the_path_and_the_mismatch(tmp_path):
  import radnet_jax
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="no checkpoint found under .*empty"):
    radnet_jax.load(str(empty))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    radnet_jax.load(str(tmp_path / "nope"))
  wd = str(tmp_path / "run")
  make_checkpoint(wd)
  # Config says ResNet-10 (64 filters) but the weights are ResNetTiny (8 filters).
  cfg = json.loads(open(os.path.join(wd, "config.json")).read())
  cfg["model"]["name"] = "resnet10"
  with open(os.path.join(wd, "config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError) as e:
    radnet_jax.load(wd)
  msg = str(e.value)
  assert os.path.join(wd, "checkpoints", "3", "state") in msg
  assert "shape mismatches" in msg and "resnet10" in msg
  assert "trunk/stage1_block1/bn1/mean: checkpoint (8,) vs model (64,)" in msg
  # A head the weights do not have (extended taxonomy: 9 sequence classes).
  cfg["model"]["name"] = "resnet_tiny"
  cfg["taxonomy"] = "extended"
  with pytest.raises(ValueError, match=r"head_sequence/bias: checkpoint \(5,\) vs model \(9,\)"):
    radnet_jax.load(wd, config=cfg)
  # A step folder with no config.json beside it.
  lone = tmp_path / "lone"
  os.rename(os.path.join(wd, "checkpoints"), lone)
  with pytest.raises(FileNotFoundError, match="no config.json .* pass config="):
    radnet_jax.load(str(lone / "3"))
  assert radnet_jax.load(str(lone / "3"), config=tiny_config()).step == 3
