"""ResNet3D: shapes, parameter counts per preset, heads, trunk subtree."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radnet_jax.models import count_params
from radnet_jax.models.resnet3d import (
    Bottleneck, ResNet3D, ResNetTiny, get_model, preset_kwargs)



def _init(model, x):
  # rbg keys: XLA compiles threefry-based inits ~8x slower on CPU.
  return jax.jit(lambda r, x: model.init(r, x, False))(
      jax.random.key(0, impl="unsafe_rbg"), x)

# (kwargs, input shape, per-stage feature shapes [stem, s1..s4])
SHAPE_CASES = [
    # Paper stem 3x7x7 stride 1x2x2: depth kept by the stem, halved by the pool.
    (dict(), (2, 8, 16, 16, 1),
     [(2, 8, 8, 8, 8), (2, 4, 4, 4, 8), (2, 2, 2, 2, 16), (2, 1, 1, 1, 32),
      (2, 1, 1, 1, 64)]),
    # Odd sizes: symmetric padding gives ceil(n / 2) at each stride 2.
    (dict(), (1, 7, 15, 17, 1),
     [(1, 7, 8, 9, 8), (1, 4, 4, 5, 8), (1, 2, 2, 3, 16), (1, 1, 1, 2, 32),
      (1, 1, 1, 1, 64)]),
    # Thick-slice input with a stride-1 depth everywhere after the stem.
    (dict(stage_strides=((1, 1, 1), (1, 2, 2), (1, 2, 2), (1, 2, 2)),
          stem_pool=False, in_channels=2), (1, 4, 16, 16, 2),
     [(1, 4, 8, 8, 8), (1, 4, 8, 8, 8), (1, 4, 4, 4, 16), (1, 4, 2, 2, 32),
      (1, 4, 1, 1, 64)]),
    # MedicalNet layout: 7^3 stride-2 stem, dilated stages 3-4 keep 1/8 size.
    (dict(layout="medicalnet"), (1, 16, 16, 16, 1),
     [(1, 8, 8, 8, 8), (1, 4, 4, 4, 8), (1, 2, 2, 2, 16), (1, 2, 2, 2, 32),
      (1, 2, 2, 2, 64)]),
    (dict(layout="medicalnet", shortcut_type="A"), (1, 9, 16, 11, 1),
     [(1, 5, 8, 6, 8), (1, 3, 4, 3, 8), (1, 2, 2, 2, 16), (1, 2, 2, 2, 32),
      (1, 2, 2, 2, 64)]),
    (dict(block_cls=Bottleneck), (1, 8, 16, 16, 1),
     [(1, 8, 8, 8, 8), (1, 4, 4, 4, 32), (1, 2, 2, 2, 64), (1, 1, 1, 1, 128),
      (1, 1, 1, 1, 256)]),
]


@pytest.mark.parametrize("kwargs,in_shape,feat_shapes", SHAPE_CASES)
def test_feature_shapes(kwargs, in_shape, feat_shapes):
  kwargs = dict(kwargs)
  kwargs.pop("in_channels", None)
  model = ResNetTiny(heads={"plane": 3}, **kwargs)
  x = jnp.ones(in_shape, jnp.float32)
  out, feats = jax.eval_shape(
      lambda: model.init_with_output(jax.random.PRNGKey(0), x, False)[0])
  assert [tuple(f.shape) for f in feats] == feat_shapes
  c = feat_shapes[-1][-1]
  assert out["embedding"].shape == (in_shape[0], c)
  assert out["plane"].shape == (in_shape[0], 3)


def test_forward_heads_train_and_eval():
  model = ResNetTiny(heads={"sequence": 5, "plane": 3, "contrast": 2,
                            "coverage": 9, "spacing": 1}, head_dropout=0.1,
                     dtype=jnp.bfloat16, conv_impl="taps")
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 16, 16, 1))
  variables = _init(model, x)
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["params"]) == {
      "trunk", "head_sequence", "head_plane", "head_contrast",
      "head_coverage", "head_spacing"}
  # Parameters stay float32 when computing in bfloat16.
  assert all(l.dtype == jnp.float32
             for l in jax.tree_util.tree_leaves(variables["params"]))
  train_apply = jax.jit(lambda v, x: model.apply(
      v, x, True, mutable=["batch_stats"],
      rngs={"dropout": jax.random.PRNGKey(2)}))
  (out, feats), new_state = train_apply(variables, x)
  for task, n in [("sequence", 5), ("coverage", 9), ("spacing", 1)]:
    assert out[task].shape == (2, n) and out[task].dtype == jnp.float32
  assert feats[-1].dtype == jnp.bfloat16
  # Training mode updated the running statistics.
  old = variables["batch_stats"]["trunk"]["stem_bn"]["mean"]
  new = new_state["batch_stats"]["trunk"]["stem_bn"]["mean"]
  assert not np.allclose(old, new)
  # Eval ignores dropout: two calls with different rngs agree.
  eval_apply = jax.jit(lambda v, x, r: model.apply(v, x, False,
                                                   rngs={"dropout": r}))
  a, _ = eval_apply(variables, x, jax.random.PRNGKey(3))
  b, _ = eval_apply(variables, x, jax.random.PRNGKey(4))
  np.testing.assert_array_equal(a["sequence"], b["sequence"])


def test_zero_init_residual_scale():
  model = ResNetTiny()
  v = _init(model, jnp.zeros((1, 8, 16, 16, 1)))
  blk = v["params"]["trunk"]["stage1_block1"]
  np.testing.assert_array_equal(blk["bn2"]["scale"], 0.0)
  np.testing.assert_array_equal(blk["bn1"]["scale"], 1.0)


def test_conv_impls_agree_on_model():
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 16, 16, 1))
  a_model = ResNetTiny(heads={"plane": 3}, conv_impl="xla")
  b_model = ResNetTiny(heads={"plane": 3}, conv_impl="taps")
  v = _init(a_model, x)
  v_b = jax.eval_shape(lambda: b_model.init(jax.random.PRNGKey(0), x, False))
  assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(v_b)
  (oa, _), _ = jax.jit(lambda v, x: a_model.apply(
      v, x, True, mutable=["batch_stats"]))(v, x)
  (ob, _), _ = jax.jit(lambda v, x: b_model.apply(
      v, x, True, mutable=["batch_stats"]))(v, x)
  np.testing.assert_allclose(oa["embedding"], ob["embedding"], rtol=1e-4,
                             atol=1e-5)


# Parameter counts (params collection, heads excluded), 1 input channel.
# The MedicalNet-layout ResNet-18 trunk is the well-known ~33.2M.
KNOWN_COUNTS = {
    ("resnet10", "medicalnet"): 14_355_520,
    ("resnet18", "medicalnet"): 33_160_000,
    ("resnet34", "medicalnet"): 63_469_632,
    ("resnet50", "medicalnet"): 46_155_072,
    ("resnet18", "radnet"): 33_147_456,   # 3x7x7 stem: 64*(343-147) fewer
    ("resnet50", "radnet"): 46_142_528,
}


def _count(name, layout):
  model = get_model(name, layout=layout)
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                        jnp.zeros((1, 16, 32, 32, 1)), False))
  return count_params(v)


@pytest.mark.parametrize("name,layout", sorted(KNOWN_COUNTS))
def test_param_counts(name, layout):
  assert _count(name, layout) == KNOWN_COUNTS[(name, layout)]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_param_counts_match_monai(name):
  monai_nets = pytest.importorskip("monai.networks.nets")
  ref = getattr(monai_nets, name)(spatial_dims=3, n_input_channels=1,
                                  feed_forward=False, bias_downsample=False,
                                  conv1_t_size=7, conv1_t_stride=2)
  n_ref = sum(p.numel() for p in ref.parameters())
  assert _count(name, "medicalnet") == n_ref


def test_heads_add_dense_params():
  m = get_model("resnet18", heads={"sequence": 5, "spacing": 1})
  v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0),
                                    jnp.zeros((1, 16, 32, 32, 1)), False))
  assert count_params(v) == 33_147_456 + (512 * 5 + 5) + (512 + 1)


def test_registry_and_errors():
  assert isinstance(get_model("ResNet-18"), ResNet3D)
  with pytest.raises(ValueError, match="unknown model"):
    get_model("resnet7")
  with pytest.raises(ValueError, match="layout"):
    ResNetTiny(layout="keras").init(jax.random.PRNGKey(0),
                                    jnp.zeros((1, 8, 8, 8, 1)), False)
  with pytest.raises(ValueError, match=r"\(B, D, H, W, C\)"):
    ResNetTiny().init(jax.random.PRNGKey(0), jnp.zeros((8, 8, 8, 1)), False)


def test_input_windows_curve_and_trunk_shapes():
  """The soft-tissue input curve: known values at init, 3 learnable scalars,
  and a trunk with exactly the parameter shapes of the plain model (so a
  pretrained trunk still transfers to ResNetVNet)."""
  from radnet_jax.models.intensity import InputWindows, window
  # CT shards: HU h -> h / 1000. Window -160..240 HU.
  hu = np.array([-1000.0, -160.0, 40.0, 240.0, 1000.0], np.float32)
  np.testing.assert_allclose(np.asarray(window(jnp.asarray(hu / 1000), -0.16, 0.24)),
                             [-1.0, -1.0, 0.0, 1.0, 1.0], atol=1e-6)
  x = jnp.asarray((hu / 1000).reshape(1, 1, 1, 5, 1))
  mod = InputWindows(((-0.16, 0.24),))
  v = mod.init(jax.random.key(0), x)
  assert {k: p.shape for k, p in v["params"].items()} == {
      "scale": (1,), "window_scales": (1,), "bias": (1,)}
  # At init y = x + window(x): 50 HU of enhancement on soft tissue (0.05 in
  # the shard's units) becomes 0.3, six times more.
  y = np.asarray(mod.apply(v, x)).reshape(-1)
  np.testing.assert_allclose(y, hu / 1000 + np.array([-1, -1, 0, 1, 1]), atol=1e-6)
  x2 = jnp.asarray(np.array([0.04, 0.09], np.float32).reshape(1, 1, 1, 2, 1))
  d = np.diff(np.asarray(mod.apply(v, x2)).reshape(-1))[0]
  np.testing.assert_allclose(d, 0.05 * 6, rtol=1e-5)
  with pytest.raises(ValueError, match="hi > lo"):
    window(x, 0.2, 0.1)

  xin = jnp.zeros((1, 8, 16, 16, 1))
  plain = _init(ResNetTiny(heads={"contrast": 2}), xin)
  win = _init(ResNetTiny(heads={"contrast": 2}, input_windows=((-0.16, 0.24),)), xin)
  shapes = lambda t: jax.tree.map(lambda a: a.shape, t)
  assert shapes(win["params"]["trunk"]) == shapes(plain["params"]["trunk"])
  assert count_params(win) == count_params(plain) + 3
  out, _ = ResNetTiny(heads={"contrast": 2}, input_windows=((-0.16, 0.24),)).apply(
      win, xin, False)
  assert out["contrast"].shape == (1, 2)


def test_global_pool_avgmax_embedding():
  """avgmax: embedding = [mean, max] of the last stage, heads read both."""
  xin = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 16, 16, 1)), jnp.float32)
  model = ResNetTiny(heads={"contrast": 2}, global_pool="avgmax")
  v = _init(model, xin)
  out, feats = model.apply(v, xin, False)
  last = np.asarray(feats[-1], np.float32)
  emb = np.asarray(out["embedding"])
  assert emb.shape == (2, 2 * last.shape[-1])
  np.testing.assert_allclose(emb[:, :last.shape[-1]], last.mean(axis=(1, 2, 3)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(emb[:, last.shape[-1]:], last.max(axis=(1, 2, 3)), rtol=1e-6)
  assert v["params"]["head_contrast"]["kernel"].shape == (2 * last.shape[-1], 2)
  with pytest.raises(ValueError, match="global_pool"):
    _init(ResNetTiny(heads={"contrast": 2}, global_pool="sum"), xin)


@pytest.mark.parametrize("pool", ["avg", "avgmax"])
def test_pool_stages_embedding(pool):
  """pool_stages=3: the last three stages pooled, last stage first; the
  trunk is unchanged and pool_stages=1 is the earlier embedding."""
  xin = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 16, 16, 1)), jnp.float32)
  one = ResNetTiny(heads={"contrast": 2}, global_pool=pool)
  three = ResNetTiny(heads={"contrast": 2}, global_pool=pool, pool_stages=3)
  v1, v3 = _init(one, xin), _init(three, xin)
  assert jax.tree_util.tree_map(jnp.shape, v1["params"]["trunk"]) == \
      jax.tree_util.tree_map(jnp.shape, v3["params"]["trunk"])
  out, feats = three.apply(v3, xin, False)
  parts = []
  for f in (feats[-1], feats[-2], feats[-3]):
    f = np.asarray(f, np.float32)
    parts.append(f.mean(axis=(1, 2, 3)))
    if pool == "avgmax":
      parts.append(f.max(axis=(1, 2, 3)))
  want = np.concatenate(parts, axis=-1)
  emb = np.asarray(out["embedding"])
  assert emb.shape == want.shape == (2, (2 if pool == "avgmax" else 1) * (64 + 32 + 16))
  np.testing.assert_allclose(emb, want, rtol=1e-5, atol=1e-6)
  assert v3["params"]["head_contrast"]["kernel"].shape == (emb.shape[1], 2)
  out1, feats1 = one.apply(v1, xin, False)
  n_last = feats1[-1].shape[-1] * (2 if pool == "avgmax" else 1)
  assert out1["embedding"].shape == (2, n_last)
  with pytest.raises(ValueError, match="pool_stages"):
    _init(ResNetTiny(heads={"contrast": 2}, pool_stages=5), xin)


def test_global_max_value_and_gradient():
  """The embedding's max: jnp.max's value; the whole cotangent on the first
  argmax voxel of each channel (finite with ties, no 0 / 0)."""
  from radnet_jax.models.resnet3d import _global_max
  rng = np.random.default_rng(0)
  f = rng.normal(size=(2, 3, 2, 2, 4)).astype(np.float32)
  f[1, :, :, :, 2] = 0.5   # every voxel of one channel ties
  f = jnp.asarray(f)
  np.testing.assert_array_equal(np.asarray(_global_max(f)), np.asarray(jnp.max(f, axis=(1, 2, 3))))
  w = jnp.arange(1.0, 9.0).reshape(2, 4)
  g = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(_global_max(x) * w)))(f))
  assert np.isfinite(g).all()
  flat = np.asarray(f).reshape(2, -1, 4)
  want = np.zeros_like(flat)
  for b in range(2):
    for c in range(4):
      want[b, int(np.argmax(flat[b, :, c])), c] = float(w[b, c])
  np.testing.assert_array_equal(g.reshape(2, -1, 4), want)
  assert want[1, 0, 2] == float(w[1, 2])   # the tie: all of it on the first voxel
