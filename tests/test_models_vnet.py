"""VNet and ResNetVNet: shapes, parameter counts vs MONAI, trunk subtree."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radnet_jax.models import count_params
from radnet_jax.models.resnet3d import ResNetTiny, get_model
from radnet_jax.models.vnet import ResNetVNet, VNet, trunk_kwargs

SMALL_VNET = dict(filters=(4, 8, 16, 32, 64))
# rbg keys: XLA compiles threefry-based inits ~8x slower on CPU.
_KEY = jax.random.key(0, impl="unsafe_rbg")
SMALL_DEC = dict(decoder_filters=(32, 16, 16, 8, 8))


def _shapes(model, in_shape):
  return jax.eval_shape(lambda: model.init_with_output(
      jax.random.PRNGKey(0), jnp.zeros(in_shape), False))


# (kwargs, in_shape, out_shape)
VNET_CASES = [
    (dict(out_channels=3), (2, 16, 16, 16, 1), (2, 16, 16, 16, 3)),
    (dict(out_channels=2, act="prelu"), (1, 17, 20, 9, 1), (1, 17, 20, 9, 2)),
    (dict(out_channels=2, in_channels=2), (1, 32, 16, 48, 2),
     (1, 32, 16, 48, 2)),
]


@pytest.mark.parametrize("kwargs,in_shape,out_shape", VNET_CASES)
def test_vnet_shapes(kwargs, in_shape, out_shape):
  y, _ = _shapes(VNet(**kwargs), in_shape)
  assert y.shape == out_shape and y.dtype == jnp.float32


RESVNET_CASES = [
    (dict(trunk="resnet_tiny"), (2, 8, 16, 16, 1), (2, 8, 16, 16, 2)),
    # Odd sizes and the anisotropic (stride-1 depth) stem.
    (dict(trunk="resnet_tiny"), (1, 7, 15, 17, 1), (1, 7, 15, 17, 2)),
    (dict(trunk={"preset": "resnet_tiny", "stem_pool": False,
                 "stage_strides": ((1, 1, 1), (1, 2, 2), (1, 2, 2),
                                   (1, 2, 2))}),
     (1, 3, 16, 16, 1), (1, 3, 16, 16, 2)),
    # MedicalNet layout: dilated stages 3-4 at the same resolution as stage 2.
    (dict(trunk={"preset": "resnet_tiny", "layout": "medicalnet",
                 "shortcut_type": "A"}), (1, 9, 16, 11, 1), (1, 9, 16, 11, 2)),
    (dict(trunk={"stage_sizes": (1, 1, 1, 1), "num_filters": 4},
          out_channels=4, act="prelu"), (1, 8, 8, 8, 2), (1, 8, 8, 8, 4)),
]


@pytest.mark.parametrize("kwargs,in_shape,out_shape", RESVNET_CASES)
def test_resnet_vnet_shapes(kwargs, in_shape, out_shape):
  y, _ = _shapes(ResNetVNet(**kwargs, **SMALL_DEC), in_shape)
  assert y.shape == out_shape and y.dtype == jnp.float32


@pytest.mark.parametrize("trunk,layout", [("resnet18", "radnet"),
                                          ("resnet50", "medicalnet"),
                                          ("resnet_tiny", "radnet")])
def test_trunk_subtree_identical_to_resnet3d(trunk, layout):
  x = (1, 16, 32, 32, 1)
  _, v_cls = _shapes(get_model(trunk, layout=layout, heads={"plane": 3}), x)
  _, v_seg = _shapes(ResNetVNet({"preset": trunk, "layout": layout}), x)
  for col in ("params", "batch_stats"):
    a = jax.tree_util.tree_map(lambda l: (l.shape, l.dtype), v_cls[col]["trunk"])
    b = jax.tree_util.tree_map(lambda l: (l.shape, l.dtype), v_seg[col]["trunk"])
    assert a == b
  assert "head_plane" not in v_seg["params"]


def test_vnet_param_count_matches_monai():
  monai_nets = pytest.importorskip("monai.networks.nets")
  for act in ("elu", "prelu"):
    ref = monai_nets.VNet(spatial_dims=3, in_channels=1, out_channels=3,
                          act=act)
    _, v = _shapes(VNet(out_channels=3, act=act), (1, 16, 16, 16, 1))
    assert count_params(v) == sum(p.numel() for p in ref.parameters())


def test_vnet_impls_agree_in_train_mode():
  # Gradients of every lowering are covered op by op in test_conv.py; here the
  # whole network (5^3 convs, 2^3 down/up convs, dropout) must agree.
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 16, 16, 16, 1))
  models = {impl: VNet(out_channels=2, conv_impl=impl, **SMALL_VNET)
            for impl in ("xla", "taps")}
  v = jax.jit(lambda r: models["xla"].init(r, x, False))(_KEY)
  outs = {}
  for impl, m in models.items():
    outs[impl] = jax.jit(lambda v, m=m: m.apply(
        v, x, True, mutable=["batch_stats"],
        rngs={"dropout": jax.random.PRNGKey(3)}))(v)
  (ya, sa), (yb, sb) = outs["xla"], outs["taps"]
  assert ya.shape == (1, 16, 16, 16, 2) and np.isfinite(ya).all()
  np.testing.assert_allclose(yb, ya, rtol=1e-3, atol=1e-4)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
      sa, sb)


def test_resnet_vnet_loads_pretrained_trunk():
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 16, 16, 1))
  cls = ResNetTiny(heads={"plane": 3})
  seg = ResNetVNet("resnet_tiny", **SMALL_DEC)
  v_cls = jax.jit(lambda r: cls.init(r, x, False))(_KEY)
  v_seg = jax.jit(lambda r: seg.init(r, x, False))(jax.random.key(5, impl="unsafe_rbg"))
  v_seg = {col: {**v_seg[col], "trunk": v_cls[col]["trunk"]}
           for col in v_seg}
  # The segmentation encoder computes exactly the classifier's features.
  _, f_cls = jax.jit(lambda v: cls.apply(v, x, False))(v_cls)
  f_seg = jax.jit(lambda v: seg.apply(
      v, x, False, capture_intermediates=lambda m, _: m.name == "trunk",
      mutable=["intermediates"]))(v_seg)[1]["intermediates"]["trunk"]
  f_seg = f_seg["__call__"][0]
  for a, b in zip(f_cls, f_seg):
    np.testing.assert_array_equal(a, b)


def test_bad_inputs():
  with pytest.raises(ValueError, match="VNet wants"):
    _shapes(VNet(in_channels=1), (1, 16, 16, 16, 2))
  with pytest.raises(ValueError, match="unknown model"):
    trunk_kwargs("resnet7")
  with pytest.raises(ValueError, match="act must be"):
    _shapes(VNet(act="gelu"), (1, 16, 16, 16, 1))


def test_resnet_vnet_impls_agree_under_sharded_batch():
  # The trainer's setting: jit with the batch sharded over a data mesh whose
  # axes are Explicit (jax.make_mesh); the "taps" reshapes must keep the batch
  # sharding (a ShardingTypeError before) and agree with "xla", forward and
  # grad (op-by-op sharded cases, VNet's down convs included, in test_conv.py).
  from jax.sharding import NamedSharding, PartitionSpec as P

  from radnet_jax.training import trainer
  mesh = trainer.make_mesh()
  n = mesh.devices.size
  assert n == 8  # tests/conftest.py
  models = {impl: ResNetVNet({"stage_sizes": (1, 1, 1, 1), "num_filters": 4},
                             conv_impl=impl, decoder_filters=(8, 8, 4, 4, 4))
            for impl in ("xla", "taps")}
  shape = (n, 8, 16, 16, 1)
  x = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), shape),
                     NamedSharding(mesh, P("data")))
  v = jax.jit(lambda r: models["xla"].init(r, jnp.zeros((1,) + shape[1:]),
                                            False))(_KEY)
  # Replicated on the mesh, as trainer.create_train_state places the state.
  v = jax.device_put(v, NamedSharding(mesh, P()))

  outs = {}
  for impl, m in models.items():
    def loss(params, bs, m=m):
      y, upd = m.apply({"params": params, "batch_stats": bs}, x, True,
                       mutable=["batch_stats"])
      w = jnp.sin(jnp.arange(y.shape[-1], dtype=y.dtype))
      return jnp.mean(y * w + y ** 2), (y, upd["batch_stats"])
    grad_fn = jax.jit(jax.grad(loss, has_aux=True))
    g, (y, bs) = grad_fn(v["params"], v["batch_stats"])
    assert y.shape == shape[:4] + (2,)
    assert y.sharding.spec[0] == "data"  # the batch stays sharded
    outs[impl] = (y, g, bs)
  (ya, ga, sa), (yb, gb, sb) = outs["xla"], outs["taps"]
  assert np.isfinite(ya).all()
  np.testing.assert_allclose(yb, ya, rtol=1e-3, atol=1e-4)
  close = lambda a, b: np.testing.assert_allclose(b, a, rtol=2e-3, atol=1e-4)
  jax.tree_util.tree_map(close, ga, gb)
  jax.tree_util.tree_map(close, sa, sb)


def test_vnet_subpixel_up_convs_equal_dilated():
  # The GPU formulation of the up convolutions (one conv + depth-to-space)
  # against lax.conv_transpose, through the whole network on CPU: same
  # logits, same gradients for every parameter and the input.
  from radnet_jax.models import layers
  model = VNet(out_channels=2, conv_impl="xla", dropout_down=None,
               dropout_up=(None, None), **SMALL_VNET)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 16, 16, 16, 1)),
                  jnp.float32)
  variables = model.init(_KEY, x, False)

  def run(form):
    def loss(params, x):
      y = model.apply({**variables, "params": params}, x, False)
      return jnp.sum(jnp.sin(y)), y
    old = layers.TRANSPOSE_IMPL
    layers.TRANSPOSE_IMPL = form      # read while jit traces
    try:
      return jax.jit(jax.grad(loss, (0, 1), has_aux=True))(
          variables["params"], x)
    finally:
      layers.TRANSPOSE_IMPL = old
  (gp_a, gx_a), y_a = run("dilated")
  (gp_b, gx_b), y_b = run("subpixel")
  np.testing.assert_allclose(y_b, y_a, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gx_b, gx_a, rtol=1e-4, atol=1e-4)
  # float32 sums in another order: errors relative to each gradient's scale
  # (kernel gradients reach ~1e2 here).
  for a, b in zip(jax.tree_util.tree_leaves(gp_a),
                  jax.tree_util.tree_leaves(gp_b)):
    np.testing.assert_allclose(b, a, rtol=1e-4,
                               atol=1e-5 * float(np.abs(a).max()) + 1e-6)
