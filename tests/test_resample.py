import numpy as np
import pytest

from radnet_jax import resample as rs


def _affine(spacing, origin, perm=(0, 1, 2), flips=(1, 1, 1)):
  """A canonical-like affine: axis permutation/flips times spacing plus origin."""
  a = np.zeros((4, 4))
  for col, (row, f) in enumerate(zip(perm, flips)):
    a[row, col] = f * spacing[col]
  a[:3, 3] = origin
  a[3, 3] = 1.0
  return a


@pytest.mark.parametrize("in_shape,out_shape", [
    ((7, 20, 33), (3, 8, 11)),     # downsample every axis
    ((7, 20, 33), (14, 40, 33)),   # upsample + identity
    ((5, 9, 64), (5, 9, 7)),       # strong reduction, several blocks
    ((4, 4, 4), (1, 1, 1)),
])
def test_resize_matches_jax_reference(in_shape, out_shape):
  jax = pytest.importorskip("jax")
  x = np.random.default_rng(0).normal(size=in_shape).astype(np.float32) * 100
  ours = rs.resize(x, out_shape)
  ref = np.asarray(jax.image.resize(x, out_shape, "linear", antialias=True))
  assert ours.shape == out_shape and ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=1e-5)


def _dense_reference(x, out_shape):
  """The separable operator as three float64 dense products (slow, exact)."""
  ws = [rs.weight_matrix(n, s) for n, s in zip(x.shape, out_shape)]
  return np.einsum("ad,be,cf,def->abc", *ws, x.astype(np.float64),
                   optimize=True)


@pytest.mark.parametrize("strategy", ["depth", "plane"])
@pytest.mark.parametrize("in_shape,out_shape", [
    ((23, 40, 36), (6, 15, 12)),    # CT-like: every axis shrinks
    ((5, 30, 28), (12, 12, 10)),    # few thick slices upsampled, plane shrinks
    ((9, 12, 50), (4, 30, 20)),     # H grows, W shrinks (one pass order)
    ((9, 50, 12), (4, 20, 30)),     # H shrinks, W grows (the other)
    ((6, 16, 16), (3, 16, 16)),     # in-plane identity
    ((6, 16, 16), (6, 8, 16)),      # D and W identity
    ((1, 9, 9), (4, 3, 3)),         # a single slice
])
def test_both_streaming_strategies_match_dense_reference(monkeypatch, strategy,
                                                         in_shape, out_shape):
  x = np.random.default_rng(1).normal(size=in_shape).astype(np.float32) * 300
  monkeypatch.setattr(rs, "_strategy", lambda *a: strategy)
  ours = rs.resize(x, out_shape)
  assert ours.shape == out_shape and ours.dtype == np.float32
  np.testing.assert_allclose(ours, _dense_reference(x, out_shape), atol=2e-3,
                             rtol=1e-5)


def test_strategy_and_pass_order_follow_cost():
  def choose(in_shape, out_shape):
    (d_in, h_in, w_in), (d, h, w) = in_shape, out_shape
    plane = rs._Plane(rs._Axis(h_in, h), rs._Axis(w_in, w))
    ad = rs._Axis(d_in, d, row_block=1, col_block=1)
    return rs._strategy(ad, plane, h_in * w_in, h * w), plane.h_first
  # A thin-slice CT: mix slices first (48 in-plane resizes instead of 185).
  assert choose((185, 512, 512), (48, 192, 192)) == ("depth", True)
  # A few thick slices upsampled along D: resize the 30 slices first.
  assert choose((30, 256, 256), (48, 192, 192))[0] == "plane"
  # Many small slices enlarged in plane: mix along D first, on the small slices.
  assert choose((1000, 64, 64), (48, 192, 192))[0] == "depth"


def test_resize_streams_without_full_size_intermediate():
  import tracemalloc
  x = np.random.default_rng(2).normal(size=(64, 128, 128)).astype(np.float32)
  tracemalloc.start()
  try:
    out = rs.resize(x, (16, 48, 48))
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  # Output (0.15 MB) + one mixed slice (64 kB) + scratch, for a 4 MB input; a
  # pass-by-pass resize allocates a (16, 128, 128) intermediate (1 MB).
  assert peak < 0.15 * x.nbytes, peak
  np.testing.assert_allclose(out, _dense_reference(x, (16, 48, 48)), atol=1e-4)


def test_resize_accepts_integer_and_non_contiguous_input():
  x = np.random.default_rng(3).integers(-1024, 3000, (10, 24, 20), dtype=np.int16)
  flipped = x[::-1, :, ::-1]
  ref = rs.resize(np.ascontiguousarray(flipped, np.float32), (4, 8, 8))
  np.testing.assert_array_equal(rs.resize(flipped, (4, 8, 8)), ref)
  np.testing.assert_allclose(ref, _dense_reference(flipped, (4, 8, 8)), atol=1e-3)


@pytest.mark.parametrize("out_shape", [(16, 48, 48), (80, 48, 48)])
def test_integer_volume_is_converted_band_by_band(out_shape):
  import tracemalloc
  x = np.random.default_rng(4).integers(-1024, 3000, (64, 128, 128),
                                        dtype=np.int16)
  tracemalloc.start()
  try:
    out = rs.resize(x, out_shape)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  # A float32 copy of the whole volume would be 2x its int16 size.
  assert peak < 0.6 * x.nbytes + out.nbytes, peak
  np.testing.assert_array_equal(out, rs.resize(x.astype(np.float32), out_shape))


def test_weight_matrix_rows_sum_to_one_and_identity():
  for n_in, n_out in [(512, 192), (150, 48), (3, 10), (1, 5)]:
    w = rs.weight_matrix(n_in, n_out)
    assert w.shape == (n_out, n_in)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
  np.testing.assert_allclose(rs.weight_matrix(6, 6), np.eye(6))


def test_resize_preserves_constants_and_linear_ramps():
  const = np.full((10, 30, 40), 42.0, np.float32)
  np.testing.assert_allclose(rs.resize(const, (4, 12, 16)), 42.0, rtol=1e-6)
  # A linear ramp along W sampled at the new centres stays linear in the interior
  # (the triangle filter is symmetric, so it reproduces linear functions).
  w = np.arange(40, dtype=np.float32)
  ramp = np.broadcast_to(w, (2, 3, 40)).copy()
  out = rs.resize(ramp, (2, 3, 10))
  centres = (np.arange(10) + 0.5) * 4 - 0.5
  np.testing.assert_allclose(out[0, 0, 1:-1], centres[1:-1], atol=1e-4)


def test_antialiasing_removes_nyquist_checkerboard():
  # A +-1 checkerboard at the input's Nyquist frequency must vanish when the
  # grid shrinks by 4 (plain subsampling would keep it at full amplitude).
  d, h, w = np.indices((8, 64, 64))
  board = np.where((h + w) % 2 == 0, 1.0, -1.0).astype(np.float32)
  out = rs.resize(board, (8, 16, 16))
  assert np.abs(out).max() < 0.05


def test_resampled_affine_keeps_corners_within_half_voxel():
  in_shape, out_shape = (37, 120, 100), (8, 32, 32)
  spacing = np.array([2.5, 0.7, 0.8])
  aff = _affine(spacing, origin=[-120.0, 30.5, 88.0], perm=(2, 1, 0),
                flips=(-1, 1, 1))
  res = rs.resample(np.zeros(in_shape, np.float32), aff, spacing, out_shape)
  np.testing.assert_allclose(res.spacing, spacing * np.array(in_shape) / out_shape)
  # The new affine's columns have the new spacing as length.
  np.testing.assert_allclose(np.linalg.norm(res.affine[:3, :3], axis=0), res.spacing)
  for corner in np.ndindex(2, 2, 2):
    i_in = np.array(corner) * (np.array(in_shape) - 1)
    i_out = np.array(corner) * (np.array(out_shape) - 1)
    p_in = aff @ np.append(i_in, 1.0)
    p_out = res.affine @ np.append(i_out, 1.0)
    # Per axis the corner centre moves by (new - old spacing) / 2 < new / 2.
    delta = np.abs(np.linalg.solve(res.affine[:3, :3], (p_out - p_in)[:3]))
    assert np.all(delta <= 0.5 + 1e-9), (corner, delta)
  # The physical field of view (outer voxel edges) is preserved exactly.
  fov_in = np.array(in_shape) * spacing
  fov_out = np.array(out_shape) * res.spacing
  np.testing.assert_allclose(fov_in, fov_out)
  # Centre of the volume maps to the same LPS point.
  c_in = aff @ np.append((np.array(in_shape) - 1) / 2, 1.0)
  c_out = res.affine @ np.append((np.array(out_shape) - 1) / 2, 1.0)
  np.testing.assert_allclose(c_in, c_out, atol=1e-9)


def test_resampled_values_follow_the_affine():
  # A volume whose voxel value is its LPS z coordinate keeps that property
  # after resampling (linear function, interior voxels).
  in_shape, out_shape = (30, 16, 16), (10, 8, 8)
  spacing = np.array([1.5, 1.0, 1.0])
  aff = _affine(spacing, origin=[0.0, 0.0, 50.0], perm=(2, 1, 0), flips=(-1, 1, 1))
  idx = np.indices(in_shape).reshape(3, -1)
  z = (aff[:3, :3] @ idx + aff[:3, 3:])[2].reshape(in_shape).astype(np.float32)
  res = rs.resample(z, aff, spacing, out_shape)
  idx_o = np.indices(out_shape).reshape(3, -1)
  z_o = (res.affine[:3, :3] @ idx_o + res.affine[:3, 3:])[2].reshape(out_shape)
  np.testing.assert_allclose(res.voxels[1:-1], z_o[1:-1], atol=1e-3)


def test_ct_window_values():
  hu = np.array([-3024, -1000, -500, 0, 40, 1000, 3071, np.nan],
                np.float32).reshape(1, 1, 8)
  out, spec = rs.normalise(hu, "CT")
  np.testing.assert_allclose(out.ravel(),
                             [-1, -1, -0.5, 0, 0.04, 1, 1, -1], atol=1e-6)
  assert spec == "ct_window(-1000,1000)->[-1,1]"
  assert out.dtype == np.float32


def test_mr_percentile_normalisation():
  x = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
  x[0, 0, 0] = 1e6   # a hot outlier must not squash the range
  out, spec = rs.normalise(x, "MR")
  assert spec == "pct(0.5,99.5)->[0,1]"
  lo, hi = np.percentile(x, [0.5, 99.5])
  np.testing.assert_allclose(out[5, 0, 0], (500 - lo) / (hi - lo), rtol=1e-5)
  assert out.min() == 0.0 and out.max() == 1.0
  # Constant and empty volumes do not divide by zero.
  z, _ = rs.normalise(np.full((2, 2, 2), 7.0, np.float32), "PT")
  np.testing.assert_array_equal(z, 0.0)


def test_resize_rejects_bad_input():
  with pytest.raises(ValueError, match="D, H, W"):
    rs.resize(np.zeros((4, 4)), (2, 2, 2))
  with pytest.raises(ValueError, match="positive"):
    rs.resize(np.zeros((4, 4, 4)), (0, 2, 2))


@pytest.mark.parametrize("kind", ["gamma", "ties", "mostly_constant", "sorted"])
def test_tail_percentiles_equal_numpy(kind):
  rng = np.random.default_rng(5)
  n = 200_003
  if kind == "gamma":
    x = rng.gamma(2.0, 200.0, n).astype(np.float32)
  elif kind == "ties":
    x = rng.integers(0, 40, n).astype(np.float32)
  elif kind == "mostly_constant":
    x = np.zeros(n, np.float32)
    x[rng.integers(0, n, 300)] = rng.normal(size=300).astype(np.float32)
  else:
    x = np.sort(rng.normal(size=n).astype(np.float32))[::-1].copy()
  for qs in [(0.5, 99.5), (0.0, 100.0), (2.5, 97.5), (5.0, 95.0)]:
    np.testing.assert_array_equal(rs._percentiles(x, qs), np.percentile(x, qs))
  # Central percentiles and small arrays go to numpy itself.
  np.testing.assert_array_equal(rs._percentiles(x, (25, 75)),
                                np.percentile(x, (25, 75)))
  np.testing.assert_array_equal(rs._percentiles(x[:999], (0.5, 99.5)),
                                np.percentile(x[:999], (0.5, 99.5)))


def test_mr_normalisation_of_a_large_volume_uses_exact_percentiles():
  x = np.random.default_rng(6).gamma(2.0, 150.0, (12, 96, 96)).astype(np.float32)
  x[0, 0, :2] = [np.nan, np.inf]
  out, _ = rs.normalise(x, "MR")
  finite = x[np.isfinite(x)]
  lo, hi = np.percentile(finite, [0.5, 99.5])
  ref = np.clip((x - np.float32(lo)) * np.float32(1.0 / (hi - lo)), 0, 1)
  ref[0, 0, :2] = 0.0
  np.testing.assert_array_equal(out, ref)
