"""3D convolution layers whose lowering is chosen per platform.

Every 3D convolution in the models goes through `Conv3D` (and every transposed
convolution through `ConvTranspose3D`), so the lowering can change without
touching parameter names or shapes: a checkpoint written with one `conv_impl`
loads into another.

Why: XLA's CPU backend runs native 3D convolutions slowly (a ResNet-18-3D train
step was ~6x slower than PyTorch/oneDNN on the same 2 cores; the input gradient
of a stride-2 3x3x3 conv ran at ~2 GFLOP/s). Its 2D convolutions and matmuls
are much better tuned, so on CPU a 3D conv is written as 2D convolutions over
the depth taps ("taps"), and big-kernel convolutions on large volumes (VNet's
5^3) in the Fourier domain; on GPU/TPU XLA's native convolution (cuDNN / TPU
convolution units) stays ("xla"). "auto" picks by `jax.default_backend()`.
Which CPU lowering a conv shape gets is autotuned per machine at first use
and cached (`choose_lowering`; `RADNET_CONV_AUTOTUNE=0` = the fixed rules of
`rule_lowering`). Transposed convs on GPU use a sub-pixel formulation
(`transpose_formulation`).

Layouts are channel-last: activations `(B, D, H, W, C)`, kernels
`(kD, kH, kW, C_in, C_out)`.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
PaddingLike = str | int | Sequence[int] | Sequence[tuple[int, int]] | None

CONV_IMPLS = ("auto", "xla", "taps")
_DN = ("NDHWC", "DHWIO", "NDHWC")
_DN2 = ("NHWC", "HWIO", "NHWC")

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


def _reshape_steps(x: Array, shapes: Sequence[Sequence[int]]) -> Array:
  """Reshapes `x` through `shapes` in turn (row-major, so free in XLA).

  Under jit with explicitly sharded inputs (`jax.make_mesh` axes are
  `AxisType.Explicit`, the trainer's data-parallel batch), JAX infers a
  reshape's output sharding only when it splits or merges ONE group of axes;
  several groups at once raise `ShardingTypeError`. Callers therefore list
  one split or merge per step. A batch sharded on "data" stays sharded on
  "data" (merging it as the major axis, `(B, D') -> (B*D')`, is allowed).
  """
  for shape in shapes:
    x = x.reshape(tuple(int(s) for s in shape))
  return x


# Output planes of at most this many voxels (H' * W') use a full im2col + one
# matmul instead of 2D convolutions: XLA's CPU 2D conv (Eigen) is pathological
# on tiny planes with many channels (ResNet stage 4 at 2x2, VNet's 4x4 level:
# 0.3-1.5 GFLOP/s, ~10 s of a VNet step); the patch matrix there is small
# (at most B * D' * 16 * kD*kH*kW * C elements).
IM2COL_MAX_PLANE = 16

# Convs to at most C / OUT_TAPS_MAX_RATIO channels with depth stride 1 fold
# the depth taps into the output channels (`_conv3d_out_taps`) instead of the
# input channels. Measured at 64^3, 5^3 kernels, 2 cores: 32 -> 2 is 3x faster
# that way; 32 -> 32 (gradients) and 32 -> 16 (YNNPACK) are slower.
OUT_TAPS_MAX_RATIO = 4


def _conv3d_im2col(x: Array, kernel: Array, out_size: Sequence[int],
                   strides: Sequence[int], padding: Sequence[tuple[int, int]],
                   dilation: Sequence[int]) -> Array:
  """3D conv as one matmul over all kD*kH*kW shifted views (im2col).

  `x` `(B, D, H, W, C)`, `kernel` `(kD, kH, kW, C, O)`, `out_size` the
  output `(D', H', W')`; returns `(B, D', H', W', O)`. Only for small outputs:
  the patch tensor has `kD*kH*kW` times the output voxels times C elements.
  """
  b, _, _, _, c = x.shape
  kd, kh, kw, _, o = kernel.shape
  od, oh, ow = out_size
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  views = []
  for a in range(kd):
    for bb in range(kh):
      for cc in range(kw):
        start = (0, a * dilation[0], bb * dilation[1], cc * dilation[2], 0)
        stop = (b, start[1] + (od - 1) * strides[0] + 1,
                start[2] + (oh - 1) * strides[1] + 1,
                start[3] + (ow - 1) * strides[2] + 1, c)
        views.append(lax.slice(xp, start, stop, (1, *strides, 1)))
  xs = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
  return jnp.einsum("bdhwk,ko->bdhwo", xs, kernel.reshape(-1, o))


# XLA:CPU runs each 2D convolution (a YNNPACK fusion) on ONE thread; only
# independent ops run concurrently on its intra-op pool (measured: a 64^3
# 5^3 32->32 conv took 0.94 s wall for 0.97 CPU-s on 2 cores, so a VNet step
# kept ~1.5 of 2 cores busy). The depth-tap conv is therefore split along the
# output depth into independent pieces (tap stack + 2D conv each), at most one
# per usable core and each of at least `CONV_SPLIT_MIN_FLOPS`; forward, input
# and weight gradients of the pieces then run in parallel. None = the cores
# this process may run on; 1 disables the split.
CONV_SPLIT: int | None = None
CONV_SPLIT_MIN_FLOPS = 5e7


def usable_cores() -> int:
  """CPU cores this process may run on (its affinity mask, else all)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _batch_devices(x: Array) -> int:
  """How many devices the batch axis of `x` is sharded over (1 if none)."""
  s = jax.typeof(x).sharding
  if s.mesh.empty or not len(s.spec) or s.spec[0] is None:
    return 1
  axes = s.spec[0] if isinstance(s.spec[0], tuple) else (s.spec[0],)
  return math.prod(s.mesh.shape[a] for a in axes)


def _n_pieces(x: Array, depth: int, flops: float) -> int:
  """Independent pieces for a conv with `depth` output slices."""
  if _batch_devices(x) > 1:
    return 1    # devices already split the batch, one thread each
  n = CONV_SPLIT if CONV_SPLIT is not None else usable_cores()
  if CONV_SPLIT_MIN_FLOPS > 0:
    n = min(n, int(flops // CONV_SPLIT_MIN_FLOPS))
  return max(1, min(n, depth))


def _pieces(x: Array, depth: int, flops: float) -> list[tuple[int, int]]:
  """`(lo, hi)` ranges of `depth` slices, one per independent piece."""
  n = _n_pieces(x, depth, flops)
  bounds = [depth * i // n for i in range(n + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


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


def _conv3d_out_taps(x: Array, kernel: Array, out_size: Sequence[int],
                     strides: Sequence[int],
                     padding: Sequence[tuple[int, int]],
                     dilation: Sequence[int]) -> Array:
  """Stride-1-in-depth 3D conv with the depth taps folded into the OUTPUT.

  One 2D conv with kernel `(kH, kW, C, kD*O)` over every (padded) input
  slice gives, per slice, its contribution to each of the kD output depths
  it feeds; output depth i sums tap t of slice `i + t*dD`. The intermediate
  has kD*O channels instead of the kD*C of the input-side stacking, which is
  what makes a conv to few channels (a segmentation head, 32 -> 2) fast:
  measured on 2 cores, 64^3, 5^3 32->2, forward 0.41 -> 0.12 s and forward +
  gradients 0.76 -> 0.45 s. Split into depth pieces like `conv3d_taps`.
  """
  b, _, h, w, c = x.shape
  kd, kh, kw, _, o = kernel.shape
  od, oh, ow = out_size
  (pd0, pd1), (ph0, ph1), (pw0, pw1) = padding
  _, sh, sw = strides
  dd, dh, dw = dilation
  if pd0 or pd1:
    x = jnp.pad(x, ((0, 0), (pd0, pd1), (0, 0), (0, 0), (0, 0)))
  used = od + (kd - 1) * dd          # input slices that feed some output
  k2 = kernel.transpose(1, 2, 3, 0, 4).reshape(kh, kw, c, kd * o).astype(x.dtype)
  pieces = []
  for lo, hi in _pieces(x, used, 2.0 * b * used * oh * ow * kh * kw * c * kd * o):
    z = lax.slice_in_dim(x, lo, hi, axis=1).reshape(b * (hi - lo), h, w, c)
    z = lax.conv_general_dilated(
        z, k2, window_strides=(sh, sw), padding=((ph0, ph1), (pw0, pw1)),
        rhs_dilation=(dh, dw), dimension_numbers=_DN2)
    pieces.append(z.reshape(b, hi - lo, oh, ow, kd * o))
  z = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)
  z = z.reshape(b, used, oh, ow, kd, o)
  y = None
  for t in range(kd):
    zt = lax.slice_in_dim(z, t * dd, t * dd + od, axis=1)[:, :, :, :, t]
    y = zt if y is None else y + zt
  return y


# Stride-1 convs with at least FFT_MIN_TAPS kernel taps, FFT_MIN_CHANNELS to
# FFT_MAX_CHANNELS channels on each side and enough work (output voxels per
# sample x the smaller channel count >= FFT_MIN_WORK) run as tiled FFT
# convolutions (`_conv3d_fft`). Measured on 2 cores, 5^3 kernels, forward +
# gradients (`python bench/conv_layers.py` vs `--no-fft`, scratch sweeps):
# 64^3 32->32 1.35 -> 0.75 s, 64^3 64->64 4.8 -> 1.7 s, 32^3 64->64 0.61 ->
# 0.49 s, 64^3 8->8 0.22 -> 0.13 s; even at 32^3 32->32 and 40^3 16->16
# (the threshold); slower for 1 -> 16 and 32 -> 2 (one FFT'd channel costs
# as much as 125 taps of a thin direct conv) and for 3^3 kernels.
# False disables the path.
CONV_FFT = True
FFT_MIN_TAPS = 125
FFT_MIN_CHANNELS = 8
FFT_MAX_CHANNELS = 64
FFT_MIN_WORK = 2 ** 20
# Output tile edge (FFT size = tile + kernel - 1: 20 for 5^3), halved while
# the batch holds fewer than FFT_MIN_TILES tiles: XLA:CPU's per-frequency
# (tiles x C) @ (C x O) products are slow when that matmul is tiny.
FFT_TILE = 16
FFT_MIN_TILES = 16


def _use_fft(x: Array, kernel: Array, strides: Sequence[int],
             padding: Sequence[tuple[int, int]], dilation: Sequence[int],
             out_size: Sequence[int]) -> bool:
  c, o = kernel.shape[3:]
  return (CONV_FFT and tuple(strides) == (1, 1, 1)
          and tuple(dilation) == (1, 1, 1)
          and all(p >= 0 for pair in padding for p in pair)
          and math.prod(kernel.shape[:3]) >= FFT_MIN_TAPS
          and FFT_MIN_CHANNELS <= min(c, o)
          and max(c, o) <= FFT_MAX_CHANNELS
          and math.prod(out_size) * min(c, o) >= FFT_MIN_WORK
          and _batch_devices(x) == 1)


def _fft_tiles(batch: int, out_size: Sequence[int],
               kernel: Sequence[int]) -> list[int]:
  """Output tile edge per axis for `_conv3d_fft`.

  FFT_TILE, halved (not below 8) while the batch holds fewer than
  FFT_MIN_TILES tiles; never longer than the axis, never shorter than
  kernel - 1 (the halo comes from the next tile).
  """
  t = FFT_TILE
  while True:
    tile = [max(min(t, n), k - 1, 1) for n, k in zip(out_size, kernel)]
    tiles = batch * math.prod(-(-n // s) for n, s in zip(out_size, tile))
    if tiles >= FFT_MIN_TILES or t // 2 < max(8, *(k - 1 for k in kernel)):
      return tile
    t //= 2


def _windows(x: Array, axis: int, n: int, t: int, size: int) -> Array:
  """`n` windows of `size` >= t elements at stride `t` along `axis`.

  `x` must hold `(n + 1) * t` elements on `axis`; returns `x` with that axis
  replaced by `(n, size)`. Built from two reshapes (each window's first t
  elements, and the next window's first size - t) instead of n slices.
  """
  shape = x.shape
  def blocks(start):
    v = lax.slice_in_dim(x, start, start + n * t, axis=axis)
    return v.reshape(*shape[:axis], n, t, *shape[axis + 1:])
  if size == t:
    return blocks(0)
  halo = lax.slice_in_dim(blocks(t), 0, size - t, axis=axis + 1)
  return jnp.concatenate([blocks(0), halo], axis=axis + 1)


def _dft_matrix(n: int, taps: int, half: bool = False) -> np.ndarray:
  """(n or n // 2 + 1, taps) complex DFT rows of a length-n zero-padded
  signal whose first `taps` samples are non-zero."""
  f = np.arange(n // 2 + 1 if half else n)[:, None]
  return np.exp(-2j * np.pi * f * np.arange(taps)[None, :] / n).astype(
      np.complex64)


def _kernel_spectrum(kernel: Array, size: Sequence[int]) -> Array:
  """`rfftn` of the flipped, zero-padded kernel, `(Sd, Sh, Sw//2+1, C, O)`.

  Correlation = convolution with the flipped kernel. Computed as three small
  DFT matmuls over the kD/kH/kW taps instead of FFTs of C*O mostly-zero
  `size` volumes, and already frequency-major (no transpose); its gradient
  is the same matmuls transposed instead of C*O inverse FFTs.
  """
  kd, kh, kw = kernel.shape[:3]
  g = jnp.flip(kernel.astype(jnp.float32), (0, 1, 2)).astype(jnp.complex64)
  ed = _dft_matrix(size[0], kd)
  eh = _dft_matrix(size[1], kh)
  ew = _dft_matrix(size[2], kw, half=True)
  g = jnp.einsum("zyxco,Xx->zyXco", g, ew)
  g = jnp.einsum("zyXco,Yy->zYXco", g, eh)
  return jnp.einsum("zYXco,Zz->ZYXco", g, ed)


def _conv3d_fft(x: Array, kernel: Array, out_size: Sequence[int],
                padding: Sequence[tuple[int, int]]) -> Array:
  """Stride-1, undilated 3D conv by overlap-save FFT over output tiles.

  The output is cut into tiles of up to `FFT_TILE`^3 voxels; each tile's
  input window (tile + kernel - 1 per axis) is FFT'd, multiplied by the
  kernel's spectrum (one complex `(tiles, C) @ (C, O)` matmul per
  frequency) and transformed back, keeping the part the circular
  convolution does not wrap. For a 5^3 kernel that is ~20x fewer FLOPs than
  the direct sum; float32 rounding of the transforms leaves errors ~1e-6 of
  the output's magnitude (tested against `lax.conv_general_dilated`).
  Computed in float32 (FFTs have no bfloat16), returned in `x.dtype`.
  """
  b, d, h, w, c = x.shape
  ks = kernel.shape[:3]
  o = kernel.shape[4]
  tile = _fft_tiles(b, out_size, ks)
  size = [t + k - 1 for t, k in zip(tile, ks)]
  nt = [-(-n // t) for n, t in zip(out_size, tile)]
  # Zeros up to every window plus one tile (what `_windows` reshapes); at
  # least the requested padding, since n * t >= out = s + lo + hi - k + 1.
  xp = jnp.pad(x.astype(jnp.float32),
               ((0, 0), *[(lo, (n + 1) * t - (s + lo)) for (lo, _), n, t, s
                          in zip(padding, nt, tile, (d, h, w))], (0, 0)))
  freq = (size[0], size[1], size[2] // 2 + 1)
  nf = math.prod(freq)
  kf = _kernel_spectrum(kernel, size).reshape(nf, c, o)
  pieces = []
  for lo, hi in _pieces(x, nt[0], 8.0 * b * math.prod(nt) * nf * c * o):
    n0 = hi - lo
    xs = lax.slice_in_dim(xp, lo * tile[0], (hi + 1) * tile[0], axis=1)
    xt = _windows(xs, 1, n0, tile[0], size[0])         # b n0 Sd H W c
    xt = _windows(xt, 3, nt[1], tile[1], size[1])      # b n0 Sd nh Sh W c
    xt = _windows(xt, 5, nt[2], tile[2], size[2])      # b n0 Sd nh Sh nw Sw c
    xt = xt.transpose(0, 1, 3, 5, 7, 2, 4, 6)          # b n0 nh nw c Sd Sh Sw
    xf = jnp.fft.rfftn(xt, axes=(-3, -2, -1))
    # One merge per reshape, the batch axis kept apart (a data-sharded batch
    # cannot merge with the tiles under an Explicit mesh).
    t = n0 * nt[1] * nt[2]
    xf = _reshape_steps(xf, [(b, n0 * nt[1], nt[2], c, *freq),
                             (b, t, c, *freq),
                             (b, t, c, freq[0] * freq[1], freq[2]),
                             (b, t, c, nf)])
    xf = xf.transpose(3, 0, 1, 2)                       # F b t c
    yf = lax.dot_general(xf, kf, (((3,), (1,)), ((0,), (0,))))  # F b t o
    yf = _reshape_steps(yf.transpose(1, 2, 3, 0),      # b t o F
                        [(b, t, o, freq[0] * freq[1], freq[2]),
                         (b, t, o, *freq),
                         (b, n0 * nt[1], nt[2], o, *freq),
                         (b, n0, nt[1], nt[2], o, *freq)])
    yt = jnp.fft.irfftn(yf, s=size, axes=(-3, -2, -1))
    yt = yt[..., ks[0] - 1:, ks[1] - 1:, ks[2] - 1:]   # b n0 nh nw o Td Th Tw
    yt = yt.transpose(0, 1, 5, 2, 6, 3, 7, 4)          # b n0 Td nh Th nw Tw o
    pieces.append(_reshape_steps(yt, [
        (b, n0 * tile[0], nt[1], tile[1], nt[2], tile[2], o),
        (b, n0 * tile[0], nt[1] * tile[1], nt[2], tile[2], o),
        (b, n0 * tile[0], nt[1] * tile[1], nt[2] * tile[2], o)]))
  y = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)
  return y[:, :out_size[0], :out_size[1], :out_size[2]].astype(x.dtype)


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
  planes of at most `IM2COL_MAX_PLANE` voxels (full im2col); big kernels on
  large volumes go through the Fourier domain (`_conv3d_fft`).
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
  name = choose_lowering(x, kernel, strides, padding, dilation, out_size)
  return _LOWERINGS[name](x, kernel, out_size, strides, padding, dilation)


def _conv3d_depth_taps(x: Array, kernel: Array, out_size: Sequence[int],
                       strides: Sequence[int],
                       padding: Sequence[tuple[int, int]],
                       dilation: Sequence[int]) -> Array:
  """The general case of `conv3d_taps`: depth taps stacked on the channels,
  one 2D conv `(B*D', H, W, kD*C) x (kH, kW, kD*C, O)` per depth piece."""
  b, _, h, w, c = x.shape
  kd, kh, kw, _, o = kernel.shape
  od, oh, ow = out_size
  sd, sh, sw = strides
  dd, dh, dw = dilation
  (pd0, pd1), (ph0, ph1), (pw0, pw1) = padding
  if pd0 or pd1:
    x = jnp.pad(x, ((0, 0), (pd0, pd1), (0, 0), (0, 0), (0, 0)))
  k2 = kernel.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kd * c, o).astype(
      x.dtype)
  pieces = []
  for lo, hi in _pieces(x, od, 2.0 * b * od * oh * ow * kd * kh * kw * c * o):
    # Output depths [lo, hi): view t takes input depths t*dd + i*sd.
    m = hi - lo
    views = [lax.slice_in_dim(x, t * dd + lo * sd, t * dd + (hi - 1) * sd + 1,
                              sd, axis=1) for t in range(kd)]
    xs = views[0] if kd == 1 else jnp.concatenate(views, axis=-1)
    xs = xs.reshape(b * m, h, w, kd * c)
    y = lax.conv_general_dilated(
        xs, k2, window_strides=(sh, sw), padding=((ph0, ph1), (pw0, pw1)),
        rhs_dilation=(dh, dw), dimension_numbers=_DN2)
    pieces.append(y.reshape(b, m, *y.shape[1:]))
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)


def _conv3d_fft_lowering(x, kernel, out_size, strides, padding, dilation):
  del strides, dilation  # 1 (checked by the candidates / `_use_fft`)
  return _conv3d_fft(x, kernel, out_size, padding)


# The lowerings of a general (not 1x1x1, not patchify) conv in `conv3d_taps`,
# all `(x, kernel, out_size, strides, padding, dilation) -> y` (looked up by
# module global name at call time).
_LOWERINGS = {
    "depth_taps": lambda *a: _conv3d_depth_taps(*a),
    "out_taps": lambda *a: _conv3d_out_taps(*a),
    "im2col": lambda *a: _conv3d_im2col(*a),
    "fft": lambda *a: _conv3d_fft_lowering(*a),
}


def rule_lowering(x: Array, kernel: Array, strides: Sequence[int],
                  padding: Sequence[tuple[int, int]], dilation: Sequence[int],
                  out_size: Sequence[int]) -> str:
  """The fixed rules (measured on one 2-core AMD EPYC, see the constants).

  What `conv3d_taps` uses when autotuning is off, for convs too small to
  tune, and for batches split over devices.
  """
  c, o = kernel.shape[3:]
  if _use_fft(x, kernel, strides, padding, dilation, out_size):
    return "fft"
  if out_size[1] * out_size[2] <= IM2COL_MAX_PLANE:
    return "im2col"
  if strides[0] == 1 and kernel.shape[0] > 1 and OUT_TAPS_MAX_RATIO * o <= c:
    return "out_taps"
  return "depth_taps"


# ---------------------------------------------------------------------------
# Per-machine autotuning of the lowering (CPU).
#
# The rules above were set from sweeps on one CPU; on another (an AVX-512
# Intel Xeon with a faster oneDNN) the best lowering of the same conv
# differs. With autotuning on, the first trace of each conv shape that is
# big enough (>= AUTOTUNE_MIN_FLOPS forward) times every candidate lowering
# (forward + input and weight gradients, jitted, on random data of the same
# shape and dtype, best of AUTOTUNE_REPEATS) and keeps the fastest; the rule's
# choice is kept unless another is faster by more than AUTOTUNE_MARGIN. The
# choice is static per shape, so a jitted step is traced once as before.
# Choices are cached per machine in a JSON file under
# `$RADNET_CACHE/conv_autotune/` (else `~/.cache/radnet_jax/...`), keyed by
# CPU model and flags, jax / jaxlib version, XLA_FLAGS, usable cores and this
# module's lowering settings; one file per such machine key, entries keyed by
# shape, strides, padding, dilation and dtype; written atomically (temporary
# file + rename). Every candidate is tested equal to
# `lax.conv_general_dilated` (tests/test_conv.py), so the choice changes
# speed, not results (beyond float32 rounding).
#
# Off: `RADNET_CONV_AUTOTUNE=0` (the test suite sets it), or
# `CONV_AUTOTUNE = False`; then, and when the cache directory cannot be
# written, the rules decide (deterministic). Only on the CPU backend, and
# not for a batch split over several devices.
CONV_AUTOTUNE: bool | None = None     # None: $RADNET_CONV_AUTOTUNE, default on
AUTOTUNE_ENV = "RADNET_CONV_AUTOTUNE"
AUTOTUNE_MIN_FLOPS = 2e8
AUTOTUNE_REPEATS = 3
AUTOTUNE_MARGIN = 0.05
# Full im2col is a candidate for output planes up to this many voxels when
# its patch tensor holds at most AUTOTUNE_IM2COL_MAX_ELEMS elements.
AUTOTUNE_IM2COL_MAX_PLANE = 64
AUTOTUNE_IM2COL_MAX_ELEMS = 2 ** 24
_AUTOTUNE_VERSION = 1
_TUNED: dict[str, str] = {}            # this process's choices, by entry key
_TUNE_LOG: dict[str, dict] = {}        # ... with the measured times
_CACHE_STATE: dict[str, Any] = {}      # path, writable


def autotune_enabled() -> bool:
  """CONV_AUTOTUNE if set, else $RADNET_CONV_AUTOTUNE (default on)."""
  if CONV_AUTOTUNE is not None:
    return bool(CONV_AUTOTUNE)
  v = os.environ.get(AUTOTUNE_ENV, "1").strip().lower()
  return v not in ("0", "off", "false", "no", "")


@functools.lru_cache(maxsize=1)
def cpu_id() -> str:
  """CPU model name plus a digest of its feature flags (Linux /proc/cpuinfo)."""
  info = {}
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      for line in f:
        key, _, val = line.partition(":")
        info.setdefault(key.strip(), val.strip())   # the first CPU's values
  except OSError:
    pass
  model = (info.get("model name") or info.get("Processor")
           or platform.processor() or platform.machine() or "unknown")
  flags = " ".join(sorted((info.get("flags") or info.get("Features") or
                           "").split()))
  digest = hashlib.sha1(flags.encode()).hexdigest()[:10] if flags else "noflags"
  return f"{model} [{digest}]"


def _machine_key() -> dict[str, Any]:
  import jaxlib  # pylint: disable=g-import-not-at-top  (light, jax has it)
  settings = (CONV_SPLIT, CONV_SPLIT_MIN_FLOPS, FFT_TILE, FFT_MIN_TILES,
              AUTOTUNE_REPEATS, AUTOTUNE_MARGIN)
  return {"cpu": cpu_id(), "jax": jax.__version__,
          "jaxlib": getattr(jaxlib, "__version__", "?"),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "cores": usable_cores(), "settings": repr(settings),
          "version": _AUTOTUNE_VERSION}


def autotune_cache_path() -> str:
  """The JSON file holding this machine key's choices."""
  root = os.environ.get("RADNET_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "radnet_jax")
  digest = hashlib.sha1(json.dumps(_machine_key(), sort_keys=True).encode()
                        ).hexdigest()[:16]
  return os.path.join(root, "conv_autotune", f"{digest}.json")


def _read_cache(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    if isinstance(data, dict) and isinstance(data.get("entries"), dict):
      return data
  except (OSError, ValueError):
    pass
  return {"machine": _machine_key(), "entries": {}}


def _write_cache(path: str, key: str, entry: dict) -> bool:
  """Merges one entry into the cache file atomically; False if unwritable."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = _read_cache(path)       # other processes may have added entries
    data["entries"][key] = entry
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
    return True
  except OSError as e:
    logging.getLogger(__name__).warning(
        "conv autotune: cannot write the cache %s (%s); using the fixed "
        "rules", path, e)
    return False


def _cache_writable(path: str) -> bool:
  """Whether the cache directory can be written (probed once per path)."""
  if _CACHE_STATE.get("path") != path:
    ok = True
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      fd, tmp = tempfile.mkstemp(prefix=".probe-", dir=os.path.dirname(path))
      os.close(fd)
      os.unlink(tmp)
    except OSError as e:
      ok = False
      logging.getLogger(__name__).warning(
          "conv autotune off: cache directory of %s not writable (%s)", path, e)
    _CACHE_STATE.update(path=path, writable=ok)
  return _CACHE_STATE["writable"]


def candidate_lowerings(x: Array, kernel: Array, strides: Sequence[int],
                        padding: Sequence[tuple[int, int]],
                        dilation: Sequence[int],
                        out_size: Sequence[int]) -> list[str]:
  """Lowerings that apply to this conv and may be the fastest somewhere.

  depth_taps always; out_taps at depth stride 1 with C >= O; full im2col for
  small output planes; the Fourier path for stride-1, undilated convs with
  >= FFT_MIN_TAPS taps (channel and size limits are the tuner's business).
  The rule's choice is always among them.
  """
  b, c = x.shape[0], kernel.shape[3]
  o = kernel.shape[4]
  taps = math.prod(kernel.shape[:3])
  out = ["depth_taps"]
  if strides[0] == 1 and kernel.shape[0] > 1 and o <= c:
    out.append("out_taps")
  if (out_size[1] * out_size[2] <= AUTOTUNE_IM2COL_MAX_PLANE
      and b * math.prod(out_size) * taps * c <= AUTOTUNE_IM2COL_MAX_ELEMS):
    out.append("im2col")
  if (tuple(strides) == (1, 1, 1) and tuple(dilation) == (1, 1, 1)
      and all(p >= 0 for pair in padding for p in pair)
      and taps >= FFT_MIN_TAPS and _batch_devices(x) == 1):
    out.append("fft")
  rule = rule_lowering(x, kernel, strides, padding, dilation, out_size)
  if rule not in out:
    out.append(rule)
  return out


def _entry_key(x, kernel, strides, padding, dilation) -> str:
  return (f"x{'x'.join(map(str, x.shape))}_k{'x'.join(map(str, kernel.shape))}"
          f"_s{'x'.join(map(str, strides))}"
          f"_p{'x'.join(f'{lo}-{hi}' for lo, hi in padding)}"
          f"_d{'x'.join(map(str, dilation))}_{jnp.dtype(x.dtype).name}")


def _time_lowering(name: str, x: Array, kernel: Array,
                   out_size: Sequence[int], strides: Sequence[int],
                   padding: Sequence[tuple[int, int]],
                   dilation: Sequence[int],
                   give_up: float = float("inf")) -> float:
  """Best wall seconds of one jitted forward + input and weight gradients.

  Stops repeating once a run takes more than `give_up` seconds (a candidate
  already 2x slower than the best so far is not timed further).
  """
  fn = _LOWERINGS[name]
  with jax.ensure_compile_time_eval():
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal(x.shape, np.float32), x.dtype)
    ws = jnp.asarray(rng.standard_normal(kernel.shape, np.float32) * 0.05,
                     kernel.dtype)

    @jax.jit
    def step(xs, ws):
      y, vjp = jax.vjp(lambda a, k: fn(a, k, out_size, strides, padding,
                                       dilation), xs, ws)
      return vjp(y)
    jax.block_until_ready(step(xs, ws))          # compile + first run
    best = float("inf")
    for _ in range(AUTOTUNE_REPEATS):
      t = time.perf_counter()
      jax.block_until_ready(step(xs, ws))
      best = min(best, time.perf_counter() - t)
      if best > give_up:
        break
  return best


def choose_lowering(x: Array, kernel: Array, strides: Sequence[int],
                    padding: Sequence[tuple[int, int]],
                    dilation: Sequence[int],
                    out_size: Sequence[int]) -> str:
  """The lowering `conv3d_taps` uses: the rules, or the tuned choice."""
  rule = rule_lowering(x, kernel, strides, padding, dilation, out_size)
  b, c, o = x.shape[0], kernel.shape[3], kernel.shape[4]
  flops = 2.0 * b * math.prod(out_size) * math.prod(kernel.shape[:3]) * c * o
  if (not autotune_enabled() or flops < AUTOTUNE_MIN_FLOPS
      or _batch_devices(x) > 1 or jax.default_backend() != "cpu"):
    return rule
  cands = candidate_lowerings(x, kernel, strides, padding, dilation, out_size)
  if len(cands) == 1:
    return rule
  key = _entry_key(x, kernel, strides, padding, dilation)
  path = autotune_cache_path()
  mem_key = f"{path}|{key}"
  if mem_key in _TUNED:
    return _TUNED[mem_key]
  entry = _read_cache(path)["entries"].get(key)
  if not (isinstance(entry, dict) and entry.get("choice") in cands):
    if not _cache_writable(path):
      return rule
    t0 = time.perf_counter()
    times = {}
    for n in sorted(cands, key=lambda n: n != rule):     # the rule's first
      times[n] = _time_lowering(n, x, kernel, out_size, strides, padding,
                                dilation, 2.0 * min(times.values(),
                                                    default=float("inf")))
    best = min(times, key=times.get)
    if times[best] > (1.0 - AUTOTUNE_MARGIN) * times[rule]:
      best = rule
    entry = {"choice": best, "rule": rule,
             "ms": {n: round(1e3 * t, 3) for n, t in times.items()},
             "tune_s": round(time.perf_counter() - t0, 2)}
    logging.getLogger(__name__).info("conv autotune %s: %s (rule %s) %s",
                                     key, best, rule, entry["ms"])
    if not _write_cache(path, key, entry):
      _CACHE_STATE.update(path=path, writable=False)
      return rule
  _TUNED[mem_key] = entry["choice"]
  _TUNE_LOG[key] = entry
  return entry["choice"]


def autotune_log() -> dict[str, dict]:
  """This process's tuned convs: entry key -> choice, rule, times (ms)."""
  return dict(_TUNE_LOG)


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
