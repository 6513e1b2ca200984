"""CPU lowerings of a 3D convolution as 2D convolutions and matmuls.

Why: XLA's CPU backend runs native 3D convolutions slowly (a ResNet-18-3D train
step was ~6x slower than PyTorch/oneDNN on the same 2 cores; the input gradient
of a stride-2 3x3x3 conv ran at ~2 GFLOP/s). Its 2D convolutions and matmuls
are much better tuned, so on CPU a 3D conv is written as 2D convolutions over
the depth taps, and big-kernel convolutions on large volumes (VNet's 5^3) in
the Fourier domain.

What lives here: the general-case lowerings of `layers.conv3d_taps`, all
`(x, kernel, out_size, strides, padding, dilation) -> y` in `_LOWERINGS`
("depth_taps", "out_taps", "im2col", "fft"), their tunables (IM2COL_*,
OUT_TAPS_*, CONV_SPLIT*, CONV_FFT / FFT_*), the depth-piece split over cores
(`usable_cores`, `_pieces`), the fixed rules that pick one (`rule_lowering`),
and `_reshape_steps`. The per-machine timing of the candidates is
`radnet_jax.models.autotune`; the public layer API is
`radnet_jax.models.layers`.

Layouts are channel-last: activations `(B, D, H, W, C)`, kernels
`(kD, kH, kW, C_in, C_out)`.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
_DN2 = ("NHWC", "HWIO", "NHWC")


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


# The lowerings of a general (not 1x1x1, not patchify) conv in
# `layers.conv3d_taps`,
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
