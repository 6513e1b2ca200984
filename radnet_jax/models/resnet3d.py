"""Multi-task 3D ResNet (3D-RADNet pretraining) with a MedicalNet layout.

`ResNet3D(...).apply(variables, x, train=...)` maps `(B, D, H, W, C)` volumes
to `(outputs, features)`:
  outputs: dict task -> float32 logits `(B, n)` for each `heads` entry, plus
    "embedding" -> pooled last-stage features `(B, F)`.
  features: [stem, stage1, stage2, stage3, stage4] feature maps (channel-last),
    the skips a VNet decoder needs.

The trunk (everything but the heads) is ONE submodule named "trunk", so a
segmentation network reuses `params['trunk']` 1:1 (see `vnet.ResNetVNet`).

Layouts:
  "radnet"     the paper's anisotropic stem, 3x7x7 conv with stride 1x2x2 (thick
               slices keep their depth), 3x3x3 max-pool stride 2, stages with
               strides (1, 2, 2, 2).
  "medicalnet" Tencent MedicalNet/Med3D resnet.py: 7x7x7 stride-2 stem, pool,
               stage strides (1, 2, 1, 1) with dilations (1, 1, 2, 4) in the
               last stages, shortcut "A" (zero-padded identity) or "B" (1x1x1
               conv + BN), so its PyTorch weights import (`medicalnet.py`).
All convs pad symmetrically `dilation * (k - 1) // 2`, like PyTorch.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from radnet_jax.models.intensity import InputWindows
from radnet_jax.models.layers import Conv3D, batch_norm, max_pool3d

Array = jax.Array

LAYOUTS = {
    "radnet": dict(stem_kernel=(3, 7, 7), stem_strides=(1, 2, 2),
                   stage_strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1)),
    "medicalnet": dict(stem_kernel=(7, 7, 7), stem_strides=(2, 2, 2),
                       stage_strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4)),
}


def _shortcut(x: Array, out_ch: int, strides: tuple[int, int, int],
              shortcut_type: str, conv: Callable, norm: Callable) -> Array:
  """Projection (B) or zero-padded identity (A) shortcut."""
  if x.shape[-1] == out_ch and strides == (1, 1, 1):
    return x
  if shortcut_type == "A":
    # MedicalNet: avg_pool3d(kernel 1, stride s) then zero channels appended.
    x = x[:, ::strides[0], ::strides[1], ::strides[2], :]
    pad = out_ch - x.shape[-1]
    if pad < 0:
      raise ValueError(f"shortcut A cannot reduce channels {x.shape[-1]} -> "
                       f"{out_ch}")
    return jnp.pad(x, ((0, 0),) * 4 + ((0, pad),))
  if shortcut_type != "B":
    raise ValueError(f"shortcut_type must be 'A' or 'B', got {shortcut_type!r}")
  x = conv(out_ch, (1, 1, 1), strides, name="downsample_conv")(x)
  return norm(name="downsample_bn")(x)


class BasicBlock(nn.Module):
  """Two 3x3x3 convs; expansion 1."""
  filters: int
  conv: Callable
  norm: Callable
  strides: tuple[int, int, int] = (1, 1, 1)
  dilation: int = 1
  shortcut_type: str = "B"
  expansion = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = self.dilation
    y = self.conv(self.filters, (3, 3, 3), self.strides, dilation=d,
                  name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3, 3), dilation=d, name="conv2")(y)
    y = self.norm(name="bn2", scale_init=nn.initializers.zeros)(y)
    r = _shortcut(x, self.filters, self.strides, self.shortcut_type,
                  self.conv, self.norm)
    return nn.relu(y + r)


class Bottleneck(nn.Module):
  """1x1x1 -> 3x3x3 (strided, dilated) -> 1x1x1 convs; expansion 4."""
  filters: int
  conv: Callable
  norm: Callable
  strides: tuple[int, int, int] = (1, 1, 1)
  dilation: int = 1
  shortcut_type: str = "B"
  expansion = 4

  @nn.compact
  def __call__(self, x: Array) -> Array:
    y = self.conv(self.filters, (1, 1, 1), name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3, 3), self.strides,
                  dilation=self.dilation, name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(self.filters * 4, (1, 1, 1), name="conv3")(y)
    y = self.norm(name="bn3", scale_init=nn.initializers.zeros)(y)
    r = _shortcut(x, self.filters * 4, self.strides, self.shortcut_type,
                  self.conv, self.norm)
    return nn.relu(y + r)


class ResNetTrunk(nn.Module):
  """Stem + 4 stages. `__call__(x, train) -> [stem, stage1, ..., stage4]`.

  Attributes (see `ResNet3D`); `None` for stem_kernel/stem_strides/
  stage_strides/dilations takes the value of `layout`.
  """
  stage_sizes: Sequence[int]
  block_cls: type[nn.Module] = BasicBlock
  num_filters: int = 64
  stem_kernel: Sequence[int] | None = None
  stem_strides: Sequence[int] | None = None
  stem_pool: bool = True
  shortcut_type: str = "B"
  dilations: Sequence[int] | None = None
  stage_strides: Sequence[int] | None = None
  layout: str = "radnet"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_impl: str = "auto"

  def _cfg(self, key: str) -> Any:
    if self.layout not in LAYOUTS:
      raise ValueError(f"layout must be one of {list(LAYOUTS)}, got "
                       f"{self.layout!r}")
    v = getattr(self, key)
    return LAYOUTS[self.layout][key] if v is None else v

  @nn.compact
  def __call__(self, x: Array, train: bool) -> list[Array]:
    """`x`: `(B, D, H, W, C)` -> list of 5 channel-last feature maps."""
    if x.ndim != 5:
      raise ValueError(f"ResNet3D wants (B, D, H, W, C) input, got {x.shape}")
    conv = functools.partial(Conv3D, dtype=self.dtype,
                             param_dtype=self.param_dtype,
                             conv_impl=self.conv_impl)
    norm = functools.partial(batch_norm, train, self.dtype)
    stem_k = tuple(self._cfg("stem_kernel"))
    x = conv(self.num_filters, stem_k, tuple(self._cfg("stem_strides")),
             name="stem_conv")(x)
    x = nn.relu(norm(name="stem_bn")(x))
    features = [x]
    if self.stem_pool:
      x = max_pool3d(x, 3, 2, ((1, 1),) * 3, impl=self.conv_impl)
    strides_all = self._cfg("stage_strides")
    dil_all = self._cfg("dilations")
    for i, n_blocks in enumerate(self.stage_sizes):
      s = strides_all[i]
      s = (s,) * 3 if isinstance(s, int) else tuple(s)
      for j in range(n_blocks):
        x = self.block_cls(
            filters=self.num_filters * 2**i, conv=conv, norm=norm,
            strides=s if j == 0 else (1, 1, 1), dilation=dil_all[i],
            shortcut_type=self.shortcut_type,
            name=f"stage{i + 1}_block{j + 1}")(x)
      features.append(x)
    return features


def _global_max(f: jnp.ndarray) -> jnp.ndarray:
  """Max over the spatial axes of (B, D, H, W, C), gradient to one voxel.

  ``jnp.max``'s gradient splits the cotangent over the voxels equal to the
  max and divides by their count; where XLA computes the compared values in
  two ways (unoptimised CPU builds), no voxel compares equal and the
  gradient is 0 / 0 = NaN (a three-stage pool of an 8x16x16 input diverged
  at step 3). Picking the argmax voxel gives the same value and a finite
  gradient on every backend (ties go to the first voxel, as in PyTorch).
  """
  flat = f.reshape(f.shape[0], -1, f.shape[-1])
  idx = jnp.argmax(jax.lax.stop_gradient(flat), axis=1)
  return jnp.take_along_axis(flat, idx[:, None, :], axis=1)[:, 0, :]


class ResNet3D(nn.Module):
  """Multi-task 3D ResNet: trunk + global average pool + one Dense per task.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block_cls: `BasicBlock` or `Bottleneck`.
    num_filters: stage-1 width (64).
    stem_kernel, stem_strides: stem conv (None: from `layout`).
    stem_pool: 3x3x3 stride-2 max-pool after the stem.
    shortcut_type: "A" or "B".
    dilations, stage_strides: per stage (None: from `layout`).
    heads: task name -> output size (e.g. {"sequence": 5, "spacing": 1}).
    head_dropout: dropout on the pooled features before the heads (train).
    layout: "radnet" or "medicalnet".
    dtype: compute dtype; param_dtype: parameter dtype.
    conv_impl: "auto" | "xla" | "taps" (see `layers.py`).
    global_pool: "avg" (embedding = mean of the last stage) or "avgmax"
      (mean and max concatenated: twice the width; the max keeps small bright
      structures such as enhanced vessels that a mean over the volume dilutes).
    pool_stages: how many of the last stages are pooled into the embedding
      (1 = the last stage only). More stages add the pooled features of
      finer maps: on a 64-voxel input the last ResNet stage is 2x2x2, where a
      vessel of one or two input voxels is already mixed with its
      surroundings; stage 2 (8x8x8) and stage 3 (4x4x4) still resolve it.
    input_windows: ``((lo, hi), ...)`` in input units: a learnable intensity
      curve stretching those windows before the trunk (`intensity.py`); empty
      = the input goes to the trunk as is.

  `__call__(x, train)`: `x` `(B, D, H, W, C)` -> `(outputs, features)`; see
  the module docstring. Dropout needs a "dropout" rng when train and
  head_dropout > 0.
  """
  stage_sizes: Sequence[int]
  block_cls: type[nn.Module] = BasicBlock
  num_filters: int = 64
  stem_kernel: Sequence[int] | None = None
  stem_strides: Sequence[int] | None = None
  stem_pool: bool = True
  shortcut_type: str = "B"
  dilations: Sequence[int] | None = None
  stage_strides: Sequence[int] | None = None
  heads: Mapping[str, int] = FrozenDict()
  head_dropout: float = 0.0
  layout: str = "radnet"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_impl: str = "auto"
  input_windows: Sequence[Sequence[float]] = ()
  global_pool: str = "avg"
  pool_stages: int = 1

  def trunk_kwargs(self) -> dict[str, Any]:
    """The kwargs that build this model's `ResNetTrunk` (for ResNetVNet)."""
    return dict(stage_sizes=tuple(self.stage_sizes), block_cls=self.block_cls,
                num_filters=self.num_filters, stem_kernel=self.stem_kernel,
                stem_strides=self.stem_strides, stem_pool=self.stem_pool,
                shortcut_type=self.shortcut_type, dilations=self.dilations,
                stage_strides=self.stage_strides, layout=self.layout,
                dtype=self.dtype, param_dtype=self.param_dtype,
                conv_impl=self.conv_impl)

  @nn.compact
  def __call__(self, x: Array, train: bool
               ) -> tuple[dict[str, Array], list[Array]]:
    if self.input_windows:
      x = InputWindows(tuple(tuple(float(v) for v in w) for w in self.input_windows),
                       name="input_windows")(x)
    features = ResNetTrunk(**self.trunk_kwargs(), name="trunk")(x, train)
    if self.global_pool not in ("avg", "avgmax"):
      raise ValueError(f"global_pool must be 'avg' or 'avgmax', got {self.global_pool!r}")
    n_stages, k = len(features) - 1, int(self.pool_stages)   # features[0] is the stem
    if not 1 <= k <= n_stages:
      raise ValueError(f"pool_stages must be in 1..{n_stages}, got {self.pool_stages}")
    # The last stage first, so that with pool_stages=1 the embedding is the
    # one of earlier checkpoints (mean, then max, of the last stage).
    pooled = []
    for f in features[:-k - 1:-1]:
      f = f.astype(jnp.float32)
      pooled.append(jnp.mean(f, axis=(1, 2, 3)))
      if self.global_pool == "avgmax":
        pooled.append(_global_max(f))
    emb = jnp.concatenate(pooled, axis=-1)
    outputs = {"embedding": emb}
    h = emb
    if self.head_dropout > 0:
      h = nn.Dropout(self.head_dropout, deterministic=not train)(h)
    for task, n in dict(self.heads).items():
      if task == "embedding":
        raise ValueError("'embedding' is reserved and cannot be a head name")
      outputs[task] = nn.Dense(int(n), dtype=jnp.float32,
                               param_dtype=self.param_dtype,
                               name=f"head_{task}")(h)
    return outputs, features


ResNet10 = functools.partial(ResNet3D, stage_sizes=(1, 1, 1, 1),
                             block_cls=BasicBlock)
ResNet18 = functools.partial(ResNet3D, stage_sizes=(2, 2, 2, 2),
                             block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet3D, stage_sizes=(3, 4, 6, 3),
                             block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet3D, stage_sizes=(3, 4, 6, 3),
                             block_cls=Bottleneck)
ResNet101 = functools.partial(ResNet3D, stage_sizes=(3, 4, 23, 3),
                              block_cls=Bottleneck)
# Tests and the CPU demo: one basic block per stage, 8 -> 64 channels.
ResNetTiny = functools.partial(ResNet3D, stage_sizes=(1, 1, 1, 1),
                               block_cls=BasicBlock, num_filters=8)

PRESETS: dict[str, Callable[..., ResNet3D]] = {
    "resnet10": ResNet10, "resnet18": ResNet18, "resnet34": ResNet34,
    "resnet50": ResNet50, "resnet101": ResNet101, "resnet_tiny": ResNetTiny,
}


def preset_kwargs(name: str) -> dict[str, Any]:
  """The keyword arguments of a preset (e.g. to build a `ResNetTrunk`)."""
  key = name.lower().replace("-", "")
  if key not in PRESETS:
    raise ValueError(f"unknown model {name!r}; known: {sorted(PRESETS)}")
  return dict(PRESETS[key].keywords)


def get_model(name: str, **kwargs: Any) -> ResNet3D:
  """A preset by name ("resnet10/18/34/50/101", "resnet_tiny"), kwargs override."""
  return ResNet3D(**{**preset_kwargs(name), **kwargs})
