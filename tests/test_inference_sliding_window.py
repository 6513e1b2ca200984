"""Sliding-window inference: exactness, seams, padding, one compile."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radnet_jax.inference import sliding_window as inference


def _per_voxel(x):
  """Translation-equivariant, window-independent: 2 output channels."""
  return jnp.concatenate([jnp.sin(x), x ** 2 + 1.0], axis=-1)


def _conv_fn(seed=0, c_in=1, k=3):
  w = jax.random.normal(jax.random.PRNGKey(seed), (3, 3, 3, c_in, k))

  @jax.jit
  def f(x):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  return f


def test_window_covering_volume_equals_whole_volume():
  vol = np.random.default_rng(0).normal(size=(16, 32, 32)).astype(np.float32)
  f = _conv_fn()
  out = inference.sliding_window_inference(vol, (16, 32, 32), f, sw_batch_size=2)
  ref = f(vol[None, ..., None])[0]
  assert out.shape == (16, 32, 32, 3)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_overlapping_windows_are_seam_free(mode, overlap):
  vol = np.random.default_rng(1).normal(size=(16, 32, 32, 1)).astype(np.float32)
  out = inference.sliding_window_inference(vol, (8, 12, 10), jax.jit(_per_voxel),
                                           overlap=overlap, mode=mode,
                                           sw_batch_size=3)
  np.testing.assert_allclose(out, _per_voxel(vol), rtol=1e-5, atol=1e-6)


def test_volume_smaller_than_roi_is_padded_and_cropped():
  vol = np.random.default_rng(2).normal(size=(5, 20, 7)).astype(np.float32)
  out = inference.sliding_window_inference(vol, (8, 8, 8), jax.jit(_per_voxel))
  assert out.shape == (5, 20, 7, 2)
  np.testing.assert_allclose(out, _per_voxel(vol[..., None]), rtol=1e-5, atol=1e-6)


def test_batched_input_and_one_compile_per_roi():
  calls = []

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(x):
    calls.append(x.shape)
    return _per_voxel(x)

  rng = np.random.default_rng(3)
  for shape in [(12, 20, 20, 1), (17, 23, 9, 1), (2, 9, 9, 9, 1)]:
    vol = rng.normal(size=shape).astype(np.float32)
    out = inference.sliding_window_inference(vol, (6, 8, 8), f, sw_batch_size=5)
    assert out.shape == shape[:-1] + (2,)
    np.testing.assert_allclose(out, _per_voxel(vol), rtol=1e-5, atol=1e-6)
  assert calls == [(5, 6, 8, 8, 1)]


def test_blending_matches_monai_for_window_dependent_fn():
  torch = pytest.importorskip("torch")
  monai_inf = pytest.importorskip("monai.inferers")
  vol = np.random.default_rng(4).normal(size=(14, 21, 18)).astype(np.float32)
  roi = (8, 10, 12)

  # Output depends on the window (its mean): blending weights matter.
  def jf(x):
    return x + x.mean(axis=(1, 2, 3, 4), keepdims=True) * 3.0

  def tf(x):
    return x + x.mean(dim=(1, 2, 3, 4), keepdim=True) * 3.0

  for mode in ("gaussian", "constant"):
    ours = inference.sliding_window_inference(vol, roi, jax.jit(jf), overlap=0.4,
                                              mode=mode, sw_batch_size=4)
    theirs = monai_inf.sliding_window_inference(
        torch.from_numpy(vol)[None, None], roi, 4, tf, overlap=0.4, mode=mode)
    np.testing.assert_allclose(np.asarray(ours)[..., 0], theirs[0, 0].numpy(),
                               rtol=1e-4, atol=1e-4)


def test_window_starts_cover_and_end_at_border():
  starts = inference.window_starts((20, 9, 30), (8, 9, 16), 0.25)
  d = sorted({int(s) for s in starts[:, 0]})
  assert d == [0, 6, 12]                # stride int(8*0.75)=6, last ends at 20
  assert sorted({int(s) for s in starts[:, 1]}) == [0]
  assert sorted({int(s) for s in starts[:, 2]}) == [0, 12, 14]


def test_importance_map_shape_and_floor():
  w = inference.importance_map((8, 10, 12))
  assert w.shape == (8, 10, 12) and w.dtype == np.float32
  assert w.max() == pytest.approx(w[4, 5, 6], rel=1e-2) and w.min() >= 1e-3
  with pytest.raises(ValueError, match="blending mode"):
    inference.importance_map((4, 4, 4), mode="linear")
