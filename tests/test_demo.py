"""The phantom demo's data path: same split and shards on every machine."""
import filecmp
import os
import shutil

from radnet_jax import privacy
from radnet_jax.shards import demo


def _cfg(cache):
  return {"phantom_n": 8, "phantom_seed": 3, "phantom_split": (0.5, 0.25, 0.25),
          "shard_shape": (6, 12, 12), "convert_workers": 1, "cache_dir": str(cache)}


def test_demo_shards_identical_across_caches(tmp_path):
  """Two fresh caches (two machines) give byte-identical shards and manifest,
  so the patient split is the same: the salt is the demo's fixed one, not a
  random per-machine salt."""
  a = demo.ensure_phantom_shards(_cfg(tmp_path / "a"))
  # Second machine: same corpus (the generator is deterministic by seed; copied
  # here to save its build time), shards converted from scratch.
  corpus_a = os.path.join(demo.phantom_dir(_cfg(tmp_path / "a")), "corpus")
  corpus_b = os.path.join(demo.phantom_dir(_cfg(tmp_path / "b")), "corpus")
  shutil.copytree(corpus_a, corpus_b)
  b = demo.ensure_phantom_shards(_cfg(tmp_path / "b"))
  assert a != b
  with open(os.path.join(a, ".salt")) as f:
    assert f.read() == demo.demo_salt(3)
  assert privacy.load_or_create_salt(b) == demo.demo_salt(3)
  names = sorted(n for n in os.listdir(a) if not n.startswith("."))
  assert names == sorted(n for n in os.listdir(b) if not n.startswith("."))
  assert any(n.endswith(".array_record") or "shard" in n for n in names), names
  for n in names:
    pa, pb = os.path.join(a, n), os.path.join(b, n)
    if os.path.isfile(pa):
      assert filecmp.cmp(pa, pb, shallow=False), n
  # Reused, not rebuilt, on the next call.
  mtime = os.path.getmtime(os.path.join(a, "manifest.json"))
  assert demo.ensure_phantom_shards(_cfg(tmp_path / "a")) == a
  assert os.path.getmtime(os.path.join(a, "manifest.json")) == mtime
