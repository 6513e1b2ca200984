"""grain pipeline and label-safe augmentation on tiny synthetic shards."""
import numpy as np
import pytest

from radnet_jax.data import augment
from radnet_jax.data import pretrain as ip
from tests import synthetic_shards as ss

SHAPE = (8, 16, 16)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  return ss.write_shards(str(tmp_path_factory.mktemp("sh")))


def test_crop_or_pad_centre_and_random():
  v = np.arange(4 * 6 * 6, dtype=np.float32).reshape(4, 6, 6)
  c = augment.crop_or_pad(v, (2, 8, 4))
  assert c.shape == (2, 8, 4)
  np.testing.assert_array_equal(c[:, 1:7, :], v[1:3, :, 1:5])
  assert (c[:, 0] == v.min()).all()
  r = augment.crop_or_pad(v, (2, 4, 4), np.random.default_rng(0))
  assert r.shape == (2, 4, 4)


def test_rotated_crop_equals_rotate_then_crop():
  # Interpolating only the kept window gives the voxels of rotating the whole
  # volume (scipy.ndimage.rotate about the plane centre) and then cropping.
  rng = np.random.default_rng(5)
  v = rng.normal(size=(7, 21, 18)).astype(np.float32)
  for deg, starts, shape in [(7.5, (1, 3, 2), (5, 16, 15)),
                             (-10.0, (0, 0, 0), (7, 21, 18)),
                             (3.0, (2, 5, 0), (4, 9, 18))]:
    full = augment.rotate_in_plane(v, deg)
    d, h, w = starts
    want = full[d:d + shape[0], h:h + shape[1], w:w + shape[2]]
    got = augment.rotated_crop(v, deg, starts, shape)
    assert got.shape == tuple(shape) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="at least"):
    augment.rotated_crop(v, 5.0, (0, 0, 0), (8, 21, 18))


def test_augment_keeps_the_slice_axis():
  # A bright slab across the D axis must stay a D slab (plane label kept).
  v = np.zeros((10, 20, 20), np.float32)
  v[5] = 1.0
  cfg = dict(rotate_degrees=10.0, rotate_prob=1.0, flip_lr_prob=1.0, scale=0.1,
             shift=0.0, gamma=0.0, noise_std=0.0)
  out = augment.augment(v, SHAPE, np.random.default_rng(1), cfg)
  assert out.shape == SHAPE and out.dtype == np.float32
  prof = out.mean(axis=(1, 2))
  assert prof.argmax() in (3, 4, 5) and prof.max() > 5 * np.delete(prof, prof.argmax()).max()


def test_train_dataset_deterministic_and_resumable(shards):
  paths = ip.split_paths(shards, "train")
  cfg = dict(rotate_degrees=5.0, rotate_prob=0.5, flip_lr_prob=0.5, scale=0.1,
             shift=0.1, gamma=0.1, noise_std=0.01)
  ds = ip.train_dataset(paths, shape=SHAPE, batch_size=4, seed=3, augment_cfg=cfg,
                        num_threads=1)
  it = iter(ds)
  first = [next(it) for _ in range(3)]
  assert first[0]["volume"].shape == (4,) + SHAPE + (1,)
  assert first[0]["sequence"].dtype == np.int32 and first[0]["coverage"].shape == (4, 9)
  state = it.get_state()
  nxt = [next(it) for _ in range(2)]
  it2 = iter(ip.train_dataset(paths, shape=SHAPE, batch_size=4, seed=3, augment_cfg=cfg,
                              num_threads=1))
  np.testing.assert_array_equal(next(it2)["volume"], first[0]["volume"])
  it2.set_state(state)
  for a, b in zip(nxt, [next(it2) for _ in range(2)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # Unknown labels pass through as -1 / NaN.
  seen = np.concatenate([b["sequence"] for b in first + nxt])
  assert seen.min() >= -1


def test_process_slices_are_disjoint(shards):
  paths = ip.split_paths(shards, "train")
  a = ip.train_dataset(paths, shape=SHAPE, batch_size=4, seed=0, augment_cfg=None,
                       process_index=0, process_count=2)
  b = ip.train_dataset(paths, shape=SHAPE, batch_size=4, seed=0, augment_cfg=None,
                       process_index=1, process_count=2)
  va = {x.tobytes() for x in next(iter(a))["volume"]}
  vb = {x.tobytes() for x in next(iter(b))["volume"]}
  assert not va & vb


def test_eval_batches_pad_and_cover_every_record(shards):
  paths = ip.split_paths(shards, "val")  # 13 records
  batches = list(ip.eval_batches(paths, shape=SHAPE, batch_size=4))
  assert len(batches) == 4
  masks = np.concatenate([b["mask"] for b in batches])
  assert masks.sum() == 13 and masks[13:].sum() == 0
  assert (batches[-1]["sequence"][1:] == -1).all()
  # Two processes: same number of batches each, 13 real rows in total.
  per = [list(ip.eval_batches(paths, shape=SHAPE, batch_size=4, process_index=i,
                              process_count=2)) for i in range(2)]
  assert len(per[0]) == len(per[1]) == 2
  assert sum(b["mask"].sum() for p in per for b in p) == 13


def test_balanced_sampling(shards):
  targets = [{"sequence": 0}] * 8 + [{"sequence": 1}] * 2
  w = ip.balance_weights(targets, ("sequence",))
  assert w[:8].sum() == pytest.approx(0.5) and w[8:].sum() == pytest.approx(0.5)
  # Coverage: groups by band set; unknown coverage is its own group.
  brain, abdomen = np.eye(9)[0], np.eye(9)[5] + np.eye(9)[6] + np.eye(9)[7]
  cov = ([{"coverage": brain * 0.9, "coverage_mask": 1.0}] * 6 +
         [{"coverage": abdomen, "coverage_mask": 1.0}] * 3 +
         [{"coverage": np.zeros(9), "coverage_mask": 0.0}])
  w = ip.balance_weights(cov, ("coverage",))
  assert [w[:6].sum(), w[6:9].sum(), w[9]] == pytest.approx([1 / 3] * 3)
  w = ip.balance_weights(cov, ("coverage",), power=0.5)
  assert w[6] / w[0] == pytest.approx(np.sqrt(2))
  paths = ip.split_paths(shards, "train")
  ds = ip.train_dataset(paths, shape=SHAPE, batch_size=8, seed=0, augment_cfg=None,
                        balance_keys=("plane",), num_threads=1)
  it = iter(ds)
  planes = np.concatenate([next(it)["plane"] for _ in range(6)])
  counts = np.bincount(planes[planes >= 0], minlength=3)
  assert counts.min() > 0
