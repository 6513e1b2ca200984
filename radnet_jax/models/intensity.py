"""Learnable intensity curve in front of a 3D network (`InputWindows`).

Shards store CT as the HU window [-1000, 1000] mapped linearly to [-1, 1]
(`radnet_jax.resample`), so soft tissue (-100..300 HU) spans only 0.4 of the
range while air/tissue/bone edges span 2. Contrast enhancement (+50..160 HU of
iodine in blood, liver, kidney) is then a 0.05..0.16 change that a randomly
initialised stem, dominated by body-outline edges, barely sees: on the phantom
demo a ResNetTiny trained on contrast alone stayed near chance on CT.

`InputWindows` maps the 1-channel input ``x`` to

    y = a * x + sum_k b_k * window_k(x) + c,
    window_k(x) = clip(2 (x - lo_k) / (hi_k - lo_k) - 1, -1, 1)

with learnable ``a``, ``b_k``, ``c`` (initialised to 1, 1, 0): a monotone,
piecewise-linear intensity curve that starts with the soft-tissue range
stretched (like a radiologist's soft-tissue window) and that training can
reshape. The output stays 1 channel, so the trunk's parameter shapes are
those of a plain 1-channel model and a pretrained trunk transfers unchanged
to a segmentation network that reads a different HU window
(`radnet_jax.models.vnet.ResNetVNet`).
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

Array = jnp.ndarray


def window(x: Array, lo: float, hi: float) -> Array:
  """``clip(2 (x - lo) / (hi - lo) - 1, -1, 1)``: the window [lo, hi] -> [-1, 1]."""
  if not hi > lo:
    raise ValueError(f"window needs hi > lo, got ({lo}, {hi})")
  return jnp.clip((x - lo) * (2.0 / (hi - lo)) - 1.0, -1.0, 1.0)


class InputWindows(nn.Module):
  """``(B, D, H, W, 1)`` -> ``(B, D, H, W, 1)``, the curve in the module docstring.

  Attributes:
    windows: ``((lo, hi), ...)`` in the input's units. For CT shards
      (``[-1000, 1000]`` HU -> ``[-1, 1]``) HU ``h`` is ``h / 1000``, e.g.
      ``((-0.16, 0.24),)`` = the soft-tissue window -160..240 HU.
  """
  windows: Sequence[Sequence[float]]

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if x.ndim != 5 or x.shape[-1] != 1:
      raise ValueError(f"InputWindows wants (B, D, H, W, 1) input, got {x.shape}")
    x = x.astype(jnp.float32)
    k = len(self.windows)
    a = self.param("scale", nn.initializers.ones, (1,), jnp.float32)
    b = self.param("window_scales", nn.initializers.ones, (k,), jnp.float32)
    c = self.param("bias", nn.initializers.zeros, (1,), jnp.float32)
    y = a[0] * x + c[0]
    for i, (lo, hi) in enumerate(self.windows):
      y = y + b[i] * window(x, float(lo), float(hi))
    return y
