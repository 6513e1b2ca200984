r"""Sliding-window inference time per volume: radnet_jax vs MONAI, same VNet and ROI.

  python bench/sliding_window.py [--volume 64,128,128] [--roi 32,64,64] \
      [--overlap 0.25] [--sw-batch 2] [--repeats 3] [--filters 16,32,64,128,256]

Both sides run Milletari's VNet with the same channel widths (ours:
radnet_jax.models.vnet.VNet; theirs: monai.networks.nets.VNet), random
weights, Gaussian blending, the same ROI / overlap / window batch, on the same
volume, in this process. Times are wall-clock seconds per volume after one
warm-up call (which includes JAX compilation, reported separately). torch and
monai are bench-only dependencies. Prints a markdown table.
"""
from __future__ import annotations

import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from radnet_jax.models import layers  # noqa: E402
from radnet_jax.cli import flags


def _ints(s):
  return tuple(int(v) for v in s.split(","))


def main():
  p = flags.Parser()
  p.add_argument("--volume", type=_ints, default=(64, 128, 128))
  p.add_argument("--roi", type=_ints, default=(32, 64, 64))
  p.add_argument("--overlap", type=float, default=0.25)
  p.add_argument("--sw-batch", type=int, default=2)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--filters", type=_ints, default=(16, 32, 64, 128, 256))
  p.add_argument("--skip-monai", action="store_true")
  a = p.parse_args()

  from radnet_jax.inference import sliding_window as inference
  from radnet_jax.models import vnet

  rng = np.random.default_rng(0)
  vol = rng.normal(size=a.volume).astype(np.float32)
  n_win = len(inference.window_starts(a.volume, a.roi, a.overlap))
  rows = []

  # ---- ours
  model = vnet.VNet(out_channels=2, filters=a.filters, dropout_down=None,
                    dropout_up=(None, None))
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((1,) + a.roi + (1,)), train=False))(
      jax.random.PRNGKey(0))
  predict = inference.make_predict_fn(model.apply, variables)
  t0 = time.perf_counter()
  out = inference.sliding_window_inference(vol, a.roi, predict, overlap=a.overlap,
                                           sw_batch_size=a.sw_batch)
  jax.block_until_ready(out)
  first = time.perf_counter() - t0
  times, cpu = [], []
  for _ in range(a.repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(inference.sliding_window_inference(
        vol, a.roi, predict, overlap=a.overlap, sw_batch_size=a.sw_batch))
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  dev = jax.devices()[0]
  rows.append(("radnet_jax (JAX " + jax.__version__ + ")", f"{dev.platform}:{dev.device_kind}",
               first, float(np.median(times)), float(np.median(cpu))))

  # ---- MONAI
  if not a.skip_monai:
    import torch
    import monai
    # As many threads as cores this process may use (fair under `taskset`).
    torch.set_num_threads(layers.usable_cores())
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import VNet as MonaiVNet
    # MONAI's VNet has fixed widths 16..256 (scaled by in_channels=1).
    if tuple(a.filters) != (16, 32, 64, 128, 256):
      raise SystemExit("MONAI's VNet is fixed at 16..256 channels; use the default --filters")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = MonaiVNet(spatial_dims=3, in_channels=1, out_channels=2, dropout_prob_down=0.0,
                    dropout_prob_up=(0.0, 0.0)).to(device).eval()
    x = torch.from_numpy(vol)[None, None].to(device)

    def run():
      with torch.inference_mode():
        y = sliding_window_inference(x, a.roi, a.sw_batch,
                                     lambda w: torch.softmax(net(w), 1),
                                     overlap=a.overlap, mode="gaussian")
      if device == "cuda":
        torch.cuda.synchronize()
      return y
    t0 = time.perf_counter()
    run()
    first_m = time.perf_counter() - t0
    tm, cm = [], []
    for _ in range(a.repeats):
      t0, c0 = time.perf_counter(), time.process_time()
      run()
      tm.append(time.perf_counter() - t0)
      cm.append(time.process_time() - c0)
    rows.append((f"MONAI {monai.__version__} (torch {torch.__version__}, "
                 f"{torch.get_num_threads()} threads)", device, first_m, float(np.median(tm)),
                 float(np.median(cm))))

  print(f"\nSliding-window inference, VNet filters {a.filters}, volume {a.volume}, "
        f"ROI {a.roi}, overlap {a.overlap}, sw_batch {a.sw_batch}, {n_win} windows, "
        f"Gaussian blending; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
  print("| implementation | device | first call (s) | per volume, median of "
        f"{a.repeats} (s) | CPU s per volume |")
  print("|---|---|---|---|---|")
  for name, d, f, m, c in rows:
    print(f"| {name} | {d} | {f:.2f} | {m:.2f} | {c:.2f} |")
  if len(rows) == 2:
    print(f"\nratio radnet_jax/monai per volume: {rows[0][3] / rows[1][3]:.2f} "
          f"(CPU time: {rows[0][4] / rows[1][4]:.2f})")


if __name__ == "__main__":
  main()
