"""Running a restored network on a list of model inputs, in fixed-size batches."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np

_APPLY_FNS: dict[int, tuple[Any, Any]] = {}


def apply_fn(model: Any) -> Any:
  """Jitted ``(variables, x) -> (outputs, features)``; one per model object
  (keyed by identity: Flax modules with dict fields do not hash)."""
  hit = _APPLY_FNS.get(id(model))
  if hit is None or hit[0] is not model:
    def f(variables, x):
      out = model.apply(variables, x, train=False)
      return out if isinstance(out, (tuple, list)) else (out, [])
    hit = _APPLY_FNS[id(model)] = (model, jax.jit(f))
  return hit[1]


def run_batches(model: Any, variables: Any, xs: Sequence[np.ndarray], batch_size: int = 4,
                features: bool = False) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
  """The network on a list of ``(D, H, W, 1)`` inputs, in fixed-size batches.

  The last batch is padded (one compilation per input shape). Returns
  ({output name: (N, ...) float32} incl. "embedding", [per-stage feature maps
  (N, d, h, w, C)] when ``features`` else []).
  """
  fn = apply_fn(model)
  outs: dict[str, list] = {}
  feats: list[list] = []
  for i in range(0, len(xs), batch_size):
    chunk = [np.asarray(x, np.float32) for x in xs[i:i + batch_size]]
    n = len(chunk)
    chunk += [np.zeros_like(chunk[0])] * (batch_size - n)
    o, f = jax.device_get(fn(variables, np.stack(chunk)))
    o = o if isinstance(o, Mapping) else {"output": o}   # e.g. segmentation logits
    for k, v in o.items():
      outs.setdefault(k, []).append(np.asarray(v, np.float32)[:n])
    if features:
      if not feats:
        feats = [[] for _ in f]
      for lst, v in zip(feats, f):
        lst.append(np.asarray(v, np.float32)[:n])
  return ({k: np.concatenate(v) for k, v in outs.items()},
          [np.concatenate(v) for v in feats])
