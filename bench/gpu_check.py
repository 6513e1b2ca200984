"""Accelerator check: paper-scale train steps, step time and model FLOP utilisation.

    bash bench/gpu_check.sh                    # on a lent GPU (H100 / H200)
    bash bench/gpu_check.sh --batch 16         # ResNet batch (default 8)
    python bench/gpu_check.py --smoke          # tiny shapes, any backend

Two rows, each the project's own jitted train step (`trainer.make_train_step`,
donated state, AdamW, bfloat16 compute with float32 parameters, `conv_impl`
"auto" = XLA's native convolutions off CPU):
  resnet50  experiments/pretrain.py:paper (3x7x7 stem stride 1x2x2), the
            5-task masked loss, input 48x192x192, batch --batch (default 8).
  vnet      MONAI-layout VNet 16..256, cross-entropy + soft Dice, input
            128^3, batch --vnet-batch (default 1).
For each: compile time, median step time of --steps timed steps after
--warmup, FLOP per step, achieved TFLOP/s and model FLOP utilisation against
the card's dense bfloat16 peak (H100 / H200 SXM: 989 TFLOP/s; --peak-tflops
overrides). The FLOP count used is the sum over the step's jaxpr of every
convolution and matmul (2 x multiply-adds; input-dilated convs counted on
their non-zero taps). XLA's own counts are printed beside it:
`jit(step).lower(...).compile().cost_analysis()` (on GPU it does not see
inside cuDNN/cuBLAS calls, so it undercounts) and the pre-optimisation
`lower(...).cost_analysis()` (nan where the backend does not provide it); on
CPU XLA's counts are 0-20% higher than the jaxpr count (they add elementwise
and normalisation FLOPs and padded im2col taps). Correctness: the loss of every
timed step must be finite, and the bfloat16 forward must agree with a
float32 forward (highest precision) of the same parameters on the same batch
(relative L2 error of the logits and their cosine similarity).

MONAI peer (issue 18): before JAX touches the GPU, the same networks' train
steps run in PyTorch in a separate process (`bench/gpu_check_monai.py`:
MONAI's resnet50 with the paper stem and VNet, same shapes, batch and bf16
autocast, torch.compile, cudnn.benchmark, the faster of NCDHW and
channels_last_3d); the final table puts its step time next to the
project's, with project/MONAI and both MFUs from the same (project's jaxpr)
FLOP count. --no-monai skips it; a MONAI failure or timeout
(--monai-timeout) leaves its columns empty and does not stop the project rows.

VNet's transposed convs use the per-backend formulation of
`radnet_jax.models.layers.transpose_formulation` (GPU: "subpixel", one conv
+ depth-to-space); `--vnet-transpose subpixel,dilated` times a VNet row per
formulation in the same run (the A/B against `lax.conv_transpose`).

--smoke shrinks everything (ResNet-10 at 8x32x32 batch 2, VNet 8..128 at
16^3 batch 2, 3 steps; MONAI: ResNet-10, its VNet at 16^3, 2 steps, no
compile) so the
script's logic can be checked on a CPU in a few minutes; its timings mean
nothing.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
# Only jax/flax/optax/numpy/pandas are needed: a lent GPU machine's image has
# those but not grain / array_record / ml_collections, which `train`,
# `segment` and the experiment configs import: losses come from the
# grain-free `radnet_jax.training.losses`, the paper settings from PAPER_FALLBACK.
from radnet_jax.data import device_augment
from radnet_jax.training import losses
from radnet_jax.training import trainer  # noqa: E402
from radnet_jax.labels import taxonomy as tax  # noqa: E402
from radnet_jax.models import layers, resnet3d, vnet  # noqa: E402
from radnet_jax.cli import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Dense bfloat16 tensor-core peaks (TFLOP/s, no sparsity), by device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIE": 756.0, "H100": 989.0,
                    "A100": 312.0, "L4": 121.0, "B200": 2250.0}
# Thresholds of the bf16-vs-f32 forward check (bf16 keeps 8 significant
# bits; an implementation error gives a relative error ~1, cosine ~0).
MAX_REL_L2 = 0.1
MIN_COSINE = 0.99


def device_name() -> str:
  """nvidia-smi's GPU name if there is one, else JAX's device_kind."""
  if jax.default_backend() == "gpu":
    try:
      out = subprocess.run(["nvidia-smi", "--query-gpu=name",
                            "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20, check=True).stdout
      if out.strip():
        return out.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
      pass
  return jax.devices()[0].device_kind


def peak_tflops(name: str) -> float | None:
  """Dense bf16 peak of a known card (longest matching key first)."""
  up = name.upper()
  for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
    if key in up:
      return PEAK_BF16_TFLOPS[key]
  return None


# experiments/pretrain.py:paper, for machines without ml_collections.
# tests/test_gpu_check.py keeps it equal to the config.
PAPER_FALLBACK = {"name": "resnet50", "dtype": "bfloat16",
                  "kwargs": {"input_windows": ((-0.16, 0.24),),
                             "stem_kernel": (3, 7, 7), "stem_strides": (1, 2, 2),
                             "global_pool": "avg", "pool_stages": 1},
                  "taxonomy": "paper",
                  "weights": {"sequence": 1.0, "plane": 1.0, "contrast": 2.0,
                              "coverage": 1.5, "spacing": 0.5}}


def paper_config() -> tuple[dict, str]:
  """The paper pretraining model/loss settings and where they came from."""
  try:
    path = os.path.join(ROOT, "experiments", "pretrain.py")
    spec = importlib.util.spec_from_file_location("pretrain_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("paper")
  except ImportError as e:
    return dict(PAPER_FALLBACK), f"built-in copy ({e.name} not installed)"
  return {"name": c.model.name, "dtype": c.model.dtype,
          "kwargs": dict(c.model.kwargs), "taxonomy": c.taxonomy,
          "weights": dict(c.loss.weights)}, "experiments/pretrain.py:paper"


def _eqn_flops(eqn) -> float:
  """Multiply-add FLOPs (x2) of one convolution or dot_general equation."""
  name = eqn.primitive.name
  if name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec
    window = float(np.prod([rhs[d] for d in rhs_spec[2:]]))
    # Input-dilated convs (the input gradient of a strided conv) only touch
    # one tap in prod(lhs_dilation) of their window.
    window /= float(np.prod(eqn.params.get("lhs_dilation") or (1,)))
    return 2.0 * float(np.prod(out)) * rhs[rhs_spec[1]] * window
  if name == "dot_general":
    (lc, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    k = float(np.prod([lhs[d] for d in lc])) if lc else 1.0
    return 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * k
  return 0.0


def jaxpr_flops(jaxpr) -> float:
  """Convolution + matmul FLOPs of a (closed) jaxpr, sub-jaxprs included.

  The backend-independent count: on GPU, XLA's cost analysis of the compiled
  step does not see inside cuDNN / cuBLAS library calls.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    total += _eqn_flops(eqn)
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else (v,)):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          total += jaxpr_flops(sub)
  return total


def _flops(cost) -> float:
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


def resnet_case(batch: int, shape: tuple[int, int, int], smoke: bool):
  """(model, loss_fn, batch dict, f32 model) for the paper pretraining step."""
  cfg, source = paper_config()
  print(f"#   model/loss settings: {source}; losses: radnet_jax.training.losses", flush=True)
  taxonomy = tax.Taxonomy(cfg["taxonomy"])
  weights = cfg["weights"]
  heads = {t: taxonomy.num_classes[t] for t in tax.TASKS
           if float(weights.get(t, 0.0)) > 0}
  model = resnet3d.get_model("resnet10" if smoke else cfg["name"], heads=heads,
                             dtype=jnp.dtype(cfg["dtype"]), **cfg["kwargs"])
  model_f32 = model.clone(dtype=jnp.float32)
  rng = np.random.default_rng(0)
  n = taxonomy.num_classes
  data = {
      "volume": rng.normal(size=(batch, *shape, 1)).astype(np.float32),
      "mask": np.ones((batch,), np.float32),
      "coverage": (rng.random((batch, n["coverage"])) < 0.3).astype(np.float32),
      "coverage_mask": np.ones((batch,), np.float32),
      "spacing": rng.uniform(0.5, 5.0, batch).astype(np.float32),
  }
  for task in ("sequence", "plane", "contrast"):
    data[task] = rng.integers(0, n[task], batch).astype(np.int32)
  # What the host leaves for the step under augment.on_device ("auto" = on
  # an accelerator): half the volumes rotated by up to 5 degrees, noise.
  data["rotate_degrees"] = np.where(rng.random(batch) < 0.5,
                                    rng.uniform(-5, 5, batch), 0.0
                                    ).astype(np.float32)
  data["noise_std"] = rng.uniform(0, 0.03, batch).astype(np.float32)

  def loss_fn(out, b):
    return losses.multitask_loss(out[0], b, weights=weights)

  def logits(out):
    outs = out[0]
    return jnp.concatenate([outs[t].astype(jnp.float32) for t in sorted(outs)
                            if t != "embedding"], axis=-1)
  return model, loss_fn, data, model_f32, logits


def vnet_case(batch: int, shape: tuple[int, int, int], smoke: bool):
  """(model, loss_fn, batch dict, f32 model) for the VNet segmentation step."""
  filters = (8, 16, 32, 64, 128) if smoke else (16, 32, 64, 128, 256)
  model = vnet.VNet(out_channels=2, filters=filters, dtype=jnp.bfloat16)
  model_f32 = model.clone(dtype=jnp.float32)
  rng = np.random.default_rng(1)
  data = {"volume": rng.normal(size=(batch, *shape, 1)).astype(np.float32),
          "label": (rng.random((batch, *shape)) < 0.2).astype(np.int32)}

  def loss_fn(out, b):
    return losses.seg_loss(out, b["label"], 2)
  return model, loss_fn, data, model_f32, lambda out: out.astype(jnp.float32)


_CONV_TARGET = re.compile(r'custom_call_target="(__cudnn\$conv[A-Za-z]*)"')
# "[dtype[dims]{layout} ]%name" inside an op's operand list.
_OPERAND = re.compile(r"(?:([a-z]+[0-9]*)\[([0-9,]*)\](?:\{[^}]*\})?\s+)?%([\w.\-]+)")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\(?([a-z]+[0-9]*)\[([0-9,]*)\]")


def conv_report(hlo_text: str) -> list[dict]:
  """The convolutions of an optimised HLO module, one dict per op.

  GPU: cuDNN custom calls (``__cudnn$convForward`` / ``BackwardInput`` /
  ``BackwardFilter`` and fused variants) with the algorithm autotuning
  picked (``algo_id``, empty if the backend config does not say). CPU: XLA
  ``convolution`` ops. Keys: op, kind, result, operands (dtype[dims] text;
  operand shapes are looked up by name where the HLO text omits them),
  window, dim_labels, algo.
  """
  lines = hlo_text.splitlines()
  shapes = {}
  for line in lines:
    d = _DEF.match(line)
    if d:
      shapes[d.group(1)] = f"{d.group(2)}[{d.group(3)}]"
  rows = []
  for line in lines:
    m = _CONV_TARGET.search(line)
    if m:
      kind = m.group(1).replace("__cudnn$conv", "") or "conv"
    elif " convolution(" in line:
      kind = "xla-convolution"
    else:
      continue
    d = _DEF.match(line)
    args = line.split("custom-call(" if m else "convolution(", 1)[1]
    args = args.split(")", 1)[0]
    operands = [f"{t}[{dims}]" if t else shapes.get(name, name)
                for t, dims, name in _OPERAND.findall(args)]
    window = re.search(r"window=\{([^}]*)\}", line)
    labels = re.search(r"dim_labels=([^,\s]+)", line)
    algo = re.search(r'"algo_id":"?(-?[0-9]+)', line)
    rows.append({"op": d.group(1) if d else "",
                 "kind": kind,
                 "result": f"{d.group(2)}[{d.group(3)}]" if d else "",
                 "operands": operands,
                 "window": window.group(1) if window else "",
                 "dim_labels": labels.group(1) if labels else "",
                 "algo": algo.group(1) if algo else ""})
  return rows


def print_convs(compiled) -> None:
  rows = conv_report(compiled.as_text())
  print(f"#   {len(rows)} convolutions in the compiled step "
        f"(kind, operands -> result, window, algorithm):")
  for r in rows:
    print(f"#     {r['kind']:<22} {' x '.join(r['operands'])} -> {r['result']}"
          f"  {{{r['window']}}}  {r['dim_labels']}  algo {r['algo'] or '?'}")


def profile_top(compiled, state, batch, top: int, out_dir: str):
  """Traces 2 steps; prints the ops/kernels with the most device time.

  Returns the state (the step donates it). Time per event name is summed
  over the trace's device planes (GPU streams), or over XLA's CPU threads
  when there is no device plane.
  """
  import collections
  import glob
  import shutil
  shutil.rmtree(out_dir, ignore_errors=True)
  with jax.profiler.trace(out_dir):
    for _ in range(2):
      state, metrics = compiled(state, batch)
      metrics["loss"].block_until_ready()
  path = glob.glob(os.path.join(out_dir, "**", "*.xplane.pb"), recursive=True)
  data = jax.profiler.ProfileData.from_file(path[0])
  per = collections.defaultdict(float)
  planes = [pl for pl in data.planes if pl.name.startswith("/device:")]
  for plane in planes or [pl for pl in data.planes if pl.name == "/host:CPU"]:
    for line in plane.lines:
      if not planes and not line.name.startswith("tf_XLA"):
        continue
      for ev in line.events:
        if "Execute" not in ev.name:
          per[ev.name] += ev.duration_ns / 2e6  # ms per step
  total = sum(per.values())
  print(f"#   profile: {total:.1f} ms of op time per step; top {top}:")
  for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:top]:
    print(f"#   {v:9.2f} ms {100 * v / max(total, 1e-9):5.1f}%  {k[:110]}")
  return state


def run_case(name: str, case, steps: int, warmup: int,
             peak: float | None, profile: int = 0,
             preprocess=None, convs: bool = False) -> dict:
  model, loss_fn, data, model_f32, logits_fn = case
  mesh = trainer.make_mesh(1)
  tx, schedule = trainer.make_optimizer(
      {"name": "adamw", "lr": 1e-4, "warmup_steps": 0, "weight_decay": 5e-5},
      total_steps=1000)
  shape = data["volume"].shape
  state = trainer.create_train_state(model, tx, shape[1:], 0, mesh)
  batch = trainer.put_batch(data, mesh)
  step = trainer.make_train_step(model, tx, loss_fn, mesh, schedule,
                                 preprocess=preprocess)

  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  flops_lowered = _flops(lowered.cost_analysis())
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  if convs:
    print_convs(compiled)
  flops_xla = _flops(compiled.cost_analysis())
  flops = jaxpr_flops(jax.make_jaxpr(step)(state, batch))

  # Keep a copy of the initial variables for the bf16-vs-f32 check (the
  # state buffers are donated to the step).
  variables = jax.device_get({"params": state.params,
                              "batch_stats": state.batch_stats})
  times, losses = [], []
  for i in range(warmup + steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    loss = metrics["loss"].block_until_ready()
    if i >= warmup:
      times.append(time.perf_counter() - t)
      losses.append(float(loss))
  step_s = statistics.median(times)
  if profile:
    state = profile_top(compiled, state, batch, profile,
                        os.path.join("/tmp", f"gpu_check_trace_{name}"))

  # bf16 vs f32 forward on the same parameters and batch (training-mode
  # BatchNorm, batch statistics; dropout off).
  x = batch["volume"]

  def fwd(m):
    def f(v, x):
      out, _ = m.apply(v, x, train=True, mutable=["batch_stats"],
                       rngs={"dropout": jax.random.key(0)})
      return logits_fn(out)
    return jax.jit(f)
  ya = fwd(model)(variables, x)
  with jax.default_matmul_precision("highest"):
    yb = fwd(model_f32)(variables, x)
  ya, yb = np.asarray(ya, np.float64).ravel(), np.asarray(yb, np.float64).ravel()
  rel_l2 = float(np.linalg.norm(ya - yb) / max(np.linalg.norm(yb), 1e-30))
  cosine = float(ya @ yb / max(np.linalg.norm(ya) * np.linalg.norm(yb), 1e-30))
  ok = (all(np.isfinite(losses)) and rel_l2 <= MAX_REL_L2
        and cosine >= MIN_COSINE)
  tflops = flops / step_s / 1e12
  return {
      "model": name, "input": "x".join(map(str, shape[1:4])),
      "batch": shape[0], "compile_s": compile_s, "step_s": step_s,
      "step_s_min": min(times), "volumes_per_s": shape[0] / step_s,
      "tflop_per_step": flops / 1e12,
      "tflop_per_step_xla": flops_xla / 1e12,
      "tflop_per_step_xla_lowered": flops_lowered / 1e12,
      "tflops": tflops, "mfu": (tflops / peak) if peak else float("nan"),
      "loss_first": losses[0], "loss_last": losses[-1],
      "bf16_vs_f32_rel_l2": rel_l2, "bf16_vs_f32_cosine": cosine, "ok": ok,
  }


def run_monai_peer(a) -> dict[str, dict]:
  """Runs bench/gpu_check_monai.py in a child process; {model: row}.

  Its output streams through; a failure or timeout gives {} (logged), so
  the project rows still run.
  """
  import tempfile  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "monai.json")
    cmd = [sys.executable, os.path.join(ROOT, "bench", "gpu_check_monai.py"),
           "--models", a.models, "--batch", str(a.batch), "--vnet-batch",
           str(a.vnet_batch), "--steps", str(a.steps), "--warmup",
           str(a.warmup), "--json", out] + (["--smoke"] if a.smoke else [])
    print(f"# MONAI peer: {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    try:
      rc = subprocess.run(cmd, timeout=a.monai_timeout, check=False).returncode
    except subprocess.TimeoutExpired:
      print(f"# MONAI peer: timed out after {a.monai_timeout:.0f} s; no "
            f"peer columns", flush=True)
      return {}
    print(f"# MONAI peer: exit {rc} after {time.perf_counter() - t:.0f} s",
          flush=True)
    if not os.path.exists(out):
      return {}
    with open(out) as f:
      return {r["model"]: r for r in json.load(f)["rows"]}


def print_side_by_side(rows: list[dict], peak: float | None) -> None:
  """project vs MONAI per row: step times, ratio, MFU of both from the
  project's FLOP count (the same networks)."""
  print(f"{'model':<22} {'input':<11} {'batch':>5} {'project ms':>10} "
        f"{'MONAI ms':>9} {'proj/MONAI':>10} {'TFLOP/step':>10} "
        f"{'proj MFU':>8} {'MONAI MFU':>9} {'MONAI layout':>12}")
  for r in rows:
    peer = r.get("peer")
    flops = r["tflop_per_step"] * 1e12
    mfu = lambda s: (f"{100 * flops / s / 1e12 / peak:7.1f}%" if peak
                     else "     n/a")
    if peer:
      pm, ratio = f"{1e3 * peer['step_s']:9.1f}", f"{r['step_s'] / peer['step_s']:10.2f}"
      pmfu, lay = mfu(peer["step_s"]) + " ", peer["layout"]
    else:
      pm, ratio, pmfu, lay = f"{'-':>9}", f"{'-':>10}", f"{'-':>9}", "-"
    print(f"{r['model']:<22} {r['input']:<11} {r['batch']:>5} "
          f"{1e3 * r['step_s']:>10.1f} {pm} {ratio} "
          f"{r['tflop_per_step']:>10.4f} {mfu(r['step_s'])} {pmfu:>9} "
          f"{lay:>12}")


def main(argv=None) -> int:
  p = flags.Parser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="resnet50,vnet",
                 help="comma list of resnet50, vnet")
  p.add_argument("--batch", type=int, default=8, help="ResNet-50 batch")
  p.add_argument("--vnet-batch", type=int, default=1)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="dense bf16 peak; default from the detected card")
  p.add_argument("--smoke", action="store_true",
                 help="tiny shapes and models (logic check on CPU)")
  p.add_argument("--json", default=None, help="also write the rows here")
  p.add_argument("--convs", action="store_true",
                 help="list every convolution of the compiled step with its "
                      "shapes and the cuDNN algorithm picked")
  p.add_argument("--host-augment", action="store_true",
                 help="ResNet step without the rotation + noise that "
                      "augment.on_device runs in the step (default: with)")
  p.add_argument("--no-monai", action="store_true",
                 help="skip the MONAI (PyTorch) peer rows")
  p.add_argument("--monai-timeout", type=float, default=240.0,
                 help="seconds for the whole MONAI peer process")
  p.add_argument("--vnet-transpose", default="auto",
                 help="comma list of VNet transposed-conv formulations to "
                      "time, each a row: auto (per backend), subpixel, "
                      "dilated")
  p.add_argument("--profile", type=int, default=0, metavar="N",
                 help="trace 2 extra steps and print the N ops with the "
                      "most device time")
  a = p.parse_args(argv)
  if a.steps < 1 or a.warmup < 1:
    p.error("--steps and --warmup must be >= 1")
  forms = [f.strip() for f in a.vnet_transpose.split(",") if f.strip()]
  bad = [f for f in forms if f not in ("auto",) + layers.TRANSPOSE_IMPLS]
  if bad or not forms:
    p.error(f"--vnet-transpose: unknown {bad} (auto, subpixel, dilated)")
  # The peer runs first, in its own process: JAX then preallocates most of
  # the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION) for the project rows.
  peer = {} if a.no_monai else run_monai_peer(a)

  name = device_name()
  peak = a.peak_tflops or peak_tflops(name)
  res_shape, vnet_shape = (48, 192, 192), (128, 128, 128)
  batch, vbatch, steps, warmup = a.batch, a.vnet_batch, a.steps, a.warmup
  if a.smoke:
    res_shape, vnet_shape = (8, 32, 32), (16, 16, 16)
    batch, vbatch, steps, warmup = min(batch, 2), 2, min(steps, 3), 1
  print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
        f", device: {name} ({jax.default_backend()}, {jax.device_count()} "
        f"device(s)), jax {jax.__version__}, bf16 dense peak "
        f"{peak if peak else 'unknown'} TFLOP/s"
        f"{', SMOKE (timings meaningless)' if a.smoke else ''}", flush=True)
  if not a.smoke and jax.default_backend() == "cpu":
    print("# warning: no accelerator backend; these full-size steps will be "
          "very slow on CPU (use --smoke)", flush=True)

  rows = []
  for model in a.models.split(","):
    model = model.strip()
    if model == "resnet50":
      case = resnet_case(batch, res_shape, a.smoke)
    elif model != "vnet":
      p.error(f"unknown model {model!r} (resnet50, vnet)")
    for form in (forms if model == "vnet" else [None]):
      if model == "vnet":
        case = vnet_case(vbatch, vnet_shape, a.smoke)
      print(f"# {model}: compiling and timing ...", flush=True)
      label = f"{model}-smoke" if a.smoke else model  # smoke: smaller nets
      pre = None
      if model == "resnet50" and not a.host_augment:
        pre = device_augment.augment
        label += "+aug"
      if form is not None:
        # Read when the step is traced (inside run_case).
        layers.TRANSPOSE_IMPL = None if form == "auto" else form
        label += (f"[{layers.transpose_formulation()}]"
                  if layers.resolve_impl("auto") == "xla" else "[cpu-taps]")
      try:
        rows.append(run_case(label, case, steps, warmup, peak, a.profile, pre,
                             a.convs))
      finally:
        layers.TRANSPOSE_IMPL = None
      r = rows[-1]
      r["peer"] = peer.get(model)
      print(f"#   compile {r['compile_s']:.1f} s, step "
            f"{1e3 * r['step_s']:.1f} ms, loss {r['loss_first']:.4f} -> "
            f"{r['loss_last']:.4f}", flush=True)

  print(f"{'model':<18} {'input':<11} {'batch':>5} {'step ms':>9} {'vol/s':>8} "
        f"{'TFLOP/step':>10} {'XLA comp.':>9} {'XLA low.':>9} {'TFLOP/s':>8} "
        f"{'MFU':>6} "
        f"{'bf16/f32 relL2':>14} {'cos':>7} {'check':>5}")
  for r in rows:
    mfu = f"{100 * r['mfu']:5.1f}%" if np.isfinite(r["mfu"]) else "  n/a"
    print(f"{r['model']:<18} {r['input']:<11} {r['batch']:>5} "
          f"{1e3 * r['step_s']:>9.1f} {r['volumes_per_s']:>8.2f} "
          f"{r['tflop_per_step']:>10.4f} {r['tflop_per_step_xla']:>9.4f} "
          f"{r['tflop_per_step_xla_lowered']:>9.4f} "
          f"{r['tflops']:>8.1f} {mfu:>6} {r['bf16_vs_f32_rel_l2']:>14.4f} "
          f"{r['bf16_vs_f32_cosine']:>7.4f} {'ok' if r['ok'] else 'FAIL':>5}")
  print()
  print_side_by_side(rows, peak)
  if a.json:
    with open(a.json, "w") as f:
      json.dump({"device": name, "peak_tflops": peak, "smoke": a.smoke,
                 "jax": jax.__version__, "rows": rows}, f, indent=1)
  peers_ok = all(r["ok"] for r in peer.values())
  return 0 if all(r["ok"] for r in rows) and peers_ok else 1


if __name__ == "__main__":
  sys.exit(main())
