"""Train-step speed: the project's jitted Flax step vs MONAI on PyTorch.

    python bench/train_step.py --model resnet18 --shape 64,64,64 --batch 4
    python bench/train_step.py --model vnet --shape 64,64,64 --batch 1
    python bench/train_step.py --model resnet18 --conv-impl xla   # XLA's 3D conv

Both frameworks run the same architecture (ResNet with MONAI's 7^3 stride-2
stem and stage strides 1, 2, 2, 2; VNet with MONAI's layout), Adam, float32,
cross-entropy loss, on the same shapes in the same process. Warm-up steps are
excluded; the table reports the median of --steps timed steps, volumes/s,
GFLOP per step (XLA's cost analysis of the same step with XLA's native
convolutions, before compilation: the model's FLOPs whatever the CPU lowering
computes, e.g. far fewer in Fourier-domain convs; used for both rows),
achieved GFLOP/s and % of this CPU's float32 peak (measured with a large
matmul unless --peak-gflops is given). The last line is the ratio of
median step times project/monai. torch and monai: bench/requirements.txt.

The CPU lowering of each conv is autotuned per machine at first use
(`radnet_jax.models.autotune`, cached under $RADNET_CACHE/conv_autotune);
`--autotune off` uses the fixed rules instead. The header names the CPU and
its measured peak; after the project row the tuned convs are listed (choice,
the rule's choice, ms per candidate for forward + gradients), and the
compile time includes any tuning done in this run.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from radnet_jax.models import autotune, resnet3d, vnet  # noqa: E402
from radnet_jax.models.layers import usable_cores as _usable_cores  # noqa: E402
from radnet_jax.cli import flags

RESNETS = ("resnet10", "resnet18", "resnet34", "resnet50")
N_CLASSES = 5
N_SEG = 2


def measure_peak_gflops(n: int = 2048, reps: int = 5) -> float:
  """float32 matmul GFLOP/s (best of reps), a proxy for the FMA peak."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best / 1e9


def build_project(name: str, conv_impl: str, stem: str):
  if name in RESNETS:
    kw = {}
    if stem == "monai":
      kw = dict(stem_kernel=(7, 7, 7), stem_strides=(2, 2, 2))
    return resnet3d.get_model(name, heads={"sequence": N_CLASSES},
                              conv_impl=conv_impl, **kw), "cls"
  if name == "vnet":
    return vnet.VNet(out_channels=N_SEG, conv_impl=conv_impl), "seg"
  if name == "resnet_vnet":
    return vnet.ResNetVNet("resnet18", out_channels=N_SEG,
                           conv_impl=conv_impl), "seg"
  raise SystemExit(f"unknown --model {name}")


def make_step(name, conv_impl, stem, x, y, abstract=False):
  """(initial state, train step) of the project model `name`.

  abstract: the state as shapes only (for lowering without running).
  """
  model, kind = build_project(name, conv_impl, stem)
  def run(f, *args):
    return jax.eval_shape(f, *args) if abstract else jax.jit(f)(*args)
  variables = run(lambda r: model.init(r, x, False),
                  jax.random.key(0, impl="unsafe_rbg"))
  tx = optax.adam(1e-4)
  state = (variables["params"], variables["batch_stats"],
           run(tx.init, variables["params"]))

  def loss_fn(params, stats):
    # A fixed dropout key: the timing does not depend on the mask (VNet
    # uses dropout in training mode, as MONAI's does).
    out, new = model.apply({"params": params, "batch_stats": stats}, x, True,
                           mutable=["batch_stats"],
                           rngs={"dropout": jax.random.key(1)})
    logits = out[0]["sequence"] if kind == "cls" else out
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new["batch_stats"]

  def step(state):
    params, stats, opt = state
    (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
    upd, opt = tx.update(g, opt, params)
    return (optax.apply_updates(params, upd), stats, opt), loss
  return state, step


def time_project(name, shape, batch, steps, warmup, conv_impl, stem):
  """Returns (median wall s, median CPU s per step, GFLOP per step)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, *shape, 1)), jnp.float32)
  if name in RESNETS:    # classification (build_project's "cls")
    y = jnp.asarray(rng.integers(0, N_CLASSES, batch))
  else:
    y = jnp.asarray(rng.integers(0, N_SEG, (batch, *shape)))
  # The model's FLOPs: the same step with native convs, lowered only.
  ref_state, ref_step = make_step(name, "xla", stem, x, y, abstract=True)
  ca = jax.jit(ref_step).lower(ref_state).cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  gflop = float(ca.get("flops", float("nan"))) / 1e9
  state, step = make_step(name, conv_impl, stem, x, y)
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state).compile()
  print(f"# project compile {time.perf_counter() - t0:.1f} s (incl. any conv "
        f"autotuning)", flush=True)
  times, cpu = [], []
  for i in range(warmup + steps):
    t, c = time.perf_counter(), time.process_time()
    state, loss = compiled(state)
    loss.block_until_ready()
    if i >= warmup:
      times.append(time.perf_counter() - t)
      cpu.append(time.process_time() - c)
  if not np.isfinite(float(loss)):
    raise SystemExit(f"project {name}: non-finite loss")
  return statistics.median(times), statistics.median(cpu), gflop


def time_monai(name, shape, batch, steps, warmup):
  """MONAI equivalent; returns (median wall s, median CPU s) or None."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from monai.networks import nets  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("torch/monai not installed (pip install -r bench/requirements.txt)")
    return None
  # The cores this process may use (`taskset -c 0 python ...` pins the whole
  # comparison to one core; os.cpu_count() ignores the affinity mask).
  torch.set_num_threads(_usable_cores())
  torch.manual_seed(0)
  if name in RESNETS:
    net = getattr(nets, name)(spatial_dims=3, n_input_channels=1,
                              num_classes=N_CLASSES, conv1_t_size=7,
                              conv1_t_stride=2, bias_downsample=False)
    y = torch.randint(0, N_CLASSES, (batch,))
  elif name == "vnet":
    net = nets.VNet(spatial_dims=3, in_channels=1, out_channels=N_SEG)
    y = torch.randint(0, N_SEG, (batch, *shape))
  else:
    return None
  x = torch.randn(batch, 1, *shape)
  opt = torch.optim.Adam(net.parameters(), lr=1e-4)
  loss_fn = torch.nn.CrossEntropyLoss()
  net.train()
  times, cpu = [], []
  for i in range(warmup + steps):
    t, c = time.perf_counter(), time.process_time()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(net(x), y)
    loss.backward()
    opt.step()
    if i >= warmup:
      times.append(time.perf_counter() - t)
      cpu.append(time.process_time() - c)
  return statistics.median(times), statistics.median(cpu)


def main(argv=None) -> None:
  p = flags.Parser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="resnet18",
                 choices=RESNETS + ("vnet", "resnet_vnet"))
  p.add_argument("--shape", default="64,64,64", help="D,H,W voxels")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--conv-impl", default="auto", choices=("auto", "xla", "taps"))
  p.add_argument("--stem", default="monai", choices=("monai", "radnet"),
                 help="ResNet stem: MONAI's 7^3/2 (same net as the peer) or "
                      "the paper's 3x7x7/1x2x2")
  p.add_argument("--autotune", default="auto", choices=("auto", "on", "off"),
                 help="per-machine autotuning of the CPU conv lowerings "
                      "(auto: $RADNET_CONV_AUTOTUNE, default on)")
  p.add_argument("--peak-gflops", type=float, default=None)
  p.add_argument("--no-monai", action="store_true")
  a = p.parse_args(argv)
  shape = tuple(int(s) for s in a.shape.split(","))
  if a.autotune != "auto":
    autotune.CONV_AUTOTUNE = a.autotune == "on"
  peak = a.peak_gflops or measure_peak_gflops()
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  tune = (f"on, cache {autotune.autotune_cache_path()}"
          if autotune.autotune_enabled() else "off (fixed rules)")
  print(f"# {jax.default_backend()} x{_usable_cores()} cores, CPU "
        f"{autotune.cpu_id()}, fp32 peak {peak:.0f} GFLOP/s, load avg "
        f"{load:.1f}, jax {jax.__version__}, conv_impl={a.conv_impl}, "
        f"autotune {tune}")

  med, cpu, gflop = time_project(a.model, shape, a.batch, a.steps, a.warmup,
                                 a.conv_impl, a.stem)
  rows = [("jax/flax", med, cpu)]
  for key, e in sorted(autotune.autotune_log().items()):
    ms = " ".join(f"{n}={t:.0f}" for n, t in sorted(e["ms"].items()))
    print(f"# tuned {key}: {e['choice']} (rule {e['rule']}; ms {ms})")
  if not a.no_monai:
    r = time_monai(a.model, shape, a.batch, a.steps, a.warmup)
    if r is not None:
      rows.append(("monai/torch", *r))
  shape_s = "x".join(map(str, shape))
  print(f"{'framework':<12} {'model':<12} {'shape':<12} {'batch':>5} "
        f"{'step s':>8} {'cpu s':>7} {'vol/s':>7} {'GFLOP':>8} {'GFLOP/s':>8} "
        f"{'%peak':>6}")
  for fw, t, c in rows:
    print(f"{fw:<12} {a.model:<12} {shape_s:<12} {a.batch:>5} {t:>8.3f} "
          f"{c:>7.3f} {a.batch / t:>7.2f} {gflop:>8.1f} {gflop / t:>8.1f} "
          f"{100 * gflop / t / peak:>5.1f}%")
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"# load avg at the end {load:.1f}; cpu s = process CPU time per step "
        f"(all threads), the fairer figure when other jobs share the cores")
  if len(rows) == 2:
    print(f"ratio project/monai (cpu s): {rows[0][2] / rows[1][2]:.2f}")
    print(f"ratio project/monai: {rows[0][1] / rows[1][1]:.2f}")
  else:
    print("ratio project/monai: n/a (no MONAI equivalent for this model)")


if __name__ == "__main__":
  main()
