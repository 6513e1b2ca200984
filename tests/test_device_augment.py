"""Device-side rotation + noise (radnet_jax.data.device_augment) vs the host path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radnet_jax.data import augment
from radnet_jax.data import device_augment
from radnet_jax.data import pretrain as input_pipeline


def _smooth_volume(shape=(3, 17, 20), seed=0):
  rng = np.random.default_rng(seed)
  d, h, w = shape
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  vol = [np.sin(0.4 * yy + k) * np.cos(0.3 * xx - k) + 0.1 * k
         for k in range(d)]
  return (np.stack(vol) + 0.05 * rng.normal(size=shape)).astype(np.float32)


@pytest.mark.parametrize("degrees", [7.5, -10.0, 33.0])
def test_rotation_matches_scipy_rotate_in_plane(degrees):
  vol = _smooth_volume()
  ref = augment.rotate_in_plane(vol, degrees)
  got = np.asarray(device_augment.rotate_in_plane(
      jnp.asarray(vol)[..., None], jnp.float32(degrees)))[..., 0]
  # Voxels whose source point has all four bilinear neighbours inside the
  # plane: identical maps must agree; scipy and this differ only in how
  # samples straddling the edge mix in the fill value.
  h, w = vol.shape[1:]
  a = np.deg2rad(degrees)
  oy, ox = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2,
                       indexing="ij")
  sy = np.cos(a) * oy + np.sin(a) * ox + (h - 1) / 2
  sx = -np.sin(a) * oy + np.cos(a) * ox + (w - 1) / 2
  inside = (sy >= 0) & (sy <= h - 1) & (sx >= 0) & (sx <= w - 1)
  assert inside.mean() > 0.6
  np.testing.assert_allclose(got[:, inside], ref[:, inside], atol=2e-5)
  # Far outside: the volume minimum, as scipy fills.
  far = (sy < -1) | (sy > h) | (sx < -1) | (sx > w)
  assert far.any()
  np.testing.assert_array_equal(got[:, far], vol.min())
  np.testing.assert_allclose(ref[:, far], vol.min(), atol=1e-6)


def test_rotation_identity_and_quarter_turn():
  vol = _smooth_volume((2, 9, 9))
  v = jnp.asarray(vol)[..., None]
  np.testing.assert_array_equal(
      device_augment.rotate_in_plane(v, jnp.float32(0.0)), v)
  quarter = np.asarray(device_augment.rotate_in_plane(v, jnp.float32(90.0)))
  np.testing.assert_allclose(quarter[..., 0],
                             augment.rotate_in_plane(vol, 90.0), atol=1e-5)
  # scipy's +90 in axes (1, 2) is numpy's rot90 over the same axes.
  np.testing.assert_allclose(quarter[..., 0], np.rot90(vol, 1, axes=(1, 2)),
                             atol=1e-5)


def test_batch_augment_per_example_angle_and_noise():
  vol = np.stack([_smooth_volume((4, 32, 32), s) for s in range(3)])[..., None]
  batch = {"volume": jnp.asarray(vol), "sequence": jnp.arange(3),
           "rotate_degrees": jnp.asarray([0.0, 12.0, 0.0], jnp.float32),
           "noise_std": jnp.asarray([0.0, 0.0, 0.1], jnp.float32)}
  out = jax.jit(device_augment.augment)(batch, jax.random.key(0))
  assert set(out) == {"volume", "sequence"}
  got = np.asarray(out["volume"])
  np.testing.assert_array_equal(got[0], vol[0])           # untouched
  np.testing.assert_allclose(                                # rotated only
      got[1], np.asarray(device_augment.rotate_in_plane(
          jnp.asarray(vol[1]), jnp.float32(12.0))), atol=1e-6)
  resid = got[2] - vol[2]                                   # noise only
  assert abs(resid.std() - 0.1) < 0.005 and abs(resid.mean()) < 0.005
  # The same key gives the same noise; another key another.
  again = jax.jit(device_augment.augment)(batch, jax.random.key(0))
  np.testing.assert_array_equal(again["volume"], got)
  other = jax.jit(device_augment.augment)(batch, jax.random.key(1))
  assert not np.allclose(other["volume"][2], got[2])
  with pytest.raises(ValueError, match="noise_std"):
    device_augment.augment({"volume": batch["volume"],
                            "rotate_degrees": batch["rotate_degrees"]},
                           jax.random.key(0))


def test_host_defers_rotation_and_noise():
  # Same seed and config: the deferred host path draws the same rotation
  # decision and angle, crops without rotating and leaves the noise out.
  vol = _smooth_volume((6, 20, 22))
  cfg = {"rotate_degrees": 10.0, "rotate_prob": 1.0, "flip_lr_prob": 0.0,
         "noise_std": 0.05}
  rec = {"volume": vol, "targets": {"sequence": 1}}
  a = input_pipeline.to_example(rec, (4, 16, 16), np.random.default_rng(3),
                                dict(cfg, on_device=True))
  assert a["volume"].shape == (4, 16, 16, 1) and a["sequence"] == 1
  angle = float(a["rotate_degrees"])
  assert 0 < abs(angle) <= 10 and 0 <= float(a["noise_std"]) <= 0.05
  rng = np.random.default_rng(3)
  rng.uniform()
  assert angle == np.float32(rng.uniform(-10, 10))
  # The volume is an unrotated, noise-free window of the shard.
  crop = a["volume"][..., 0]
  hits = [(d, y, x) for d in range(3) for y in range(5) for x in range(7)
          if np.array_equal(vol[d:d + 4, y:y + 16, x:x + 16], crop)]
  assert len(hits) == 1
  host = input_pipeline.to_example(rec, (4, 16, 16), np.random.default_rng(3),
                                   cfg)
  assert "rotate_degrees" not in host and "noise_std" not in host


def test_resolve_on_device():
  assert device_augment.resolve_on_device("auto") == (
      jax.default_backend() != "cpu")
  assert device_augment.resolve_on_device(True)
  assert not device_augment.resolve_on_device("False")
  assert device_augment.resolve_on_device("true")
  with pytest.raises(ValueError, match="on_device"):
    device_augment.resolve_on_device("gpu")
