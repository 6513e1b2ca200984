"""Trunk transfer from a pretraining checkpoint into ResNetVNet; freezing."""
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict

from radnet_jax.training import checkpoints
from radnet_jax.training import trainer
from radnet_jax.training import transfer
from radnet_jax.models import resnet3d
from radnet_jax.models import vnet

SHAPE = (1, 16, 32, 32, 1)
# Native XLA convs: identical parameter names, quicker to compile in tests.
IMPL = "xla"


def _random_vars(model, seed):
  """Variables with random values of the right shapes, without compiling the
  initialisers (jit-compiling threefry inits costs ~40 s of CPU here)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(SHAPE),
                                             train=False))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), shapes)


def _flat(tree, prefix=""):
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def pretrain_workdir(tmp_path_factory):
  """A pretraining-style checkpoint: ResNet3D tiny with heads, perturbed
  parameters and non-trivial BatchNorm statistics, saved by Checkpointer."""
  model = resnet3d.get_model("resnet_tiny", heads=FrozenDict({"sequence": 5, "plane": 3}),
                             conv_impl=IMPL)
  v = _random_vars(model, 7)
  params = v["params"]
  bs = jax.tree.map(np.abs, v["batch_stats"])
  state = trainer.TrainState(step=jnp.int32(5), params=params, batch_stats=bs,
                             opt_state={}, rng=jax.random.PRNGKey(0))
  wd = str(tmp_path_factory.mktemp("pretrain"))
  ck = checkpoints.Checkpointer(wd)
  ck.save(5, state, iter(grain.MapDataset.range(4).to_iter_dataset()))
  ck.close()
  return wd, _flat(params), _flat(bs)


def _seg_vars(trunk="resnet_tiny"):
  model = vnet.ResNetVNet(trunk=trunk, out_channels=2, decoder_filters=(16, 16, 8, 8, 8),
                          conv_impl=IMPL)
  return model, _random_vars(model, 0)


def test_loads_every_encoder_tensor_and_leaves_decoder_random(pretrain_workdir):
  wd, ck_p, ck_bs = pretrain_workdir
  model, v = _seg_vars()
  new_p, new_bs, rep = transfer.transfer_variables(v["params"], v["batch_stats"], wd)
  got, init = _flat(new_p), _flat(v["params"])
  trunk_names = sorted(k for k in init if k.startswith("trunk/"))
  assert trunk_names and sorted(rep.loaded) == trunk_names
  for k in trunk_names:                       # every encoder tensor copied
    np.testing.assert_array_equal(got[k], ck_p[k])
  decoder = sorted(k for k in init if not k.startswith("trunk/"))
  assert sorted(rep.random) == decoder
  for k in decoder:                           # decoder untouched (random init)
    np.testing.assert_array_equal(got[k], init[k])
  assert rep.mismatched == [] and rep.unused == [] and rep.step == 5
  gbs = _flat(new_bs)
  for k in (k for k in gbs if k.startswith("trunk/")):
    np.testing.assert_array_equal(gbs[k], ck_bs[k])
  assert rep.batch_stats_loaded == sum(k.startswith("trunk/") for k in gbs) > 0
  # The transferred network still runs and gives per-voxel logits.
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      {"params": new_p, "batch_stats": new_bs}, jnp.zeros(SHAPE))
  assert out.shape == SHAPE[:4] + (2,)
  assert "tensors loaded" in rep.summary()


def test_shape_mismatch_is_reported_never_dropped(pretrain_workdir):
  wd, _, _ = pretrain_workdir
  _, v = _seg_vars({"preset": "resnet_tiny", "num_filters": 4})
  with pytest.raises(ValueError, match="no tensor of 'trunk' matched"):
    transfer.transfer_variables(v["params"], v["batch_stats"], wd)
  new_p, _, rep = transfer.transfer_variables(v["params"], v["batch_stats"], wd,
                                              strict=False)
  assert rep.mismatched and all(":" in m and " vs " in m for m in rep.mismatched)
  assert any(m.startswith("trunk/stem_conv/kernel: (3, 7, 7, 1, 8) vs (3, 7, 7, 1, 4)")
             for m in rep.mismatched)
  # Mismatched tensors keep their init values.
  np.testing.assert_array_equal(new_p["trunk"]["stem_conv"]["kernel"],
                                v["params"]["trunk"]["stem_conv"]["kernel"])


def test_missing_source_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    transfer.load_source(str(tmp_path / "nope"))


def test_freeze_for_steps_keeps_encoder_bit_identical():
  params = {"trunk": {"w": jnp.ones((3, 3))}, "decoder": {"w": jnp.ones((3, 3))}}
  tx = transfer.freeze_for_steps(optax.adamw(0.1, weight_decay=0.1), params, 2)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  p = params
  for step in range(3):
    upd, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, upd)
    if step < 1:
      np.testing.assert_array_equal(p["trunk"]["w"], params["trunk"]["w"])
      assert not np.allclose(p["decoder"]["w"], params["decoder"]["w"])
  # Frozen for steps 0 and 1, moving from step 2 on.
  assert not np.allclose(p["trunk"]["w"], params["trunk"]["w"])
  assert transfer.freeze_for_steps(optax.sgd(1.0), params, 0) is not None
  with pytest.raises(ValueError, match="match no parameter"):
    transfer.freeze_for_steps(optax.sgd(1.0), params, 3, ("encoder/.*",))


def test_path_mask():
  m = transfer.path_mask({"trunk": {"a": 1, "b": {"c": 2}}, "out": {"a": 3}},
                         ("trunk/.*",))
  assert m == {"trunk": {"a": True, "b": {"c": True}}, "out": {"a": False}}


# ------------------------------------------------------ MedicalNet weights (bug 3)


def _medicalnet_pth(path, preset="resnet10", **kw):
  """A MedicalNet-layout .pth (torch tensors, "module." prefixes, the
  segmentation head) written by torch, narrow so that the test is quick."""
  torch = pytest.importorskip("torch")
  from tests.test_docs import medicalnet_state_dict
  sd = medicalnet_state_dict(preset, num_filters=8, **kw)
  torch.save({"state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in sd.items()}},
             path)
  return sd


def test_medicalnet_depth_from_the_file_the_name_or_explicit(tmp_path):
  from radnet_jax.models import medicalnet
  pth = str(tmp_path / "weights.pth")
  _medicalnet_pth(pth, "resnet18", shortcut_type="A")
  info = medicalnet.describe(medicalnet.read_state_dict(pth), pth)
  assert info == {"depth": 18, "block": "basic", "num_filters": 8, "in_channels": 1,
                  "shortcut_type": "A"}
  assert medicalnet.parse_source(f"medicalnet:{pth}") == (pth, None)
  assert medicalnet.parse_source(f"medicalnet:{pth}:depth=18") == (pth, 18)
  assert medicalnet.parse_source("medicalnet:/w/resnet_34.pth") == ("/w/resnet_34.pth", 34)
  variables, got, _ = medicalnet.load_source(f"medicalnet:{pth}:depth=18")
  assert got["depth"] == 18 and "stage1_block2" in variables["params"]["trunk"]
  with pytest.raises(ValueError, match="depth 10 was asked for, but the file holds a ResNet-18"):
    medicalnet.load_source(f"medicalnet:{pth}:depth=10")
  with pytest.raises(ValueError, match="depth must be one of"):
    medicalnet.parse_source(f"medicalnet:{pth}:depth=12")
  assert transfer.medicalnet_backbone(f"medicalnet:{pth}") == {
      "preset": "resnet18", "layout": "medicalnet", "shortcut_type": "A", "num_filters": 8}


def test_init_from_medicalnet_end_to_end(tmp_path):
  """``--config.init_from=medicalnet:PATH``: backbone from the file, every
  trunk tensor loaded with its values, the run trains, evaluates and saves."""
  import json
  import os
  from radnet_jax.models import factory
  from radnet_jax.tasks import segment
  from tests.test_segdata import _write_lits
  from tests.test_segment import _config
  pth = str(tmp_path / "resnet_10.pth")
  sd = _medicalnet_pth(pth)
  c = _config("tiny,n=2")
  c.data.lits_dir = _write_lits(str(tmp_path / "lits"), n=3)
  c.data.cache_dir = str(tmp_path / "cache")
  c.data.spacing = (2.5, 1.5, 1.5)
  c.model.kwargs.conv_impl = IMPL
  c.proposal.enabled = False
  c.num_devices = 1
  c.init_from = f"medicalnet:{pth}"
  wd = str(tmp_path / "wd")
  res = segment.train_and_evaluate(c, wd)
  assert 0.0 <= res["test"]["liver/dice_global"] <= 1.0
  cfg = json.load(open(os.path.join(wd, "config.json")))
  assert cfg["model"]["backbone"] == {"preset": "resnet10", "layout": "medicalnet",
                                      "shortcut_type": "B", "num_filters": 8}
  # Every trunk tensor loaded, with the file's values (conv1 (O, I, kD, kH, kW)
  # -> (kD, kH, kW, I, O)); the decoder left random.
  model = factory.segmentation_model(segment.resolve_source(c, str(tmp_path / "wd2"))[0])
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(SHAPE),
                                             train=False))
  rep = json.load(open(os.path.join(wd, "transfer_report.json")))
  assert len(rep["loaded"]) == len(jax.tree.leaves(shapes["params"]["trunk"]))
  assert not rep["mismatched"] and rep["batch_stats_loaded"] > 0
  assert all(n.startswith("trunk/") for n in rep["loaded"])
  v = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  p, _, _ = transfer.transfer_variables(v["params"], v["batch_stats"], c.init_from)
  np.testing.assert_array_equal(p["trunk"]["stem_conv"]["kernel"],
                                sd["conv1.weight"].transpose(2, 3, 4, 1, 0))
