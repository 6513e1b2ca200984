"""The embedded demo data: a phantom DICOM corpus and its shards, cached.

With no ``config.data.shards_dir``, pretraining runs on a synthetic corpus
(``radnet_jax.phantom.make_corpus``: CT and MR series of phantom patients
with known ground truth in ``truth.csv``), converted by
``radnet_jax.shards.build.build_shards`` exactly as a real archive would be. Both
are built once into ``<cache>/phantom-n<N>-s<seed>-<D>x<H>x<W>/{corpus,shards*}``
(cache = ``config.data.cache_dir`` or ``$RADNET_CACHE`` or
``~/.cache/radnet_jax``) and reused afterwards; the log says which.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Mapping

from radnet_jax.phantom import corpus as phantom_corpus
from radnet_jax.shards import records

log = logging.getLogger("radnet_jax")

CACHE_ENV = "RADNET_CACHE"
DEFAULT_SPLIT = (0.8, 0.1, 0.1)


def cache_root(cache_dir: str = "") -> str:
  """``cache_dir`` or $RADNET_CACHE or ~/.cache/radnet_jax."""
  return os.path.expanduser(cache_dir or os.environ.get(CACHE_ENV) or
                            os.path.join("~", ".cache", "radnet_jax"))


def phantom_dir(data_cfg: Mapping) -> str:
  """Cache directory of the phantom corpus + shards for ``data_cfg``."""
  shape = "x".join(str(int(s)) for s in data_cfg["shard_shape"])
  dr = "-dr" if data_cfg.get("phantom_randomise", False) else ""
  name = f"phantom-v{phantom_corpus.VERSION}-n{int(data_cfg['phantom_n'])}-s{int(data_cfg['phantom_seed'])}{dr}-{shape}"
  return os.path.join(cache_root(data_cfg.get("cache_dir", "")), name)


def phantom_split(data_cfg: Mapping) -> tuple[float, float, float]:
  """(train, val, test) patient fractions of the demo shards (default 0.8/0.1/0.1)."""
  split = tuple(float(x) for x in (data_cfg.get("phantom_split") or DEFAULT_SPLIT))
  if len(split) != 3 or min(split) < 0 or split[0] <= 0:
    raise ValueError(f"config.data.phantom_split must be 3 fractions (train, val, test) "
                     f"with train > 0, got {split}")
  return split


def shards_name(data_cfg: Mapping) -> str:
  """Shards folder name: ``shards`` for the default split, else ``shards-<t>-<v>-<e>``."""
  split = phantom_split(data_cfg)
  if split == DEFAULT_SPLIT:
    return "shards"
  return "shards-" + "-".join(f"{x:g}" for x in split)


def demo_salt(seed: int) -> str:
  """The fixed salt of the phantom demo's shards (synthetic data only: never
  use a public salt for patient data, see ``radnet_jax.privacy``)."""
  return f"radnet-jax-phantom-demo-seed{int(seed)}"


def _manifest_ok(shards: str) -> bool:
  return records.has_manifest(shards)


def ensure_phantom_shards(data_cfg: Mapping, taxonomy: str = "paper") -> str:
  """Builds (or reuses) the phantom corpus and its shards; returns the shards dir.

  data_cfg keys: phantom_n (series), phantom_seed, phantom_randomise (domain
  randomisation of the MR intensities, ``make_corpus(randomise=...)``), shard_shape (D, H, W),
  phantom_split (train, val, test patient fractions), convert_workers,
  cache_dir. Shards of another split are written beside the same corpus. The corpus generator resumes by itself; shards
  are written to ``shards.partial`` and renamed when complete, so a killed
  build is redone, never half-used.
  """
  from radnet_jax.shards import build  # pylint: disable=g-import-not-at-top
  from radnet_jax import phantom  # pylint: disable=g-import-not-at-top
  root = phantom_dir(data_cfg)
  corpus, shards = os.path.join(root, "corpus"), os.path.join(root, shards_name(data_cfg))
  split = phantom_split(data_cfg)
  n, seed = int(data_cfg["phantom_n"]), int(data_cfg["phantom_seed"])
  workers = int(data_cfg.get("convert_workers", 1))
  if _manifest_ok(shards):
    log.info("data: phantom demo corpus (synthetic DICOM, %d series, seed %d), "
             "reusing cached shards in %s", n, seed, shards)
    return shards
  os.makedirs(root, exist_ok=True)
  log.info("data: phantom demo corpus (synthetic DICOM, not patient data): %d series, "
           "seed %d, in %s (built once, reused afterwards)", n, seed, corpus)
  t0 = time.time()
  phantom.make_corpus(corpus, n=n, seed=seed, workers=workers,  # resumable, idempotent
                      randomise=bool(data_cfg.get("phantom_randomise", False)))
  log.info("data: phantom corpus ready in %.0f s", time.time() - t0)
  tmp = shards + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  # The split is by salted patient hash. Synthetic patients carry no PHI, so
  # the demo uses a fixed, public salt: every machine gets the same split
  # (and byte-identical shards), and the documented results are comparable.
  os.makedirs(tmp)
  with open(os.path.join(tmp, ".salt"), "w") as f:
    f.write(demo_salt(seed))
  shape = tuple(int(s) for s in data_cfg["shard_shape"])
  log.info("data: converting the phantom corpus to %s-voxel shards in %s", shape, shards)
  t0 = time.time()
  build.build_shards(os.path.join(corpus, "dicom"), tmp, shape=shape, workers=workers,
                       taxonomy=taxonomy, split=split)
  shutil.rmtree(shards, ignore_errors=True)
  os.replace(tmp, shards)
  log.info("data: shards written in %.0f s: %s", time.time() - t0, shards)
  return shards
