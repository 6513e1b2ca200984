"""Segmentation input (radnet_jax.data.segment): patch sampling, case subsets."""
import numpy as np

from radnet_jax.data import segment as seg_input


def test_foreground_biased_patches_and_padding():
  vol = np.zeros((20, 40, 40), np.float32)
  mask = np.zeros((20, 40, 40), np.uint8)
  mask[15:18, 30:35, 2:6] = 1
  fg = np.flatnonzero(mask)
  rng = np.random.default_rng(0)
  hits = [seg_input.sample_patch(vol, mask, fg, (8, 8, 8), rng, 1.0)[1].any()
          for _ in range(50)]
  assert all(hits)
  rand = [seg_input.sample_patch(vol, mask, fg, (8, 8, 8), rng, 0.0)[1].any()
          for _ in range(50)]
  assert sum(rand) < 25
  v, m = seg_input.sample_patch(vol + 1, mask, fg, (32, 48, 8), rng, 1.0, pad_value=-1)
  assert v.shape == (32, 48, 8) and m.shape == (32, 48, 8)
  assert (v == -1).sum() == 32 * 48 * 8 - 20 * 40 * 8 and m.sum() > 0


def test_select_cases_nested_subsets():
  cases = [str(i) for i in range(10)]
  a = seg_input.select_cases(cases, 2, seed=1)
  b = seg_input.select_cases(cases, 5, seed=1)
  assert len(a) == 2 and b[:2] == a and len(seg_input.select_cases(cases, 0, 1)) == 10
