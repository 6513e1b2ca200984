"""Tiny synthetic pretraining shards for the training tests (no DICOM needed).

Each record's volume encodes its labels in simple image features (a bright
slab along an axis for the plane, overall intensity for the sequence), so a
tiny CNN can learn them in a few dozen steps. Some labels are unknown (-1 /
NaN / coverage_mask 0) to exercise the masking.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from array_record.python import array_record_module as arm

from radnet_jax.shards import records


def make_record(i: int, shape=(10, 20, 20), rng=None) -> dict:
  rng = rng or np.random.default_rng(i)
  seq, plane, contrast = i % 5, (i // 5) % 3, i % 2
  vol = rng.normal(0, 0.1, shape).astype(np.float32) + (seq - 2) * 0.3
  sl = [slice(None)] * 3
  sl[plane] = slice(shape[plane] // 2 - 1, shape[plane] // 2 + 1)
  vol[tuple(sl)] += 1.0
  cov = np.zeros(9, np.float32)
  cov[i % 9] = 1.0
  targets = {"sequence": seq, "plane": plane, "contrast": contrast,
             "coverage_mask": int(i % 7 != 3), "spacing": float(1.0 + (i % 4))}
  if i % 11 == 4:
    targets["sequence"] = -1
  if i % 13 == 6:
    targets["spacing"] = None
  return {"kind": "pretrain", "volume": vol.astype(np.float16), "coverage": cov,
          "targets": targets, "split": "train", "series": f"{i:016x}"}


def write_shards(out_dir: str, counts=None, shape=(10, 20, 20)) -> str:
  """Writes <split>-00000-of-00001.array_record files; returns out_dir."""
  counts = counts or {"train": 48, "val": 13, "test": 11}
  os.makedirs(out_dir, exist_ok=True)
  base = 0
  for split, n in counts.items():
    w = arm.ArrayRecordWriter(os.path.join(out_dir, f"{split}-00000-of-00001.array_record"),
                              "group_size:1")
    for i in range(base, base + n):
      rec = make_record(i, shape)
      rec["split"] = split
      w.write(records.encode(rec))
    w.close()
    base += n
  return out_dir


class TinyCNN(nn.Module):
  """A 2-conv 3D CNN with BatchNorm and the ResNet3D output contract."""
  heads: dict
  dtype: object = jnp.float32
  width: int = 4

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Conv(self.width, (3, 3, 3), strides=(2, 2, 2), use_bias=False, dtype=self.dtype)(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(h)
    h = nn.relu(h)
    h2 = nn.relu(nn.Conv(2 * self.width, (3, 3, 3), strides=(2, 2, 2), dtype=self.dtype)(h))
    emb = jnp.mean(h2.astype(jnp.float32), axis=(1, 2, 3))
    out = {"embedding": emb}
    for t, n in dict(self.heads).items():
      out[t] = nn.Dense(int(n), name=f"head_{t}")(emb)
    return out, [h, h2]
