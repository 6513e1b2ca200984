"""Segmentation networks: Milletari's V-Net and a ResNet-encoder V-Net.

Both map `(B, D, H, W, C_in)` volumes to per-voxel float32 logits
`(B, D, H, W, out_channels)` at input resolution: `model.apply(vars, x, train)`.

`VNet` follows MONAI's networks/nets/vnet.py (itself the official Caffe V-Net):
input transition (5^3 conv + channel-tiled input residual), down transitions
(2^3 stride-2 conv, n residual 5^3 convs), up transitions (2^3 stride-2
transposed conv, concat skip, n residual 5^3 convs), output transition (5^3
conv, 1^3 conv). ELU or per-channel PReLU, BatchNorm, channel dropout.

`ResNetVNet` uses the pretraining `ResNetTrunk` as submodule "trunk" (same
parameter names and shapes as `ResNet3D`, so `params['trunk']` of a pretraining
checkpoint loads 1:1) and a V-Net style decoder fed by the per-stage skips.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from radnet_jax.models.intensity import InputWindows
from radnet_jax.models.layers import Conv3D, ConvTranspose3D, batch_norm
from radnet_jax.models.resnet3d import ResNetTrunk, preset_kwargs

Array = jax.Array
_TRUNK_FIELDS = ("stage_sizes", "block_cls", "num_filters", "stem_kernel",
                 "stem_strides", "stem_pool", "shortcut_type", "dilations",
                 "stage_strides", "layout")


class PReLU(nn.Module):
  """Per-channel PReLU (PyTorch `nn.PReLU(num_parameters=C)`, slope 0.25)."""
  negative_slope_init: float = 0.25

  @nn.compact
  def __call__(self, x: Array) -> Array:
    a = self.param("negative_slope",
                   nn.initializers.constant(self.negative_slope_init),
                   (x.shape[-1],), jnp.float32)
    return jnp.where(x >= 0, x, a.astype(x.dtype) * x)


def _act(name: str) -> Any:
  """A factory `make(name=None) -> callable` for the activation."""
  if name == "elu":
    return lambda name=None: nn.elu
  if name == "prelu":
    return lambda name=None: PReLU(name=name)
  if name == "relu":
    return lambda name=None: nn.relu
  raise ValueError(f"act must be 'elu', 'prelu' or 'relu', got {name!r}")


class _Dropout3d(nn.Module):
  """PyTorch Dropout3d: drops whole channels of each example (rate p).

  The `(B, 1, 1, 1, C)` mask takes the batch sharding of `x`: under the
  trainer's jit with an Explicit "data" mesh, flax's `nn.Dropout(...,
  broadcast_dims=...)` broadcast an unsharded mask against the batch-sharded
  activations and raised ShardingTypeError.
  """
  rate: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep,
                                (x.shape[0], 1, 1, 1, x.shape[-1]))
    sharding = jax.typeof(x).sharding
    if not sharding.mesh.empty and len(sharding.spec) and sharding.spec[0]:
      mask = jax.sharding.reshard(mask, jax.sharding.NamedSharding(
          sharding.mesh, jax.sharding.PartitionSpec(sharding.spec[0])))
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def _channel_dropout(rate: float | None, train: bool, x: Array) -> Array:
  """Dropout3d: drops whole channels (mask broadcast over D, H, W)."""
  if not rate:
    return x
  return _Dropout3d(rate)(x, deterministic=not train)


class _ConvBlocks(nn.Module):
  """n x (conv -> BN -> act), then act(out + residual): V-Net's residual stage.

  `residual` defaults to the input (MONAI adds the pre-dropout tensor in the
  down transitions, so it is passed explicitly there).
  """
  n: int
  kernel: int
  act: str
  dtype: Any
  conv_impl: str
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool,
               residual: Array | None = None) -> Array:
    act = _act(self.act)
    y = x
    for i in range(self.n):
      y = Conv3D(x.shape[-1], self.kernel, use_bias=self.use_bias,
                 dtype=self.dtype, conv_impl=self.conv_impl,
                 name=f"conv{i + 1}")(y)
      y = batch_norm(train, self.dtype, name=f"bn{i + 1}")(y)
      y = act()(y)
    return act()(y + (x if residual is None else residual))


class VNet(nn.Module):
  """V-Net (Milletari et al. 2016), structured like MONAI's `VNet`.

  Attributes:
    in_channels: input channels; filters[0] must be a multiple of it.
    out_channels: classes (logits per voxel).
    filters: channels at the 5 resolutions (16, 32, 64, 128, 256).
    act: "elu" (MONAI default) or "prelu" (per channel, the paper's).
    dropout_down: channel dropout in the last two down transitions.
    dropout_up: (on the input, on the skip) of the up transitions; the
      first applies to the two deepest up transitions only, as in MONAI.
    use_bias: bias in the convolutions followed by BatchNorm.
    dtype, conv_impl: compute dtype and conv lowering (`layers.py`).

  Sizes that are not multiples of 16 are zero-padded at the high end and the
  logits cropped back, so any `(D, H, W)` works.
  """
  in_channels: int = 1
  out_channels: int = 2
  filters: Sequence[int] = (16, 32, 64, 128, 256)
  act: str = "elu"
  dropout_down: float | None = 0.5
  dropout_up: tuple[float | None, float | None] = (0.5, 0.5)
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """`x` `(B, D, H, W, in_channels)` -> float32 `(B, D, H, W, out_channels)`."""
    if x.ndim != 5 or x.shape[-1] != self.in_channels:
      raise ValueError(f"VNet wants (B, D, H, W, {self.in_channels}) input, "
                       f"got {x.shape}")
    f = tuple(self.filters)
    if len(f) != 5 or f[0] % self.in_channels:
      raise ValueError(f"filters must be 5 ints with filters[0] a multiple of "
                       f"in_channels, got {f}")
    conv = functools.partial(Conv3D, dtype=self.dtype,
                             param_dtype=self.param_dtype,
                             conv_impl=self.conv_impl)
    norm = functools.partial(batch_norm, train, self.dtype)
    act = _act(self.act)
    blocks = functools.partial(_ConvBlocks, kernel=5, act=self.act,
                               dtype=self.dtype, conv_impl=self.conv_impl,
                               use_bias=self.use_bias)

    size = x.shape[1:4]
    pad = [(-n) % 16 for n in size]
    if any(pad):
      x = jnp.pad(x, ((0, 0),) + tuple((0, p) for p in pad) + ((0, 0),))
    x = x.astype(self.dtype)

    # ---- input transition: 5^3 conv + the input tiled to filters[0].
    y = conv(f[0], 5, use_bias=self.use_bias, name="in_conv")(x)
    y = norm(name="in_bn")(y)
    y = act(name="in_act")(y + jnp.tile(x, (1, 1, 1, 1,
                                            f[0] // self.in_channels)))
    skips = [y]

    # ---- down transitions.
    for i, n in enumerate((1, 2, 3, 2)):
      down = conv(f[i + 1], 2, 2, padding=0, use_bias=self.use_bias,
                  name=f"down{i + 1}_conv")(y)
      down = act(name=f"down{i + 1}_act")(norm(name=f"down{i + 1}_bn")(down))
      y = _channel_dropout(self.dropout_down if i >= 2 else None, train, down)
      y = blocks(n, name=f"down{i + 1}_blocks")(y, train, down)
      skips.append(y)

    # ---- up transitions: deepest first.
    for j, n in enumerate((2, 2, 1, 1)):
      level = 3 - j
      skip = skips[level]
      out_ch = f[level + 1]
      if j < 2:
        y = _channel_dropout(self.dropout_up[0], train, y)
      skip = _channel_dropout(self.dropout_up[1], train, skip)
      up = ConvTranspose3D(out_ch - skip.shape[-1], 2, 2, dtype=self.dtype,
                           param_dtype=self.param_dtype,
                           conv_impl=self.conv_impl, name=f"up{j + 1}_conv")(y)
      up = act(name=f"up{j + 1}_act")(norm(name=f"up{j + 1}_bn")(up))
      y = jnp.concatenate([up, skip.astype(up.dtype)], axis=-1)
      y = blocks(n, name=f"up{j + 1}_blocks")(y, train)

    # ---- output transition.
    y = conv(self.out_channels, 5, use_bias=self.use_bias, name="out_conv")(y)
    y = act(name="out_act")(norm(name="out_bn")(y))
    y = Conv3D(self.out_channels, 1, use_bias=True, dtype=jnp.float32,
               conv_impl=self.conv_impl, name="out_proj")(y)
    return y[:, :size[0], :size[1], :size[2], :].astype(jnp.float32)


def trunk_kwargs(trunk: str | Mapping[str, Any]) -> dict[str, Any]:
  """`ResNetTrunk` kwargs from a preset name or a kwargs mapping.

  A mapping may carry "preset" (a preset name) plus overrides, e.g.
  `{"preset": "resnet18", "layout": "medicalnet"}`; keys of `ResNet3D` that
  are not part of the trunk (heads, head_dropout) are ignored.
  """
  if isinstance(trunk, str):
    kw = preset_kwargs(trunk)
  else:
    trunk = dict(trunk)
    kw = preset_kwargs(trunk.pop("preset")) if "preset" in trunk else {}
    kw.update(trunk)
  if "stage_sizes" not in kw:
    raise ValueError(f"trunk needs a preset or stage_sizes, got {trunk!r}")
  return {k: v for k, v in kw.items() if k in _TRUNK_FIELDS}


class ResNetVNet(nn.Module):
  """ResNet3D trunk encoder + V-Net style decoder for segmentation.

  Attributes:
    trunk: a preset name ("resnet18", "resnet_tiny", ...) or the trunk kwargs
      of `ResNet3D` (stage_sizes, block_cls, num_filters, stem_*, layout, ...,
      or {"preset": name, **overrides}).
    out_channels: classes.
    decoder_filters: channels after fusing each skip, from deep to shallow:
      stage3, stage2, stage1, stem, full resolution (5 ints).
    decoder_convs: residual convs per decoder level.
    decoder_kernel: their kernel size.
    act: "elu" | "prelu" | "relu" in the decoder.
    dtype, param_dtype, conv_impl: as in `ResNet3D` (the trunk uses them too).
    input_windows: the learnable intensity curve in front of the trunk
      (`intensity.InputWindows`, as `ResNet3D.input_windows`; empty = none):
      a transferred trunk keeps the curve it was pretrained behind.

  Each decoder level upsamples by the exact stride between the two feature
  maps (transposed conv, kernel = stride; 1^3 conv when the resolution is the
  same, as in MedicalNet's dilated stages), crops to the skip's size (odd
  sizes), concatenates the skip, fuses with a 1^3 conv and runs residual
  convs. The last level's skip is a 3^3 conv of the input itself.
  """
  trunk: str | Mapping[str, Any] = "resnet18"
  out_channels: int = 2
  decoder_filters: Sequence[int] = (256, 128, 64, 32, 16)
  decoder_convs: Sequence[int] = (1, 1, 1, 1, 1)
  decoder_kernel: int = 3
  act: str = "elu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_impl: str = "auto"
  input_windows: Sequence[Sequence[float]] = ()

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """`x` `(B, D, H, W, C)` -> float32 logits `(B, D, H, W, out_channels)`."""
    if x.ndim != 5:
      raise ValueError(f"ResNetVNet wants (B, D, H, W, C) input, got {x.shape}")
    if self.input_windows:
      x = InputWindows(tuple(tuple(float(v) for v in w) for w in self.input_windows),
                       name="input_windows")(x)
    if len(self.decoder_filters) != 5 or len(self.decoder_convs) != 5:
      raise ValueError("decoder_filters and decoder_convs need 5 entries")
    feats = ResNetTrunk(**trunk_kwargs(self.trunk), dtype=self.dtype,
                        param_dtype=self.param_dtype, conv_impl=self.conv_impl,
                        name="trunk")(x, train)
    conv = functools.partial(Conv3D, dtype=self.dtype,
                             param_dtype=self.param_dtype,
                             conv_impl=self.conv_impl)
    norm = functools.partial(batch_norm, train, self.dtype)
    act = _act(self.act)

    full = conv(self.decoder_filters[-1], 3, name="input_conv")(
        x.astype(self.dtype))
    full = act(name="input_act")(norm(name="input_bn")(full))
    # Deep to shallow: stage3, stage2, stage1, stem, input.
    skips = [feats[3], feats[2], feats[1], feats[0], full]
    y = feats[4]
    for i, (skip, f, n) in enumerate(zip(skips, self.decoder_filters,
                                         self.decoder_convs)):
      ratio = tuple(-(-s // c) for s, c in zip(skip.shape[1:4], y.shape[1:4]))
      if ratio == (1, 1, 1):
        up = conv(f, 1, name=f"up{i + 1}_conv")(y)
      else:
        up = ConvTranspose3D(f, ratio, ratio, use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype,
                             conv_impl=self.conv_impl,
                             name=f"up{i + 1}_conv")(y)
      d, h, w = skip.shape[1:4]
      up = up[:, :d, :h, :w, :]
      up = act(name=f"up{i + 1}_act")(norm(name=f"up{i + 1}_bn")(up))
      y = jnp.concatenate([up, skip.astype(up.dtype)], axis=-1)
      y = conv(f, 1, name=f"fuse{i + 1}_conv")(y)
      y = act(name=f"fuse{i + 1}_act")(norm(name=f"fuse{i + 1}_bn")(y))
      y = _ConvBlocks(n, self.decoder_kernel, self.act, self.dtype,
                      self.conv_impl, name=f"dec{i + 1}_blocks")(y, train)
    logits = Conv3D(self.out_channels, 1, use_bias=True, dtype=jnp.float32,
                    conv_impl=self.conv_impl, name="out_proj")(y)
    return logits.astype(jnp.float32)
