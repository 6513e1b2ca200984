"""Dice, ASSD and LCC against hand-checkable masks."""
import math

import numpy as np
import pytest

from radnet_jax.training import seg_metrics as sm


def _cube(shape, lo, hi):
  m = np.zeros(shape, bool)
  m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
  return m


def test_dice_two_cubes_known_overlap():
  a = _cube((10, 10, 10), (0, 0, 0), (4, 4, 4))        # 64 voxels
  b = _cube((10, 10, 10), (2, 0, 0), (6, 4, 4))        # 64, overlap 2*4*4 = 32
  assert sm.dice_counts(a, b) == (32, 64, 64)
  assert sm.dice(a, b) == pytest.approx(0.5)
  assert sm.dice(a, a) == 1.0
  assert sm.dice(a, np.zeros_like(a)) == 0.0
  assert sm.dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_dice_shape_mismatch_raises():
  with pytest.raises(ValueError, match="shape mismatch"):
    sm.dice(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool))


@pytest.mark.parametrize("spacing", [1.0, 2.0])
def test_assd_nested_cubes_by_hand(spacing):
  ref = _cube((20, 20, 20), (5, 5, 5), (15, 15, 15))   # side 10
  pred = _cube((20, 20, 20), (6, 6, 6), (14, 14, 14))  # side 8, one voxel in
  # pred surface: 8^3 - 6^3 = 296 voxels, each 1 voxel from the ref shell.
  # ref surface: 488 = 384 face voxels (1), 96 edge voxels (sqrt 2), 8 corners
  # (sqrt 3) from the pred shell.
  expected = (296 + 384 + 96 * math.sqrt(2) + 8 * math.sqrt(3)) / (296 + 488)
  got = sm.assd(pred, ref, (spacing,) * 3)
  assert got == pytest.approx(expected * spacing, rel=1e-9)
  assert sm.assd(ref, ref, (1, 1, 1)) == 0.0


def test_assd_anisotropic_matches_brute_force():
  rng = np.random.default_rng(0)
  ref = np.zeros((8, 9, 10), bool)
  zz, yy, xx = np.mgrid[:8, :9, :10]
  ref[(zz - 4) ** 2 / 9 + (yy - 4) ** 2 / 12 + (xx - 5) ** 2 / 16 < 1] = True
  pred = np.roll(ref, 1, axis=2) | (rng.random(ref.shape) > 0.97)
  spacing = np.array([3.0, 0.8, 0.7])

  def surf(m):
    pts = []
    for idx in np.argwhere(m):
      for ax in range(3):
        for s in (-1, 1):
          j = idx.copy()
          j[ax] += s
          if (j < 0).any() or (j >= m.shape).any() or not m[tuple(j)]:
            pts.append(idx)
            break
        else:
          continue
        break
    return np.array(pts) * spacing

  sp, sr = surf(pred), surf(ref)
  d = np.sqrt(((sp[:, None, :] - sr[None, :, :]) ** 2).sum(-1))
  expected = (d.min(1).sum() + d.min(0).sum()) / (len(sp) + len(sr))
  assert sm.assd(pred, ref, spacing) == pytest.approx(expected, rel=1e-9)


def test_assd_empty_cases():
  z = np.zeros((4, 4, 4), bool)
  o = _cube((4, 4, 4), (1, 1, 1), (3, 3, 3))
  assert sm.assd(z, z, (1, 1, 1)) == 0.0
  assert sm.assd(o, z, (1, 1, 1)) == math.inf


def test_largest_connected_component():
  m = _cube((12, 12, 12), (0, 0, 0), (3, 3, 3))        # 27 voxels
  m |= _cube((12, 12, 12), (6, 6, 6), (8, 8, 8))       # 8 voxels, separate
  m[10, 10, 10] = True
  out = sm.largest_connected_component(m)
  assert out.sum() == 27 and out[:3, :3, :3].all()
  # Diagonal contact joins only with connectivity 3.
  d = np.zeros((4, 4, 4), bool)
  d[0, 0, 0] = d[1, 1, 1] = d[2, 2, 2] = True
  d[3, 0, 3] = True
  assert sm.largest_connected_component(d, 1).sum() == 1
  assert sm.largest_connected_component(d, 3).sum() == 3


def test_keep_largest_organ_keeps_tumour_inside():
  lab = np.zeros((10, 10, 10), np.uint8)
  lab[1:6, 1:6, 1:6] = 1
  lab[2:4, 2:4, 2:4] = 2                                # tumour in the liver
  lab[8, 8, 8] = 1                                     # island
  lab[8, 1, 8] = 2                                     # tumour island
  out = sm.keep_largest_organ(lab)
  assert out[8, 8, 8] == 0 and out[8, 1, 8] == 0
  assert (out[2:4, 2:4, 2:4] == 2).all()
  assert (out == 1).sum() == 125 - 8


def test_evaluator_global_vs_per_case():
  ev = sm.SegEvaluator()
  ref1 = np.zeros((10, 10, 10), np.uint8)
  ref1[:4, :4, :4] = 1
  pred1 = np.zeros_like(ref1)
  pred1[2:6, :4, :4] = 1                              # liver dice 0.5
  ev.add("a", pred1, ref1, (1, 1, 1))
  ref2 = np.zeros((10, 10, 10), np.uint8)
  ref2[:2, :2, :2] = 1                                 # 8 voxels, perfect
  ev.add("b", ref2.copy(), ref2, (1, 1, 1))
  s = ev.summary()
  assert s["liver/dice_per_case"] == pytest.approx(0.75)
  # Global: (2*(32+8)) / (64+8 + 64+8) = 80/144.
  assert s["liver/dice_global"] == pytest.approx(80 / 144)
  assert s["tumour/dice_per_case"] == 1.0              # absent and not predicted
  assert s["num_cases"] == 2 and s["cases"]["b"]["liver/assd_mm"] == 0.0
