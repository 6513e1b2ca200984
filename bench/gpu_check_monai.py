"""MONAI peer of bench/gpu_check.py: the same networks' train steps in PyTorch.

    python bench/gpu_check_monai.py --json /tmp/monai.json     # on a GPU
    python bench/gpu_check_monai.py --smoke                    # CPU, tiny

`bash bench/gpu_check.sh` runs this first, in its own process (JAX
preallocates most of the GPU's memory afterwards), and prints its rows next
to the project's. Rows, the shapes and batches of gpu_check.py:
  resnet50  `monai.networks.nets.resnet50(spatial_dims=3, ...)` with the
            paper stem (3x7x7 conv, stride 1x2x2, then the 3^3/2 max-pool;
            shortcut B without bias, like `radnet_jax.models.resnet3d`), one
            linear head with the 5 tasks' outputs side by side; loss: cross
            entropy of the 3 class tasks, BCE of the 9 coverage bands, Huber
            on log spacing (the project's multi-task loss, all labels known).
  vnet      `monai.networks.nets.VNet(spatial_dims=3, in_channels=1,
            out_channels=2)` (16..256, ELU, dropout as MONAI sets it); loss:
            `monai.losses.DiceCELoss` (softmax, cross entropy + soft Dice).
How a fair user runs it: AdamW (lr 1e-4, weight decay 5e-5; fused on CUDA),
bfloat16 autocast with float32 parameters (--amp auto: on CUDA),
`torch.backends.cudnn.benchmark`,
`torch.compile` of the network (--compile auto = on CUDA), and the memory
format (`torch.channels_last_3d` or the default NCDHW) that is faster for
this network: --layout auto times 3 eager steps in each and keeps the faster
(on CUDA; NCDHW elsewhere). Reported per row: setup + compile seconds (the
first step), median of --steps timed steps after --warmup, the chosen
layout, losses; finite losses are the correctness check.

--smoke: ResNet-10 at 8x32x32 batch 2, VNet at 16^3 batch 2 (MONAI's VNet has
fixed widths; batch 2 for BatchNorm at its 1^3 level), 2 steps, on CPU in
float32 on one thread without compile: a logic check, timings meaningless.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

# The project's flag parser only (argparse and sys; no jax): this peer runs
# in a PyTorch environment.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from radnet_jax.cli import flags  # noqa: E402  pylint: disable=wrong-import-position

# Task output sizes of the paper taxonomy (radnet_jax.labels.taxonomy
# "paper"; tests/test_gpu_check.py keeps them equal).
HEADS = {"sequence": 5, "plane": 3, "contrast": 2, "coverage": 9, "spacing": 1}
RES_SHAPE, VNET_SHAPE = (48, 192, 192), (128, 128, 128)
SMOKE_RES_SHAPE, SMOKE_VNET_SHAPE = (8, 32, 32), (16, 16, 16)


def _sync(dev):
  import torch  # pylint: disable=g-import-not-at-top  (heavy optional dep)
  if dev.type == "cuda":
    torch.cuda.synchronize(dev)


def build(model: str, batch: int, shape, smoke: bool, dev):
  """(network, input, target, loss_fn) of one row, on `dev`."""
  # pylint: disable=g-import-not-at-top  (heavy optional deps)
  import torch
  import torch.nn.functional as F
  from monai.losses import DiceCELoss
  from monai.networks import nets
  g = torch.Generator().manual_seed(0)
  x = torch.randn(batch, 1, *shape, generator=g)
  if model == "resnet50":
    net = getattr(nets, "resnet10" if smoke else "resnet50")(
        spatial_dims=3, n_input_channels=1, conv1_t_size=(3, 7, 7),
        conv1_t_stride=(1, 2, 2), bias_downsample=False,
        num_classes=sum(HEADS.values()))
    y = {"sequence": torch.randint(0, HEADS["sequence"], (batch,), generator=g),
         "plane": torch.randint(0, HEADS["plane"], (batch,), generator=g),
         "contrast": torch.randint(0, HEADS["contrast"], (batch,), generator=g),
         "coverage": (torch.rand(batch, HEADS["coverage"], generator=g)
                      < 0.3).float(),
         "spacing": torch.rand(batch, generator=g) * 4.5 + 0.5}
    y = {k: v.to(dev) for k, v in y.items()}
    cuts = torch.tensor(list(HEADS.values())).cumsum(0).tolist()

    def loss_fn(out, y):
      out = out.float()
      parts = dict(zip(HEADS, torch.tensor_split(out, cuts[:-1], dim=1)))
      loss = sum(F.cross_entropy(parts[t], y[t])
                 for t in ("sequence", "plane", "contrast"))
      loss = loss + F.binary_cross_entropy_with_logits(parts["coverage"],
                                                       y["coverage"])
      return loss + F.huber_loss(parts["spacing"][:, 0],
                                 torch.log(y["spacing"]), delta=0.1)
  elif model == "vnet":
    net = nets.VNet(spatial_dims=3, in_channels=1, out_channels=2)
    y = (torch.rand(batch, 1, *shape, generator=g) < 0.2).long().to(dev)
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

    def loss_fn(out, y):
      return dice_ce(out.float(), y)
  else:
    raise SystemExit(f"unknown model {model!r} (resnet50, vnet)")
  return net.to(dev), x.to(dev), y, loss_fn


def _steps(net, x, y, loss_fn, dev, n: int, amp: bool):
  """n train steps; returns (per-step seconds, losses)."""
  import torch  # pylint: disable=g-import-not-at-top  (heavy optional dep)
  opt = net._radnet_opt  # pylint: disable=protected-access
  times, losses = [], []
  for _ in range(n):
    _sync(dev)
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
      loss = loss_fn(net(x), y)
    loss.backward()
    opt.step()
    _sync(dev)
    times.append(time.perf_counter() - t)
    losses.append(float(loss.detach()))
  return times, losses


def run_row(model: str, batch: int, shape, smoke: bool, steps: int,
            warmup: int, layout: str, compile_mode: str, amp: bool) -> dict:
  import torch  # pylint: disable=g-import-not-at-top  (heavy optional dep)
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  cuda = dev.type == "cuda"
  torch.manual_seed(0)
  t0 = time.perf_counter()
  net, x, y, loss_fn = build(model, batch, shape, smoke, dev)
  net.train()
  net._radnet_opt = torch.optim.AdamW(  # pylint: disable=protected-access
      net.parameters(), lr=1e-4, weight_decay=5e-5, **({"fused": True}
                                                        if cuda else {}))
  probe = {}
  if layout == "auto":
    if cuda:
      for fmt in ("ncdhw", "ndhwc"):
        mf = (torch.channels_last_3d if fmt == "ndhwc"
              else torch.contiguous_format)
        net = net.to(memory_format=mf)
        times, _ = _steps(net, x.contiguous(memory_format=mf), y, loss_fn,
                          dev, 4, amp)
        probe[fmt] = statistics.median(times[1:])
      layout = min(probe, key=probe.get)
    else:
      layout = "ncdhw"
  mf = torch.channels_last_3d if layout == "ndhwc" else torch.contiguous_format
  net = net.to(memory_format=mf)
  x = x.contiguous(memory_format=mf)
  compiled = compile_mode == "on" or (compile_mode == "auto" and cuda)
  step_net = torch.compile(net) if compiled else net
  step_net._radnet_opt = net._radnet_opt  # pylint: disable=protected-access
  first, _ = _steps(step_net, x, y, loss_fn, dev, 1, amp)  # compiles
  setup_s = time.perf_counter() - t0
  times, losses = _steps(step_net, x, y, loss_fn, dev, warmup - 1 + steps,
                         amp)
  times, losses = times[warmup - 1:], losses[warmup - 1:]
  ok = all(map(lambda v: v == v and abs(v) != float("inf"), losses))
  return {"model": model, "input": "x".join(map(str, shape)), "batch": batch,
          "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
          "torch": torch.__version__, "layout": layout,
          "layout_probe_s": probe, "compiled": compiled, "bf16_autocast": amp,
          "setup_s": setup_s, "first_step_s": first[0],
          "step_s": statistics.median(times), "step_s_min": min(times),
          "loss_first": losses[0], "loss_last": losses[-1], "ok": ok}


def main(argv=None) -> int:
  p = flags.Parser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="resnet50,vnet")
  p.add_argument("--batch", type=int, default=8, help="ResNet-50 batch")
  p.add_argument("--vnet-batch", type=int, default=1)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--layout", default="auto", choices=("auto", "ncdhw", "ndhwc"))
  p.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
  p.add_argument("--amp", default="auto", choices=("auto", "on", "off"),
                 help="bfloat16 autocast (auto: on CUDA; CPU smoke runs "
                      "float32, PyTorch's CPU bf16 3D convs are very slow)")
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--json", default=None)
  a = p.parse_args(argv)
  if a.steps < 1 or a.warmup < 1:
    p.error("--steps and --warmup must be >= 1")
  try:
    import monai  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f"# MONAI peer skipped: {e} (pip install -r "
          f"bench/requirements-gpu.txt)", flush=True)
    return 3
  if not torch.cuda.is_available():
    # The CPU smoke check: one thread (the test machine's cores are shared).
    torch.set_num_threads(1)
  torch.backends.cudnn.benchmark = True
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  res_shape, vnet_shape = RES_SHAPE, VNET_SHAPE
  batch, vbatch, steps, warmup = a.batch, a.vnet_batch, a.steps, a.warmup
  if a.smoke:
    res_shape, vnet_shape = SMOKE_RES_SHAPE, SMOKE_VNET_SHAPE
    batch, vbatch, steps, warmup = min(batch, 2), 2, min(steps, 2), 1
  print(f"# MONAI {monai.__version__}, torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}"
        f"{', SMOKE' if a.smoke else ''}", flush=True)
  rows = []
  for model in (m.strip() for m in a.models.split(",")):
    shape, b = (res_shape, batch) if model == "resnet50" else (vnet_shape,
                                                               vbatch)
    print(f"# monai {model}: building, layout, compile ...", flush=True)
    r = run_row(model, b, shape, a.smoke, steps, warmup, a.layout, a.compile,
                a.amp == "on" or (a.amp == "auto" and torch.cuda.is_available()))
    rows.append(r)
    print(f"#   monai {model} {r['input']} b{r['batch']}: {1e3 * r['step_s']:.1f}"
          f" ms/step, layout {r['layout']} {r['layout_probe_s'] or ''}, "
          f"compiled {r['compiled']}, setup {r['setup_s']:.1f} s, loss "
          f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}"
          f"{'' if r['ok'] else ' NON-FINITE'}", flush=True)
  if a.json:
    with open(a.json, "w") as f:
      json.dump({"rows": rows}, f, indent=1)
  return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
