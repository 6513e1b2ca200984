"""Checkpoint save/resume, portable restore into numpy, init_from by name."""
import grain
import jax
import numpy as np
import pytest

from radnet_jax.training import checkpoints
from radnet_jax.training import trainer
from tests import synthetic_shards as ss

SHAPE = (8, 16, 16, 1)


def _state(mesh, heads=None, seed=0):
  model = ss.TinyCNN(heads=heads or {"plane": 3, "spacing": 1})
  tx, _ = trainer.make_optimizer({"name": "sgd", "lr": 0.1}, 10)
  return trainer.create_train_state(model, tx, SHAPE, seed, mesh)


def _Iter():
  return iter(grain.MapDataset.range(100).to_iter_dataset())


def test_save_on_8_devices_restore_anywhere(tmp_path):
  wd = str(tmp_path)
  state8 = _state(trainer.make_mesh(8))
  ck = checkpoints.Checkpointer(wd, keep=1, best_metric="val/acc")
  it = _Iter()
  for _ in range(17):
    next(it)
  ck.save(3, state8, it)
  assert ck.maybe_save_best(3, state8, {"val/acc": 0.5})
  assert not ck.maybe_save_best(4, state8, {"val/acc": 0.4})
  checkpoints.save_config(wd, {"model": {"name": "tiny"}})
  # Exact resume onto a 1-device mesh.
  fresh, it2 = _state(trainer.make_mesh(1), seed=1), _Iter()
  restored = ck.restore(fresh, it2)
  assert next(it2) == 17
  for a, b in zip(jax.tree.leaves(jax.device_get(state8)),
                  jax.tree.leaves(jax.device_get(restored))):
    np.testing.assert_array_equal(a, b)
  # Plain numpy, no mesh, no optimizer.
  r = checkpoints.restore(wd)
  params, bs, cfg, step = r.params, r.batch_stats, r.config, r.step
  assert step == 3 and not r.skipped and cfg == {"model": {"name": "tiny"}}
  ref = jax.device_get(state8.params)
  np.testing.assert_array_equal(params["head_plane"]["kernel"], ref["head_plane"]["kernel"])
  assert isinstance(bs["BatchNorm_0"]["mean"], np.ndarray)
  ck.close()
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoints.restore(str(tmp_path / "checkpoints" / "3" / "data"))


def test_merge_params_reports():
  init = {"a": {"w": np.zeros((2, 2))}, "head": {"w": np.zeros(3)}, "new": {"b": np.ones(1)}}
  loaded = {"a": {"w": np.ones((2, 2))}, "head": {"w": np.ones(4)}, "old": {"x": np.ones(1)}}
  merged, rep = checkpoints.merge_params(init, loaded)
  np.testing.assert_array_equal(merged["a"]["w"], 1.0)
  np.testing.assert_array_equal(merged["head"]["w"], 0.0)
  assert rep["loaded"] == ["a/w"] and rep["missing"] == ["new/b"]
  assert rep["mismatched"] == ["head/w: (4,) vs (3,)"] and rep["unused"] == ["old/x"]
  _, rep2 = checkpoints.merge_params(init, loaded, skip=("a/.*",))
  assert "a/w" in rep2["missing"]


def test_init_from(tmp_path):
  mesh = trainer.make_mesh(1)
  src = _state(mesh, seed=0)
  ck = checkpoints.Checkpointer(str(tmp_path), keep=1)
  ck.save(1, src, _Iter())
  ck.close()
  dst = _state(mesh, heads={"plane": 3, "sequence": 5}, seed=1)
  new, rep = checkpoints.init_from(dst, str(tmp_path))
  assert "head_sequence/kernel" in rep["missing"]
  assert "head_spacing/kernel" in rep["unused"]
  np.testing.assert_array_equal(np.asarray(new.params["Conv_0"]["kernel"]),
                                np.asarray(src.params["Conv_0"]["kernel"]))
  assert int(new.step) == 0
