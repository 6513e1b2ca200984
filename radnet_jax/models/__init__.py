"""Flax 3D models: ResNet3D (pretraining), VNet and ResNetVNet (segmentation).

Helpers for benchmarks: `count_params(variables)` and
`flops_per_example(model, input_shape)`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from radnet_jax.models.layers import Conv3D, ConvTranspose3D, conv3d
from radnet_jax.models.resnet3d import (
    ResNet3D, ResNet10, ResNet18, ResNet34, ResNet50, ResNet101, ResNetTiny,
    get_model)


def count_params(variables: Any) -> int:
  """Number of scalars in `variables['params']` (or in a bare params tree).

  Works on arrays and on `jax.ShapeDtypeStruct`s from `jax.eval_shape`.
  """
  tree = variables.get("params", variables) if hasattr(variables, "get") \
      else variables
  return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree)))


def _flops(compiled: Any) -> float:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return float((ca or {}).get("flops", float("nan")))


def flops_per_example(model: Any, input_shape: Sequence[int],
                      train: bool = False, backward: bool = False) -> float:
  """FLOPs of one example through `model` from XLA's cost analysis.

  Args:
    model: a Linen module whose `__call__(x, train)` takes `(B, D, H, W, C)`.
    input_shape: `(D, H, W, C)` of one example (batch 1 is compiled).
    train: run with batch statistics (BatchNorm train mode).
    backward: count forward + backward (gradient w.r.t. params) of a sum of the
      outputs instead of the forward pass only.

  Returns:
    FLOPs (multiply-add = 2) as XLA counts them for the compiled program.
  """
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                jnp.zeros(x.shape), False))

  def fwd(v: Any, x: jax.Array) -> jax.Array:
    out = model.apply(v, x, train, mutable=["batch_stats"] if train else False,
                      rngs={"dropout": jax.random.PRNGKey(0)})
    out = out[0] if train else out
    return sum(jnp.sum(jnp.asarray(l, jnp.float32))
               for l in jax.tree_util.tree_leaves(out))

  f: Callable = fwd
  if backward:
    def f(v, x):
      g = jax.grad(lambda p: fwd({**v, "params": p}, x))(v["params"])
      return jax.tree_util.tree_leaves(g)
  return _flops(jax.jit(f).lower(variables, x).compile())


__all__ = [
    "Conv3D", "ConvTranspose3D", "conv3d", "ResNet3D", "ResNet10", "ResNet18",
    "ResNet34", "ResNet50", "ResNet101", "ResNetTiny", "get_model",
    "count_params", "flops_per_example",
]
