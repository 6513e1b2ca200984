"""3D convolution layers whose lowering is chosen per platform.

Every 3D convolution in the models goes through `Conv3D` (and every transposed
convolution through `ConvTranspose3D`), so the lowering can change without
touching parameter names or shapes: a checkpoint written with one `conv_impl`
loads into another.

On CPU a 3D conv is written as 2D convolutions over the depth taps ("taps",
`conv3d_taps`; the lowerings and why are `radnet_jax.models.conv_lowering`),
and big-kernel convolutions on large volumes (VNet's 5^3) in the Fourier
domain; on GPU/TPU XLA's native convolution (cuDNN / TPU convolution units)
stays ("xla"). "auto" picks by `jax.default_backend()`. Which CPU lowering a
conv shape gets is autotuned per machine at first use and cached
(`radnet_jax.models.autotune.choose_lowering`; `RADNET_CONV_AUTOTUNE=0` = the
fixed rules of `conv_lowering.rule_lowering`). Transposed convs on GPU use a
sub-pixel formulation (`transpose_formulation`).

What lives here: the public layer API (`conv3d`, `conv3d_taps`,
`conv_transpose3d` and its sub-pixel form, `Conv3D`, `ConvTranspose3D`,
`max_pool3d`, `batch_norm`, `resolve_impl`, `resolve_padding`, and
`usable_cores`, re-exported from `conv_lowering`).

Layouts are channel-last: activations `(B, D, H, W, C)`, kernels
`(kD, kH, kW, C_in, C_out)`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from radnet_jax.models import autotune, conv_lowering
from radnet_jax.models.conv_lowering import Array, _reshape_steps
# Public API of this module (the bench scripts size thread pools with it);
# it lives with the depth-piece split that uses it.
from radnet_jax.models.conv_lowering import usable_cores  # noqa: F401

PaddingLike = str | int | Sequence[int] | Sequence[tuple[int, int]] | None

CONV_IMPLS = ("auto", "xla", "taps")
_DN = ("NDHWC", "DHWIO", "NDHWC")

# He/Kaiming normal on fan-out, the initialiser of MONAI's and MedicalNet's
# 3D ResNets.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def resolve_impl(conv_impl: str) -> str:
  """Maps "auto" to "taps" on CPU and "xla" elsewhere; validates the name."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
  if conv_impl == "auto":
    return "taps" if jax.default_backend() == "cpu" else "xla"
  return conv_impl


def _triple(v: int | Sequence[int], name: str) -> tuple[int, int, int]:
  if isinstance(v, int):
    return (v, v, v)
  v = tuple(int(i) for i in v)
  if len(v) != 3:
    raise ValueError(f"{name} must be an int or 3 ints, got {v}")
  return v


def resolve_padding(padding: PaddingLike, in_spatial: Sequence[int],
                    kernel: Sequence[int], strides: Sequence[int],
                    dilation: Sequence[int]) -> list[tuple[int, int]]:
  """Explicit (lo, hi) padding per spatial axis.

  None means PyTorch-style symmetric padding `dilation * (k - 1) // 2` (what
  MONAI and MedicalNet use; it differs from "SAME" at stride 2 on even sizes).
  Strings "SAME"/"VALID" follow `lax.conv_general_dilated`.
  """
  if padding is None:
    return [(d * (k - 1) // 2,) * 2 for k, d in zip(kernel, dilation)]
  if isinstance(padding, str):
    eff = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    return [tuple(p) for p in
            lax.padtype_to_pads(tuple(in_spatial), eff, tuple(strides), padding)]
  if isinstance(padding, int):
    return [(padding, padding)] * 3
  padding = list(padding)
  if len(padding) != 3:
    raise ValueError(f"padding needs 3 entries, got {padding}")
  return [(p, p) if isinstance(p, int) else (int(p[0]), int(p[1]))
          for p in padding]


def _out_size(n: int, k: int, s: int, d: int, lo: int, hi: int) -> int:
  return (n + lo + hi - d * (k - 1) - 1) // s + 1


def _keep_batch_sharding(y: Array, x: Array) -> Array:
  """Gives `y` the batch-axis sharding of `x` if a reshape dropped it.

  Under an Explicit mesh, reshapes that merge size-1 axes (a 1x1x1 volume at
  the deepest VNet level) can lose the "data" sharding of the batch axis.
  """
  sx, sy = jax.typeof(x).sharding, jax.typeof(y).sharding
  if (sx.mesh.empty or not len(sx.spec) or sx.spec[0] is None
      or (len(sy.spec) and sy.spec[0] == sx.spec[0])):
    return y
  return jax.sharding.reshard(y, jax.sharding.NamedSharding(
      sx.mesh, jax.sharding.PartitionSpec(sx.spec[0])))


def conv3d_taps(x: Array, kernel: Array, strides: Sequence[int],
                padding: Sequence[tuple[int, int]],
                dilation: Sequence[int]) -> Array:
  """3D convolution as 2D convolutions over the depth taps.

  Args:
    x: `(B, D, H, W, C)`.
    kernel: `(kD, kH, kW, C, O)`.
    strides, dilation: 3 ints each.
    padding: 3 explicit `(lo, hi)` pairs.

  Returns:
    `(B, D', H', W', O)`, equal to `lax.conv_general_dilated` with the same
    arguments (up to float summation order).

  The kD depth-shifted (and depth-strided) views of the input are stacked on
  the channel axis and the kernel reshaped to `(kH, kW, kD*C, O)`, so the
  whole 3D conv is ONE 2D conv on `(B*D', H, W, kD*C)`. Special cases that XLA
  handles badly on CPU become matmuls: 1x1x1 kernels, kernel == stride
  with no padding (VNet's 2x2x2 down convolutions, "patchify"), and output
  planes of at most `conv_lowering.IM2COL_MAX_PLANE` voxels (full im2col);
  big kernels on large volumes go through the Fourier domain
  (`conv_lowering._conv3d_fft`). Which general-case lowering a shape gets
  is `autotune.choose_lowering`.
  """
  b, d, h, w, c = x.shape
  kd, kh, kw, _, o = kernel.shape
  sd, sh, sw = strides
  dd, dh, dw = dilation
  (pd0, pd1), (ph0, ph1), (pw0, pw1) = padding

  # 1x1x1: subsample and matmul.
  if (kd, kh, kw) == (1, 1, 1) and all(p == (0, 0) for p in padding):
    xs = x[:, ::sd, ::sh, ::sw, :]
    return jnp.einsum("bdhwc,co->bdhwo", xs, kernel[0, 0, 0])

  # kernel == stride, no padding, no dilation: non-overlapping patches.
  if ((kd, kh, kw) == (sd, sh, sw) and all(p == (0, 0) for p in padding)
      and (dd, dh, dw) == (1, 1, 1)):
    od, oh, ow = d // kd, h // kh, w // kw
    xs = x[:, :od * kd, :oh * kh, :ow * kw, :]
    # One axis split / merge per reshape (see `_reshape_steps`).
    xs = _reshape_steps(xs, [(b, od, kd, oh * kh, ow * kw, c),
                             (b, od, kd, oh, kh, ow * kw, c),
                             (b, od, kd, oh, kh, ow, kw, c)])
    xs = xs.transpose(0, 1, 3, 5, 2, 4, 6, 7)  # (b, od, oh, ow, kd, kh, kw, c)
    xs = _reshape_steps(xs, [(b, od, oh, ow, kd, kh, kw * c),
                             (b, od, oh, ow, kd, kh * kw * c),
                             (b, od, oh, ow, kd * kh * kw * c)])
    return jnp.einsum("bdhwk,ko->bdhwo", xs, kernel.reshape(-1, o))

  od = _out_size(d, kd, sd, dd, pd0, pd1)
  if od <= 0:
    raise ValueError(f"conv output depth <= 0 for input depth {d}, kernel {kd}")
  oh = _out_size(h, kh, sh, dh, ph0, ph1)
  ow = _out_size(w, kw, sw, dw, pw0, pw1)
  out_size = (od, oh, ow)
  name = autotune.choose_lowering(x, kernel, strides, padding, dilation,
                                  out_size)
  return conv_lowering._LOWERINGS[name](x, kernel, out_size, strides, padding,
                                        dilation)


def conv3d(x: Array, kernel: Array, strides: Sequence[int] = (1, 1, 1),
           padding: PaddingLike = None, dilation: Sequence[int] = (1, 1, 1),
           impl: str = "auto") -> Array:
  """Functional 3D convolution, `(B, D, H, W, C) x (kD, kH, kW, C, O)`.

  `impl` is "xla" (`lax.conv_general_dilated`), "taps" (`conv3d_taps`) or
  "auto" (taps on CPU). `padding` as in `resolve_padding`.
  """
  if x.ndim != 5 or kernel.ndim != 5:
    raise ValueError(f"conv3d wants (B, D, H, W, C) input and 5D kernel, got "
                     f"{x.shape} and {kernel.shape}")
  if x.shape[-1] != kernel.shape[3]:
    raise ValueError(f"input has {x.shape[-1]} channels, kernel expects "
                     f"{kernel.shape[3]}")
  strides = _triple(strides, "strides")
  dilation = _triple(dilation, "dilation")
  pads = resolve_padding(padding, x.shape[1:4], kernel.shape[:3], strides,
                         dilation)
  if resolve_impl(impl) == "xla":
    return lax.conv_general_dilated(
        x, kernel, window_strides=strides, padding=pads,
        rhs_dilation=dilation, dimension_numbers=_DN)
  return _keep_batch_sharding(conv3d_taps(x, kernel, strides, pads, dilation),
                              x)


# How the "xla" path writes a transposed conv, per backend (None: "dilated"):
# "dilated" is `lax.conv_transpose`, a conv over the stride-dilated input
# (XLA's CPU and TPU form; on GPU its 3D forms and their gradients are a slow
# cuDNN path, jax issues 8537 / 31662 / 23783), "subpixel" one ordinary conv
# to s^3 * O channels plus a depth-to-space (`_conv_transpose3d_subpixel`:
# for VNet's 2^3 stride-2 up convs a 1x1x1 conv, i.e. a GEMM, with plain
# GEMM gradients). TRANSPOSE_IMPL or $RADNET_TRANSPOSE_IMPL override it for
# every backend; the CPU default path ("taps") does not use this.
TRANSPOSE_IMPLS = ("dilated", "subpixel")
TRANSPOSE_BY_BACKEND = {"gpu": "subpixel"}
TRANSPOSE_IMPL: str | None = None
TRANSPOSE_ENV = "RADNET_TRANSPOSE_IMPL"


def transpose_formulation(backend: str | None = None) -> str:
  """The "xla"-path transposed-conv formulation for `backend` (default: JAX's)."""
  form = TRANSPOSE_IMPL or os.environ.get(TRANSPOSE_ENV) or None
  if form is None:
    form = TRANSPOSE_BY_BACKEND.get(backend or jax.default_backend(),
                                    "dilated")
  if form not in TRANSPOSE_IMPLS:
    raise ValueError(f"transposed-conv formulation must be one of "
                     f"{TRANSPOSE_IMPLS}, got {form!r}")
  return form


def _conv_transpose3d_subpixel(x: Array, kernel: Array,
                               strides: Sequence[int]) -> Array:
  """PyTorch-semantics transposed conv as one conv + depth-to-space.

  Output voxel `s*q + p` (phase p < s per axis) sums `x[q - j] @ w[p + s*j]`
  over `j < J = ceil(k / s)`: for every phase an ordinary conv of `x` with
  the taps `p, p + s, ...` of the kernel. The kernel is zero-padded to `J*s`
  taps per axis and the s^3 phases become output channels, so the whole op
  is ONE stride-1 conv `(J, J, J, C, s^3 * O)` with padding J - 1 on both
  sides (a 1x1x1 conv when kernel == stride), then the phases are moved
  into space and the result cropped to `(n - 1) * s + k`. No input dilation:
  forward, input gradient and weight gradient are ordinary convolutions.
  """
  b, d, h, w, c = x.shape
  ks = kernel.shape[:3]
  o = kernel.shape[4]
  s0, s1, s2 = strides
  j0, j1, j2 = (-(-k // st) for k, st in zip(ks, strides))
  kp = jnp.pad(kernel, [(0, j * st - k) for j, st, k in
                        zip((j0, j1, j2), strides, ks)] + [(0, 0), (0, 0)])
  kp = kp.reshape(j0, s0, j1, s1, j2, s2, c, o)[::-1, :, ::-1, :, ::-1]
  kp = kp.transpose(0, 2, 4, 6, 1, 3, 5, 7).reshape(j0, j1, j2, c,
                                                     s0 * s1 * s2 * o)
  z = lax.conv_general_dilated(
      x, kp.astype(x.dtype), (1, 1, 1), [(j - 1, j - 1) for j in (j0, j1, j2)],
      dimension_numbers=_DN)
  n0, n1, n2 = d + j0 - 1, h + j1 - 1, w + j2 - 1
  # One axis split / merge per reshape (see `_reshape_steps`).
  z = _reshape_steps(z, [(b, n0, n1, n2, s0, s1 * s2 * o),
                         (b, n0, n1, n2, s0, s1, s2 * o),
                         (b, n0, n1, n2, s0, s1, s2, o)])
  z = z.transpose(0, 1, 4, 2, 5, 3, 6, 7)    # b n0 s0 n1 s1 n2 s2 o
  z = _reshape_steps(z, [(b, n0 * s0, n1, s1, n2, s2, o),
                         (b, n0 * s0, n1 * s1, n2, s2, o),
                         (b, n0 * s0, n1 * s1, n2 * s2, o)])
  z = z[:, :(d - 1) * s0 + ks[0], :(h - 1) * s1 + ks[1],
        :(w - 1) * s2 + ks[2]]
  return _keep_batch_sharding(z, x)


def conv_transpose3d(x: Array, kernel: Array, strides: Sequence[int],
                     impl: str = "auto",
                     transpose_impl: str | None = None) -> Array:
  """Transposed 3D conv, PyTorch `ConvTranspose3d(padding=0)` semantics.

  Args:
    x: `(B, D, H, W, C)`.
    kernel: `(kD, kH, kW, C, O)`; each input voxel i adds `x[i] @ kernel[a]`
      to output voxel `s*i + a`.
    strides: 3 ints.
    impl: as in `conv3d` ("auto" = "taps" on CPU, "xla" elsewhere).
    transpose_impl: the formulation of the "xla" path, "dilated" or
      "subpixel"; None = `transpose_formulation()` (per backend: subpixel
      on GPU, dilated elsewhere).

  Returns:
    `(B, (D-1)*sD + kD, ..., O)`.

  With kernel == stride (VNet's 2x2x2 up-convolutions) the patches do not
  overlap and the whole op is one matmul plus a reshape ("taps" path).
  """
  strides = _triple(strides, "strides")
  kd, kh, kw, c, o = kernel.shape
  if x.shape[-1] != c:
    raise ValueError(f"input has {x.shape[-1]} channels, kernel expects {c}")
  if resolve_impl(impl) == "taps":
    if (kd, kh, kw) == strides:
      b, d, h, w, _ = x.shape
      y = jnp.einsum("bdhwc,xyzco->bdxhywzo", x, kernel)
      y = _reshape_steps(y, [(b, d * kd, h, kh, w, kw, o),
                             (b, d * kd, h * kh, w, kw, o),
                             (b, d * kd, h * kh, w * kw, o)])
      return _keep_batch_sharding(y, x)
    form = "dilated"        # the CPU path, as measured there
  else:
    form = transpose_impl or transpose_formulation()
    if form not in TRANSPOSE_IMPLS:
      raise ValueError(f"transpose_impl must be one of {TRANSPOSE_IMPLS}, "
                       f"got {form!r}")
  if form == "subpixel":
    return _conv_transpose3d_subpixel(x, kernel, strides)
  return lax.conv_transpose(x, kernel[::-1, ::-1, ::-1], strides, "VALID",
                            dimension_numbers=_DN)


class Conv3D(nn.Module):
  """3D convolution with a selectable lowering; params `kernel` (+ `bias`).

  Attributes:
    features: output channels.
    kernel_size: (kD, kH, kW) or an int.
    strides: 3 ints or an int.
    padding: None (symmetric, PyTorch-style), "SAME", "VALID", an int or 3
      (lo, hi) pairs.
    dilation: 3 ints or an int.
    use_bias: add a bias (False before a norm layer).
    dtype: compute dtype (e.g. bfloat16 on accelerators).
    param_dtype: parameter dtype (float32).
    conv_impl: "auto" | "xla" | "taps" (see module docstring).
  """
  features: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  padding: PaddingLike = None
  dilation: int | Sequence[int] = 1
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_impl: str = "auto"
  kernel_init: Any = kaiming_fan_out
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """`(B, D, H, W, C)` -> `(B, D', H', W', features)`."""
    ks = _triple(self.kernel_size, "kernel_size")
    kernel = self.param("kernel", self.kernel_init,
                        (*ks, x.shape[-1], self.features), self.param_dtype)
    y = conv3d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides,
               self.padding, self.dilation, self.conv_impl)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,),
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class ConvTranspose3D(nn.Module):
  """Transposed 3D conv (PyTorch padding=0 semantics); params `kernel`, `bias`.

  Output size per axis `(n - 1) * stride + kernel`; kernel `(kD, kH, kW, C, O)`.
  `transpose_impl` picks the formulation of the "xla" path ("dilated" |
  "subpixel", None = per backend; see `conv_transpose3d`).
  """
  features: int
  kernel_size: int | Sequence[int] = 2
  strides: int | Sequence[int] = 2
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_impl: str = "auto"
  transpose_impl: str | None = None   # "xla" path: see `conv_transpose3d`
  kernel_init: Any = kaiming_fan_out
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """`(B, D, H, W, C)` -> `(B, (D-1)*s+k, ..., features)`."""
    ks = _triple(self.kernel_size, "kernel_size")
    kernel = self.param("kernel", self.kernel_init,
                        (*ks, x.shape[-1], self.features), self.param_dtype)
    y = conv_transpose3d(x.astype(self.dtype), kernel.astype(self.dtype),
                         self.strides, self.conv_impl, self.transpose_impl)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,),
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def _max_pool_axis(x: Array, axis: int, k: int, s: int, lo: int,
                   hi: int) -> Array:
  """1D max-pool of `x` along `axis` (padding with -inf)."""
  if k == 1 and s == 1 and lo == hi == 0:
    return x
  if lo or hi:
    pads = [(0, 0)] * x.ndim
    pads[axis] = (lo, hi)
    x = jnp.pad(x, pads, constant_values=jnp.array(-jnp.inf, x.dtype))
  n_out = (x.shape[axis] - k) // s + 1
  if n_out <= 0:
    raise ValueError(f"max-pool output size <= 0 on axis {axis}: input "
                     f"{x.shape[axis] - lo - hi}, window {k}")
  y = None
  for t in range(k):
    v = lax.slice_in_dim(x, t, t + (n_out - 1) * s + 1, s, axis=axis)
    # `where(y >= v)` keeps the earlier tap on ties, so the gradient goes to
    # the first maximum in window order, like XLA's select-and-scatter.
    y = v if y is None else jnp.where(y >= v, y, v)
  return y


def max_pool3d(x: Array, window: int | Sequence[int],
               strides: int | Sequence[int],
               padding: Sequence[tuple[int, int]] | None = None,
               impl: str = "auto") -> Array:
  """3D max-pool of `(B, D, H, W, C)`, padding with -inf (flax `nn.max_pool`).

  Args:
    x: `(B, D, H, W, C)`.
    window, strides: an int or 3 ints.
    padding: 3 explicit `(lo, hi)` pairs; None means PyTorch-style
      `(k - 1) // 2` on both sides (MONAI's and MedicalNet's 3x3x3/2 pool).
    impl: "xla" is `nn.max_pool` (reduce_window; its gradient is XLA's
      select-and-scatter); "taps" (and "auto" on CPU) is a separable max over
      strided slices, W then H then D. Max is separable and both paths send
      the gradient to the first maximum of each window in (d, h, w) order, so
      values and gradients are equal; on CPU the separable form avoids the
      select-and-scatter lowering (~10% of a ResNet-18 step on 2 cores).

  Returns:
    `(B, D', H', W', C)`, `D' = (D + lo + hi - k) // s + 1` per axis.
  """
  window = _triple(window, "window")
  strides = _triple(strides, "strides")
  if padding is None:
    padding = [((k - 1) // 2,) * 2 for k in window]
  padding = [tuple(int(v) for v in p) for p in padding]
  if x.ndim != 5 or len(padding) != 3:
    raise ValueError(f"max_pool3d wants (B, D, H, W, C) input and 3 padding "
                     f"pairs, got {x.shape} and {padding}")
  if resolve_impl(impl) == "xla":
    return nn.max_pool(x, window, strides, padding=tuple(padding))
  for axis in (3, 2, 1):
    x = _max_pool_axis(x, axis, window[axis - 1], strides[axis - 1],
                       *padding[axis - 1])
  return x


def batch_norm(train: bool, dtype: Any = jnp.float32, name: str | None = None,
               scale_init: Any = nn.initializers.ones) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1 there = 0.9 here, eps 1e-5).

  No `axis_name`: under jit with a sharded batch the statistics are global.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                      scale_init=scale_init, name=name)
