"""Per-layer CPU timing of the VNet's 3D convolutions (the CPU "taps" path).

    python bench/conv_layers.py                         # as the models run
    python bench/conv_layers.py --out-taps-ratio 1      # output-side taps for C >= O
    python bench/conv_layers.py --split 1               # no depth pieces
    python bench/conv_layers.py --no-fft                # direct convs only
    RADNET_KEEP_XLA_FLAGS=1 python bench/conv_layers.py # YNNPACK convs (flag off)
    python bench/conv_layers.py --torch                 # + PyTorch peer columns

Each row: one `layers.conv3d` of MONAI's VNet 16..256 at a 64^3 input,
batch 1, float32, jitted; forward alone and forward + input and weight
gradients; best of --repeats; GFLOP/s counts 1x (forward) or 3x (with
gradients) the forward FLOPs. The knobs set the module constants of
`radnet_jax.models.conv_lowering` for this process only. With --torch, the
same conv in PyTorch (`torch.nn.functional.conv3d`, NCDHW, what MONAI's VNet
runs) is timed in the same process, and a last column gives project/torch for
forward + gradients.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import radnet_jax  # noqa: E402,F401  (sets the CPU XLA flag before jax runs)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from radnet_jax.models import conv_lowering, layers  # noqa: E402
from radnet_jax.cli import flags

# name, input side, C, O, kernel, stride (MONAI VNet at a 64^3 input)
LAYERS = [
    ("in 1->16 5^3 @64", 64, 1, 16, 5, 1),
    ("down 16->32 2^3/2 @64", 64, 16, 32, 2, 2),
    ("32 5^3 @32", 32, 32, 32, 5, 1),
    ("64 5^3 @16", 16, 64, 64, 5, 1),
    ("128 5^3 @8", 8, 128, 128, 5, 1),
    ("256 5^3 @8 (up)", 8, 256, 256, 5, 1),
    ("128 5^3 @16 (up)", 16, 128, 128, 5, 1),
    ("64 5^3 @32 (up)", 32, 64, 64, 5, 1),
    ("32 5^3 @64 (up)", 64, 32, 32, 5, 1),
    ("head 32->2 5^3 @64", 64, 32, 2, 5, 1),
]


def best_time(fn, *args, repeats: int) -> tuple[float, float]:
  jax.block_until_ready(fn(*args))
  runs = []
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    runs.append((time.perf_counter() - t, time.process_time() - c))
  return min(runs)


def main(argv=None) -> None:
  p = flags.Parser(description=__doc__.split("\n")[0])
  p.add_argument("--out-taps-ratio", type=float, default=None,
                 help="conv_lowering.OUT_TAPS_MAX_RATIO (default: the "
                      "module's)")
  p.add_argument("--split", type=int, default=None,
                 help="conv_lowering.CONV_SPLIT (default: one piece per core)")
  p.add_argument("--no-fft", action="store_true",
                 help="conv_lowering.CONV_FFT = False (no Fourier-domain "
                      "convs)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--torch", action="store_true",
                 help="also time PyTorch's conv3d (bench/requirements.txt)")
  a = p.parse_args(argv)
  if a.out_taps_ratio is not None:
    conv_lowering.OUT_TAPS_MAX_RATIO = a.out_taps_ratio
  if a.split is not None:
    conv_lowering.CONV_SPLIT = a.split
  if a.no_fft:
    conv_lowering.CONV_FFT = False
  print(f"# {jax.default_backend()} x{layers.usable_cores()} cores, jax "
        f"{jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"OUT_TAPS_MAX_RATIO={conv_lowering.OUT_TAPS_MAX_RATIO}, "
        f"CONV_SPLIT={conv_lowering.CONV_SPLIT}, "
        f"CONV_FFT={conv_lowering.CONV_FFT}")
  print(f"{'layer':<24} {'GFLOP':>6} {'fwd ms':>8} {'GFLOP/s':>8} "
        f"{'fwd+grad ms':>12} {'GFLOP/s':>8} {'CPU ms':>8}"
        + (f" {'torch fwd':>10} {'torch f+g':>10} {'ratio':>6}" if a.torch
           else ""))
  total = total_t = 0.0
  for name, n, c, o, k, s in LAYERS:
    x = jax.random.normal(jax.random.key(0), (1, n, n, n, c))
    w = jax.random.normal(jax.random.key(1), (k, k, k, c, o)) * 0.05
    pad = 0 if s == k else None

    def conv(x, w, s=s, pad=pad):
      return layers.conv3d(x, w, s, pad, impl="taps")
    fwd = jax.jit(conv)
    grad = jax.jit(jax.grad(lambda x, w: (conv(x, w) ** 2).sum(), argnums=(0, 1)))
    gflop = 2 * (n // s) ** 3 * k ** 3 * c * o / 1e9
    tf, _ = best_time(fwd, x, w, repeats=a.repeats)
    tg, cg = best_time(grad, x, w, repeats=a.repeats)
    total += tg
    row = (f"{name:<24} {gflop:>6.2f} {1e3 * tf:>8.1f} {gflop / tf:>8.1f} "
           f"{1e3 * tg:>12.1f} {3 * gflop / tg:>8.1f} {1e3 * cg:>8.0f}")
    if a.torch:
      pf, pg = torch_times(n, c, o, k, s, 0 if s == k else (k - 1) // 2,
                           a.repeats)
      total_t += pg
      row += f" {1e3 * pf:>10.1f} {1e3 * pg:>10.1f} {tg / pg:>6.2f}"
    print(row)
  print(f"# sum of fwd+grad over the rows (each conv once): {total:.2f} s"
        + (f", torch {total_t:.2f} s, ratio {total / total_t:.2f}"
           if a.torch else ""))


def torch_times(n: int, c: int, o: int, k: int, s: int, pad: int,
                repeats: int) -> tuple[float, float]:
  """Best forward and forward + both gradients of torch's conv3d, seconds."""
  import torch  # bench-only dependency
  torch.set_num_threads(layers.usable_cores())
  x = torch.randn(1, c, n, n, n, requires_grad=True)
  w = (torch.randn(o, c, k, k, k) * 0.05).requires_grad_(True)

  def fwd():
    with torch.no_grad():
      torch.nn.functional.conv3d(x, w, stride=s, padding=pad)

  def grad():
    y = torch.nn.functional.conv3d(x, w, stride=s, padding=pad)
    gx, gw = torch.autograd.grad((y ** 2).sum(), (x, w))
    return gx, gw

  out = []
  for fn in (fwd, grad):
    fn()
    runs = []
    for _ in range(repeats):
      t = time.perf_counter()
      fn()
      runs.append(time.perf_counter() - t)
    out.append(min(runs))
  return out[0], out[1]


if __name__ == "__main__":
  main()
