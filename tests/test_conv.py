"""Conv lowerings: "taps" equals lax.conv_general_dilated (values and grads)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from radnet_jax.models import autotune, conv_lowering, layers
from radnet_jax.models.layers import (
    Conv3D, ConvTranspose3D, conv3d, conv_transpose3d, max_pool3d,
    resolve_impl, resolve_padding)

# (kernel, strides, dilation, padding, input shape (B, D, H, W, C), out ch)
CASES = [
    ((3, 3, 3), 1, 1, None, (2, 5, 7, 6, 3), 4),
    ((3, 3, 3), 2, 1, None, (2, 9, 8, 7, 3), 4),         # stride 2, odd sizes
    ((3, 3, 3), 2, 1, "SAME", (1, 8, 9, 6, 2), 3),       # lax SAME at stride 2
    ((7, 7, 7), 2, 1, None, (1, 9, 10, 11, 1), 4),       # MedicalNet stem
    ((3, 7, 7), (1, 2, 2), 1, None, (1, 5, 9, 10, 1), 4),  # paper stem
    ((3, 3, 3), 1, 2, None, (1, 6, 7, 8, 2), 3),         # dilated stage 3
    ((3, 3, 3), 1, 4, None, (1, 9, 9, 9, 2), 2),         # dilated stage 4
    ((1, 1, 1), 2, 1, None, (1, 5, 6, 7, 3), 4),         # projection shortcut
    ((2, 2, 2), 2, 1, 0, (1, 6, 8, 5, 3), 4),            # VNet down conv
    ((5, 5, 5), 1, 1, None, (1, 6, 5, 7, 2), 3),         # VNet conv
    ((1, 3, 3), 1, 1, "VALID", (1, 4, 7, 7, 2), 3),      # depth kernel 1
    ((3, 3, 3), (2, 1, 2), 1, ((0, 2), (1, 0), (2, 1)), (1, 6, 5, 7, 2), 3),
    # Few output channels: depth taps folded into the output (out-taps).
    ((5, 5, 5), 1, 1, None, (2, 6, 5, 7, 8), 2),         # VNet head 32 -> 2
    ((3, 3, 3), 1, 2, None, (1, 7, 6, 6, 8), 2),         # dilated
    ((3, 3, 3), (1, 2, 2), 1, ((0, 2), (1, 1), (0, 1)), (1, 5, 7, 8, 8), 1),
]


# IM2COL_MAX_PLANE: 0 = depth taps + 2D convs always, 10**9 = full im2col
# always; every case runs on both lowerings. split: the depth-tap conv in 1
# piece, or in 3 independent pieces along the output depth (the multi-core
# CPU path; fewer output slices than 3 give fewer pieces).
@pytest.mark.parametrize("im2col_plane,split", [(0, 1), (0, 3), (10**9, 1)])
@pytest.mark.parametrize("kernel,strides,dilation,padding,shape,out", CASES)
def test_taps_equals_lax(kernel, strides, dilation, padding, shape, out,
                         im2col_plane, split, monkeypatch):
  monkeypatch.setattr(conv_lowering, "IM2COL_MAX_PLANE", im2col_plane)
  monkeypatch.setattr(conv_lowering, "CONV_SPLIT", split)
  monkeypatch.setattr(conv_lowering, "CONV_SPLIT_MIN_FLOPS", 0)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(*kernel, shape[-1], out)) / 5, jnp.float32)
  s3 = (strides,) * 3 if isinstance(strides, int) else strides
  d3 = (dilation,) * 3
  pads = resolve_padding(padding, shape[1:4], kernel, s3, d3)

  def ref(x, w):
    return lax.conv_general_dilated(
        x, w, s3, pads, rhs_dilation=d3,
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        precision=lax.Precision.HIGHEST)

  def taps(x, w):
    return conv3d(x, w, strides, padding, dilation, impl="taps")

  @jax.jit
  def both(x, w):
    ya, vjp_a = jax.vjp(ref, x, w)
    yb, vjp_b = jax.vjp(taps, x, w)
    ct = jnp.sin(jnp.arange(ya.size, dtype=jnp.float32)).reshape(ya.shape)
    return ya, yb, vjp_a(ct), vjp_b(ct)

  ya, yb, (gxa, gwa), (gxb, gwb) = both(x, w)
  assert ya.shape == yb.shape
  np.testing.assert_allclose(yb, ya, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(gxb, gxa, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(gwb, gwa, rtol=1e-5, atol=2e-4)


# The Fourier path (`_conv3d_fft`), forced onto small volumes with 4^3 tiles
# so that several tiles, partial last tiles, a tile forced up to kernel - 1
# and depth pieces are all exercised: (kernel, padding, shape, out ch).
FFT_CASES = [
    ((5, 5, 5), None, (1, 9, 10, 11, 3), 4),       # VNet conv, 3 tiles/axis
    ((5, 5, 5), "VALID", (2, 12, 9, 8, 2), 3),      # no padding, batch 2
    ((5, 3, 5), ((0, 2), (1, 1), (3, 0)), (1, 7, 6, 9, 2), 2),  # uneven
    ((5, 5, 5), None, (1, 2, 9, 7, 2), 2),          # depth 2 < kernel - 1
]


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("kernel,padding,shape,out", FFT_CASES)
def test_fft_equals_lax(kernel, padding, shape, out, split, monkeypatch):
  monkeypatch.setattr(conv_lowering, "FFT_MIN_WORK", 0)
  monkeypatch.setattr(conv_lowering, "FFT_MIN_TAPS", 1)
  monkeypatch.setattr(conv_lowering, "FFT_MIN_CHANNELS", 1)
  monkeypatch.setattr(conv_lowering, "FFT_TILE", 4)
  monkeypatch.setattr(conv_lowering, "CONV_SPLIT", split)
  monkeypatch.setattr(conv_lowering, "CONV_SPLIT_MIN_FLOPS", 0)
  calls = []
  real = conv_lowering._conv3d_fft  # pylint: disable=protected-access
  monkeypatch.setattr(conv_lowering, "_conv3d_fft",
                      lambda *a: calls.append(a[2]) or real(*a))
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(*kernel, shape[-1], out)) / 5, jnp.float32)
  pads = resolve_padding(padding, shape[1:4], kernel, (1,) * 3, (1,) * 3)

  def ref(x, w):
    return lax.conv_general_dilated(
        x, w, (1, 1, 1), pads, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        precision=lax.Precision.HIGHEST)

  def fft(x, w):
    return conv3d(x, w, 1, padding, impl="taps")

  ya, vjp_a = jax.vjp(ref, x, w)
  yb, vjp_b = jax.vjp(fft, x, w)
  assert calls and calls[0] == ya.shape[1:4]
  ct = jnp.cos(jnp.arange(ya.size, dtype=jnp.float32)).reshape(ya.shape)
  (gxa, gwa), (gxb, gwb) = vjp_a(ct), vjp_b(ct)
  assert yb.shape == ya.shape and yb.dtype == jnp.float32
  np.testing.assert_allclose(yb, ya, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(gxb, gxa, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(gwb, gwa, rtol=1e-5, atol=5e-4)


@pytest.mark.parametrize("devices", [1, 2])
def test_fft_under_data_mesh(devices, monkeypatch):
  # The trainer's jit on a 1-device Explicit mesh takes the Fourier path (its
  # reshapes merge the batch axis with the tiles and must keep the batch
  # sharding); a batch split over 2 devices uses the direct path.
  from jax.sharding import NamedSharding, PartitionSpec as P

  from radnet_jax.training import trainer
  monkeypatch.setattr(conv_lowering, "FFT_MIN_WORK", 0)
  monkeypatch.setattr(conv_lowering, "FFT_TILE", 4)
  calls = []
  real = conv_lowering._conv3d_fft  # pylint: disable=protected-access
  monkeypatch.setattr(conv_lowering, "_conv3d_fft",
                      lambda *a: calls.append(1) or real(*a))
  mesh = trainer.make_mesh(devices)
  rng = np.random.default_rng(5)
  x = jax.device_put(jnp.asarray(rng.normal(size=(2, 7, 6, 9, 8)),
                                 jnp.float32), NamedSharding(mesh, P("data")))
  w = jax.device_put(jnp.asarray(rng.normal(size=(5, 5, 5, 8, 8)) / 5,
                                 jnp.float32), NamedSharding(mesh, P()))

  def loss(x, w, impl):
    y = conv3d(x, w, impl=impl)
    return jnp.sum(jnp.sin(y)), y
  grads = {impl: jax.jit(jax.grad(loss, (0, 1), has_aux=True),
                         static_argnums=2)(x, w, impl)
           for impl in ("xla", "taps")}
  assert len(calls) == (devices == 1)
  (gxa, gwa), ya = grads["xla"]
  (gxb, gwb), yb = grads["taps"]
  assert yb.sharding.spec[0] == "data" and gxb.sharding.spec[0] == "data"
  np.testing.assert_allclose(yb, ya, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(gxb, gxa, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(gwb, gwa, rtol=1e-5, atol=5e-4)


def test_fft_chosen_for_big_kernels_on_large_volumes():
  # The rule on shapes only (nothing is computed): VNet's 5^3 convs at a 64^3
  # input with 8..64 channels go through the Fourier path, thin, strided,
  # small-kernel and small-volume convs do not.
  use = conv_lowering._use_fft  # pylint: disable=protected-access

  def rule(shape, kernel, strides=(1, 1, 1), out=None, pad=2):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return use(x, jax.ShapeDtypeStruct(kernel, jnp.float32), strides,
               [(pad, pad)] * 3, (1, 1, 1), out or shape[1:4])
  assert rule((1, 64, 64, 64, 32), (5, 5, 5, 32, 32))
  assert rule((2, 64, 64, 64, 64), (5, 5, 5, 64, 64))
  assert rule((1, 32, 64, 64, 16), (5, 5, 5, 16, 32))     # sliding-window ROI
  assert not rule((1, 64, 64, 64, 1), (5, 5, 5, 1, 16))    # input transition
  assert not rule((1, 64, 64, 64, 32), (5, 5, 5, 32, 2))   # head: out-taps
  assert rule((1, 32, 32, 32, 64), (5, 5, 5, 64, 64))      # VNet up64
  assert not rule((1, 24, 24, 24, 32), (5, 5, 5, 32, 32))  # small volume
  assert not rule((1, 32, 32, 32, 16), (5, 5, 5, 16, 16))
  assert not rule((1, 64, 64, 64, 32), (3, 3, 3, 32, 32))  # 3^3
  assert not rule((1, 64, 64, 64, 128), (5, 5, 5, 128, 128))
  assert not rule((1, 64, 64, 64, 32), (5, 5, 5, 32, 32), (2, 2, 2),
                  (32, 32, 32))
  assert not rule((1, 64, 64, 64, 32), (5, 5, 5, 32, 32), pad=-1,
                  out=(58, 58, 58))
  # Tiles: 16^3, halved while a batch holds fewer than 16 tiles (not below
  # 8), at least kernel - 1 along a short axis.
  tiles = conv_lowering._fft_tiles  # pylint: disable=protected-access
  assert tiles(1, (64, 64, 64), (5, 5, 5)) == [16, 16, 16]
  assert tiles(1, (32, 32, 32), (5, 5, 5)) == [8, 8, 8]
  assert tiles(2, (32, 32, 32), (5, 5, 5)) == [16, 16, 16]
  assert tiles(1, (2, 70, 66), (5, 5, 5)) == [4, 16, 16]
  assert tiles(1, (2, 20, 20), (5, 5, 5)) == [4, 8, 8]


def test_transpose_matches_torch_semantics_and_impls():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 3, 4, 5, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(2, 2, 2, 3, 4)), jnp.float32)
  ya = conv_transpose3d(x, w, 2, impl="xla")
  yb = conv_transpose3d(x, w, 2, impl="taps")
  assert ya.shape == (2, 6, 8, 10, 4)
  np.testing.assert_allclose(yb, ya, rtol=1e-5, atol=1e-5)
  # Output voxel (2i + a) receives x[i] @ w[a] (PyTorch ConvTranspose3d).
  np.testing.assert_allclose(yb[0, 3, 4, 7], x[0, 1, 2, 3] @ w[1, 0, 1],
                             rtol=1e-5)
  # Anisotropic (1, 2, 2): only the xla path is general; both must agree.
  w2 = w[:1]
  np.testing.assert_allclose(conv_transpose3d(x, w2, (1, 2, 2), "taps"),
                             conv_transpose3d(x, w2, (1, 2, 2), "xla"),
                             rtol=1e-5, atol=1e-5)


def test_modules_share_params_across_impls():
  x = jnp.ones((1, 4, 6, 6, 2))
  shapes = {}
  for impl in ("xla", "taps", "auto"):
    for cls in (Conv3D, ConvTranspose3D):
      v = jax.eval_shape(lambda: cls(3, conv_impl=impl).init(
          jax.random.PRNGKey(0), x))
      shapes[(cls.__name__, impl)] = jax.tree_util.tree_map(
          lambda l: l.shape, v)
  assert shapes[("Conv3D", "xla")] == shapes[("Conv3D", "taps")] == {
      "params": {"kernel": (3, 3, 3, 2, 3)}}
  assert shapes[("ConvTranspose3D", "xla")] == \
      shapes[("ConvTranspose3D", "taps")]


def test_depth_pieces_follow_cores_size_and_sharding(monkeypatch):
  # One piece per usable core, never more than output slices, none smaller
  # than CONV_SPLIT_MIN_FLOPS; a batch already split over devices is not
  # split again.
  x = jnp.ones((1, 8, 6, 6, 2))   # 6x6 planes: above IM2COL_MAX_PLANE
  monkeypatch.setattr(conv_lowering, "CONV_SPLIT", None)
  monkeypatch.setattr(conv_lowering, "usable_cores", lambda: 4)
  n_pieces = conv_lowering._n_pieces  # pylint: disable=protected-access
  assert n_pieces(x, 8, 1e12) == 4
  assert n_pieces(x, 3, 1e12) == 3
  assert n_pieces(x, 8, 1.2e8) == 2
  assert n_pieces(x, 8, 1e6) == 1
  monkeypatch.setattr(conv_lowering, "CONV_SPLIT", 1)
  assert n_pieces(x, 8, 1e12) == 1
  # The split shows in the compiled program: 2 pieces = 2 convolutions.
  monkeypatch.setattr(conv_lowering, "CONV_SPLIT", 2)
  monkeypatch.setattr(conv_lowering, "CONV_SPLIT_MIN_FLOPS", 0)
  w = jnp.ones((3, 3, 3, 2, 3))
  hlo = jax.jit(lambda x, w: conv3d(x, w, impl="taps")).lower(x, w).as_text()
  assert hlo.count("stablehlo.convolution") == 2


def test_out_taps_chosen_for_few_output_channels(monkeypatch):
  calls = []
  real = conv_lowering._conv3d_out_taps  # pylint: disable=protected-access
  monkeypatch.setattr(conv_lowering, "_conv3d_out_taps",
                      lambda *a: calls.append(a[1].shape) or real(*a))
  x = jnp.ones((1, 6, 8, 8, 8))
  conv3d(x, jnp.ones((5, 5, 5, 8, 2)), impl="taps")   # 8 -> 2: out-taps
  conv3d(x, jnp.ones((5, 5, 5, 8, 8)), impl="taps")   # 8 -> 8: input taps
  conv3d(x, jnp.ones((3, 3, 3, 8, 2)), 2, impl="taps")  # depth stride 2
  assert calls == [(5, 5, 5, 8, 2)]


def test_resolve_impl():
  assert resolve_impl("auto") == ("taps" if jax.default_backend() == "cpu"
                                  else "xla")
  with pytest.raises(ValueError, match="conv_impl"):
    resolve_impl("cudnn")
  with pytest.raises(ValueError, match="channels"):
    conv3d(jnp.ones((1, 4, 4, 4, 2)), jnp.ones((3, 3, 3, 3, 1)))


# (op, kernel, strides): the taps paths that reshape (patchify down conv,
# depth-tap 2D conv, 1x1x1 matmul, kernel == stride transposed conv).
SHARDED_CASES = [("conv", (2, 2, 2), 2), ("conv", (3, 3, 3), 2),
                 ("conv", (1, 1, 1), 1), ("transpose", (2, 2, 2), 2)]


@pytest.mark.parametrize("op,kernel,strides", SHARDED_CASES)
def test_taps_under_sharded_batch(op, kernel, strides):
  # jax.make_mesh axes are Explicit: a reshape that splits or merges several
  # axis groups at once raised ShardingTypeError under the trainer's
  # batch-sharded jit. Values, grads and the output sharding must match xla.
  from jax.sharding import NamedSharding, PartitionSpec as P

  from radnet_jax.training import trainer
  mesh = trainer.make_mesh()
  rng = np.random.default_rng(2)
  x = jax.device_put(jnp.asarray(rng.normal(size=(8, 4, 6, 6, 3)), jnp.float32),
                     NamedSharding(mesh, P("data")))
  w = jax.device_put(jnp.asarray(rng.normal(size=(*kernel, 3, 4)) / 5,
                                 jnp.float32), NamedSharding(mesh, P()))

  def run(impl):
    def f(x, w):
      if op == "conv":
        return conv3d(x, w, strides, None, 1, impl=impl)
      return conv_transpose3d(x, w, strides, impl=impl)

    def loss(x, w):
      y = f(x, w)
      return jnp.sum(jnp.sin(y)), y
    (gx, gw), y = jax.jit(jax.grad(loss, (0, 1), has_aux=True))(x, w)
    return y, gx, gw

  ya, gxa, gwa = run("xla")
  yb, gxb, gwb = run("taps")
  assert yb.sharding.spec[0] == "data" and gxb.sharding.spec[0] == "data"
  np.testing.assert_allclose(yb, ya, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(gxb, gxa, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(gwb, gwa, rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("window,strides,padding,shape", [
    (3, 2, ((1, 1),) * 3, (2, 8, 9, 6, 3)),       # ResNet stem pool
    (2, 2, ((0, 0),) * 3, (1, 6, 4, 5, 2)),       # kernel == stride, odd size
    ((1, 3, 3), (1, 2, 2), None, (1, 3, 7, 8, 2)),
])
def test_max_pool_taps_equals_xla(window, strides, padding, shape):
  # Rounded ReLU outputs: many ties (zeros and repeated values), where the
  # gradient must still go to the first maximum of each window, like XLA's
  # select-and-scatter.
  rng = np.random.default_rng(3)
  x = jnp.asarray(np.maximum(np.round(rng.normal(size=shape) * 2), 0),
                  jnp.float32)

  def run(impl):
    y, vjp = jax.vjp(lambda x: max_pool3d(x, window, strides, padding, impl),
                     x)
    ct = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return y, vjp(ct)[0]

  ya, ga = jax.jit(lambda x: run("xla"))(x)
  yb, gb = jax.jit(lambda x: run("taps"))(x)
  assert yb.shape == ya.shape
  np.testing.assert_array_equal(yb, ya)
  np.testing.assert_allclose(gb, ga, rtol=1e-6, atol=1e-6)
  # Every output's cotangent lands on exactly one input (sums agree).
  np.testing.assert_allclose(
      gb.sum(), jnp.cos(jnp.arange(ya.size, dtype=jnp.float32)).sum(),
      rtol=1e-4, atol=1e-4)


def test_batch_sharding_kept_on_unit_volume_and_channel_dropout():
  # A 1x1x1 volume (VNet's deepest level at 16^3) lost the "data" sharding
  # in the taps transposed conv, and flax Dropout's broadcast mask was
  # unsharded: both raised ShardingTypeError inside VNet under the trainer.
  from jax.sharding import NamedSharding, PartitionSpec as P

  from radnet_jax.training import trainer
  from radnet_jax.models import vnet
  mesh = trainer.make_mesh()
  n = mesh.devices.size
  rng = np.random.default_rng(4)
  x = jax.device_put(jnp.asarray(rng.normal(size=(n, 1, 1, 1, 3)), jnp.float32),
                     NamedSharding(mesh, P("data")))
  w = jnp.asarray(rng.normal(size=(2, 2, 2, 3, 4)), jnp.float32)
  y = jax.jit(lambda x: conv_transpose3d(x, w, 2, impl="taps"))(x)
  assert y.shape == (n, 2, 2, 2, 4) and y.sharding.spec[0] == "data"
  np.testing.assert_allclose(y, conv_transpose3d(np.asarray(x), w, 2, "xla"),
                             rtol=1e-5, atol=1e-5)

  drop = vnet._Dropout3d(0.5)  # pylint: disable=protected-access
  v = jax.device_put(jnp.ones((n, 2, 3, 3, 6)), NamedSharding(mesh, P("data")))
  out = jax.jit(lambda v: drop.apply({}, v, False,
                                     rngs={"dropout": jax.random.key(0)}))(v)
  assert out.sharding.spec[0] == "data"
  out = np.asarray(out)
  # Whole channels of each example are dropped (0) or kept (scaled by 2).
  per_channel = out.reshape(n, -1, 6)
  assert set(np.unique(per_channel)) <= {0.0, 2.0}
  assert np.all(per_channel.min(axis=1) == per_channel.max(axis=1))


# ---- per-machine autotuning of the CPU lowering -------------------------

def _autotune_on(monkeypatch, tmp_path):
  monkeypatch.setattr(autotune, "CONV_AUTOTUNE", True)
  monkeypatch.setattr(autotune, "AUTOTUNE_MIN_FLOPS", 0)
  monkeypatch.setattr(autotune, "AUTOTUNE_REPEATS", 1)
  monkeypatch.setenv("RADNET_CACHE", str(tmp_path))
  monkeypatch.setattr(autotune, "_TUNED", {})
  monkeypatch.setattr(autotune, "_TUNE_LOG", {})
  monkeypatch.setattr(autotune, "_CACHE_STATE", {})


def _fake_timer(monkeypatch, times):
  calls = []

  def timer(name, *a):
    calls.append(name)
    return times[name]
  monkeypatch.setattr(autotune, "_time_lowering", timer)
  return calls


def test_autotune_off_by_env_uses_rules(monkeypatch, tmp_path):
  _autotune_on(monkeypatch, tmp_path)
  monkeypatch.setattr(autotune, "CONV_AUTOTUNE", None)
  monkeypatch.setenv("RADNET_CONV_AUTOTUNE", "0")
  assert not autotune.autotune_enabled()
  calls = _fake_timer(monkeypatch, {})
  x, w = jnp.ones((1, 6, 8, 8, 8)), jnp.ones((5, 5, 5, 8, 2))
  jax.jit(lambda x, w: conv3d(x, w, impl="taps")).lower(x, w)
  assert calls == [] and not (tmp_path / "conv_autotune").exists()
  monkeypatch.setenv("RADNET_CONV_AUTOTUNE", "1")
  assert autotune.autotune_enabled()


@pytest.mark.parametrize("kernel,strides,shape,out,fastest", [
    ((5, 5, 5), 1, (1, 6, 8, 8, 8), 2, "depth_taps"),  # rule says out_taps
    ((5, 5, 5), 1, (1, 6, 7, 9, 4), 4, "fft"),         # rule: direct
    ((3, 3, 3), 1, (2, 5, 4, 4, 3), 3, "out_taps"),    # rule: im2col
])
def test_autotune_picks_fastest_caches_and_keeps_numerics(
    kernel, strides, shape, out, fastest, monkeypatch, tmp_path):
  _autotune_on(monkeypatch, tmp_path)
  monkeypatch.setattr(conv_lowering, "FFT_TILE", 4)
  x = jnp.asarray(np.random.default_rng(6).normal(size=shape), jnp.float32)
  w = jnp.asarray(np.random.default_rng(7).normal(size=(*kernel, shape[-1],
                                                        out)) / 5, jnp.float32)
  pads = resolve_padding(None, shape[1:4], kernel, (strides,) * 3, (1,) * 3)
  out_size = tuple(lax.conv_general_dilated(
      x, w, (strides,) * 3, pads,
      dimension_numbers=("NDHWC", "DHWIO", "NDHWC")).shape[1:4])
  args = (x, w, (strides,) * 3, pads, (1, 1, 1), out_size)
  cands = autotune.candidate_lowerings(*args)
  rule = conv_lowering.rule_lowering(*args)
  assert fastest in cands and rule in cands and fastest != rule
  times = {n: 1.0 for n in cands}
  times[fastest] = 0.5
  calls = _fake_timer(monkeypatch, times)
  traces = []

  def loss(x, w):
    traces.append(1)
    y = conv3d(x, w, strides, impl="taps")
    return jnp.sum(jnp.sin(y)), y
  step = jax.jit(jax.grad(loss, (0, 1), has_aux=True))
  for _ in range(3):
    (gx, gw), y = step(x, w)
  # Tuned once at the first trace, the jitted function traced once.
  assert sorted(calls) == sorted(cands) and len(traces) == 1
  log = autotune.autotune_log()
  (key, entry), = log.items()
  assert entry["choice"] == fastest and entry["rule"] == rule
  # The cache file holds the choice under this machine's key.
  path = autotune.autotune_cache_path()
  assert path.startswith(str(tmp_path))
  data = json.loads(open(path).read())
  assert data["entries"][key]["choice"] == fastest
  assert data["machine"]["cpu"] == autotune.cpu_id()
  assert not [f for f in os.listdir(os.path.dirname(path))
              if f.startswith(".")]                  # no temporaries left
  # A new process (empty in-memory table) reads it without timing again.
  monkeypatch.setattr(autotune, "_TUNED", {})
  assert autotune.choose_lowering(*args) == fastest and len(calls) == len(cands)
  # The tuned lowering equals lax.conv_general_dilated in values and grads.
  (gxa, gwa), ya = jax.jit(jax.grad(
      lambda x, w: (jnp.sum(jnp.sin(conv3d(x, w, strides, impl="xla"))),
                    conv3d(x, w, strides, impl="xla")),
      (0, 1), has_aux=True))(x, w)
  np.testing.assert_allclose(y, ya, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(gx, gxa, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(gw, gwa, rtol=1e-5, atol=5e-4)


def test_autotune_keeps_rule_within_margin_and_skips_small(monkeypatch,
                                                           tmp_path):
  _autotune_on(monkeypatch, tmp_path)
  x, w = jnp.ones((1, 6, 8, 8, 8)), jnp.ones((5, 5, 5, 8, 2))
  args = (x, w, (1, 1, 1), [(2, 2)] * 3, (1, 1, 1), (6, 8, 8))
  rule = conv_lowering.rule_lowering(*args)
  times = {n: 1.0 for n in autotune.candidate_lowerings(*args)}
  times["depth_taps"] = 0.97            # within AUTOTUNE_MARGIN of the rule
  _fake_timer(monkeypatch, times)
  assert autotune.choose_lowering(*args) == rule == "out_taps"
  # Convs below AUTOTUNE_MIN_FLOPS follow the rules without timing.
  monkeypatch.setattr(autotune, "AUTOTUNE_MIN_FLOPS", 1e12)
  monkeypatch.setattr(autotune, "_TUNED", {})
  calls = _fake_timer(monkeypatch, {})
  assert autotune.choose_lowering(*args) == rule and calls == []


def test_autotune_unwritable_cache_falls_back_to_rules(monkeypatch, tmp_path):
  _autotune_on(monkeypatch, tmp_path)
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  monkeypatch.setenv("RADNET_CACHE", str(blocker))
  calls = _fake_timer(monkeypatch, {"depth_taps": 0.1, "out_taps": 1.0,
                                    "fft": 1.0, "im2col": 1.0})
  x, w = jnp.ones((1, 6, 8, 8, 8)), jnp.ones((5, 5, 5, 8, 2))
  args = (x, w, (1, 1, 1), [(2, 2)] * 3, (1, 1, 1), (6, 8, 8))
  assert autotune.choose_lowering(*args) == "out_taps" and calls == []


def test_autotune_times_real_candidates(monkeypatch, tmp_path):
  # The real timer on a tiny conv: every candidate compiles and runs, the
  # chosen lowering is one of them and the file records all the times.
  _autotune_on(monkeypatch, tmp_path)
  x = jnp.asarray(np.random.default_rng(8).normal(size=(1, 4, 6, 6, 4)),
                  jnp.float32)
  w = jnp.asarray(np.random.default_rng(9).normal(size=(5, 5, 5, 4, 2)),
                  jnp.float32)
  y = jax.jit(lambda x, w: conv3d(x, w, impl="taps"))(x, w)
  (entry,) = autotune.autotune_log().values()
  assert set(entry["ms"]) == {"depth_taps", "out_taps", "im2col", "fft"}
  assert all(t > 0 for t in entry["ms"].values())
  assert entry["choice"] in entry["ms"]
  np.testing.assert_allclose(y, conv3d(x, w, impl="xla"), rtol=1e-5,
                             atol=1e-4)


# ---- the GPU formulation of the transposed conv, checked on CPU ---------

# (kernel, strides, input shape, out channels)
TRANSPOSE_CASES = [
    ((2, 2, 2), 2, (2, 3, 4, 5, 3), 4),        # VNet up conv
    ((1, 2, 2), (1, 2, 2), (1, 3, 4, 2, 2), 3),  # anisotropic
    ((3, 3, 3), 2, (1, 3, 2, 4, 2), 3),        # kernel not a stride multiple
    ((4, 3, 5), (2, 1, 3), (1, 2, 3, 3, 2), 2),
    ((2, 2, 2), 2, (1, 1, 1, 1, 3), 2),        # 1^3 input (deepest VNet level)
]


@pytest.mark.parametrize("kernel,strides,shape,out", TRANSPOSE_CASES)
def test_subpixel_transpose_equals_dilated(kernel, strides, shape, out):
  rng = np.random.default_rng(10)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(*kernel, shape[-1], out)) / 3, jnp.float32)

  def run(impl, form):
    def loss(x, w):
      y = conv_transpose3d(x, w, strides, impl, form)
      return jnp.sum(jnp.sin(y)), y
    (gx, gw), y = jax.jit(jax.grad(loss, (0, 1), has_aux=True))(x, w)
    return y, gx, gw
  ref = run("xla", "dilated")
  got = run("xla", "subpixel")
  s3 = (strides,) * 3 if isinstance(strides, int) else strides
  assert got[0].shape == tuple([shape[0]] + [(n - 1) * s + k for n, s, k in
                                             zip(shape[1:4], s3, kernel)]
                               + [out])
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  if tuple(kernel) == s3:            # and the CPU (taps) path
    for a, b in zip(run("taps", None), ref):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_transpose_formulation_per_backend(monkeypatch):
  monkeypatch.delenv("RADNET_TRANSPOSE_IMPL", raising=False)
  assert layers.transpose_formulation("gpu") == "subpixel"
  assert layers.transpose_formulation("cpu") == "dilated"
  assert layers.transpose_formulation("tpu") == "dilated"
  monkeypatch.setenv("RADNET_TRANSPOSE_IMPL", "dilated")
  assert layers.transpose_formulation("gpu") == "dilated"
  monkeypatch.setattr(layers, "TRANSPOSE_IMPL", "subpixel")
  assert layers.transpose_formulation("cpu") == "subpixel"
  monkeypatch.setattr(layers, "TRANSPOSE_IMPL", "direct")
  with pytest.raises(ValueError, match="formulation"):
    layers.transpose_formulation("gpu")
  # The CPU default path ("taps") ignores the formulation: VNet's 2^3 up
  # conv stays one dot, no convolution, whatever is set.
  monkeypatch.setattr(layers, "TRANSPOSE_IMPL", "subpixel")
  x, w = jnp.ones((1, 2, 3, 4, 3)), jnp.ones((2, 2, 2, 3, 4))
  hlo = jax.jit(lambda x, w: conv_transpose3d(x, w, 2, "taps")).lower(
      x, w).as_text()
  assert "convolution" not in hlo and "dot_general" in hlo
  # The formulations themselves: an input-dilated conv vs a 1x1x1 conv.
  def lhs_dilations(form):
    hlo = jax.jit(lambda x, w: conv_transpose3d(x, w, 2, "xla", form)).lower(
        x, w).as_text()
    assert hlo.count("stablehlo.convolution") == 1
    return hlo.split("lhs_dilate = [", 1)[1].split("]", 1)[0]
  assert lhs_dilations("dilated") == "2, 2, 2"
  assert lhs_dilations("subpixel") == "1, 1, 1"
