"""bench/gpu_check.py's built-in paper settings (used on accelerator images
without ml_collections) must equal experiments/pretrain.py:paper."""
import importlib.util
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_paper_fallback_matches_config():
  spec = importlib.util.spec_from_file_location(
      "gpu_check", os.path.join(ROOT, "bench", "gpu_check.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg, source = mod.paper_config()
  assert source == "experiments/pretrain.py:paper"
  # JSON round trip: tuples and lists compare alike.
  norm = lambda d: json.loads(json.dumps(d, sort_keys=True))
  assert norm(mod.PAPER_FALLBACK) == norm(cfg)


def _load():
  spec = importlib.util.spec_from_file_location(
      "gpu_check", os.path.join(ROOT, "bench", "gpu_check.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_conv_report_reads_cudnn_calls_and_cpu_convolutions():
  mod = _load()
  gpu = (
      '  %custom-call.12 = (bf16[8,48,96,96,64]{4,3,2,1,0}, u8[0]{0}) '
      'custom-call(bf16[8,48,192,192,1]{4,3,2,1,0} %param.1, '
      'bf16[3,7,7,1,64]{4,3,2,1,0} %copy.5), window={size=3x7x7 '
      'stride=1x2x2 pad=1_1x3_3x3_3}, dim_labels=b012f_012io->b012f, '
      'custom_call_target="__cudnn$convForward", backend_config={'
      '"cudnn_conv_backend_config":{"activation_mode":"kNone"},'
      '"algorithm":{"algo_id":"28","math_type":"TENSOR_OP_MATH"}}\n'
      '  %add.3 = f32[4]{0} add(f32[4]{0} %a, f32[4]{0} %b)\n'
      # Operand shapes left out of the call, as newer HLO text prints it.
      '  %p.2 = bf16[8,48,96,96,64]{4,3,2,1,0} parameter(2)\n'
      '  %w.7 = bf16[3,3,3,64,64]{4,3,2,1,0} parameter(3)\n'
      '  ROOT %custom-call.13 = (bf16[8,48,96,96,64]{4,3,2,1,0}, u8[0]{0}) '
      'custom-call(%p.2, %w.7), window={size=3x3x3 pad=1_1x1_1x1_1}, '
      'dim_labels=b012f_012io->b012f, '
      'custom_call_target="__cudnn$convBackwardInput"\n')
  first, second = mod.conv_report(gpu)
  assert first == {"op": "custom-call.12", "kind": "Forward",
                   "result": "bf16[8,48,96,96,64]",
                   "operands": ["bf16[8,48,192,192,1]", "bf16[3,7,7,1,64]"],
                   "window": "size=3x7x7 stride=1x2x2 pad=1_1x3_3x3_3",
                   "dim_labels": "b012f_012io->b012f", "algo": "28"}
  assert second["kind"] == "BackwardInput" and second["algo"] == ""
  assert second["operands"] == ["bf16[8,48,96,96,64]", "bf16[3,3,3,64,64]"]
  assert second["op"] == "custom-call.13"
  # On CPU: XLA's own convolution ops of a real compiled function.
  import jax
  import jax.numpy as jnp
  from jax import lax
  f = jax.jit(lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), [(1, 1), (1, 1)],
      dimension_numbers=("NHWC", "HWIO", "NHWC")))
  txt = f.lower(jnp.ones((1, 8, 8, 2)), jnp.ones((3, 3, 2, 4))).compile().as_text()
  rows = mod.conv_report(txt)
  assert [r["kind"] for r in rows] == ["xla-convolution"]
  assert rows[0]["result"] == "f32[1,8,8,4]"
  assert rows[0]["operands"] == ["f32[1,8,8,2]", "f32[3,3,2,4]"]
  assert rows[0]["window"].startswith("size=3x3")


def test_monai_heads_match_taxonomy():
  spec = importlib.util.spec_from_file_location(
      "gpu_check_monai", os.path.join(ROOT, "bench", "gpu_check_monai.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  from radnet_jax.labels import taxonomy as tax
  n = tax.Taxonomy("paper").num_classes
  assert mod.HEADS == {t: n[t] for t in tax.TASKS}


def test_monai_peer_smoke_and_side_by_side(capsys):
  # The MONAI peer's smoke path, as gpu_check.py runs it (child process,
  # CPU, tiny shapes, no compile): one finite row per model with the same
  # shapes as the project's smoke rows; then the side-by-side table.
  import argparse
  pytest.importorskip("monai")
  mod = _load()
  a = argparse.Namespace(models="resnet50,vnet", batch=8, vnet_batch=1,
                         steps=2, warmup=1, smoke=True, monai_timeout=240)
  peer = mod.run_monai_peer(a)
  assert set(peer) == {"resnet50", "vnet"}
  res, vn = peer["resnet50"], peer["vnet"]
  assert (res["input"], res["batch"]) == ("8x32x32", 2)
  assert (vn["input"], vn["batch"]) == ("16x16x16", 2)
  for r in (res, vn):
    assert r["ok"] and r["step_s"] > 0 and np.isfinite(r["loss_last"])
    # CPU: NCDHW, no compile, float32 (bf16 autocast and compile are on CUDA)
    assert r["layout"] == "ncdhw" and not r["compiled"]
    assert not r["bf16_autocast"]
  # Project rows (timings of this test's choosing) next to the peer's.
  rows = [{"model": "vnet-smoke[cpu-taps]", "input": vn["input"], "batch": 2,
           "step_s": 2.0 * vn["step_s"], "tflop_per_step": 0.002,
           "peer": vn},
          {"model": "resnet50-smoke+aug", "input": res["input"], "batch": 2,
           "step_s": 0.5, "tflop_per_step": 0.001, "peer": None}]
  capsys.readouterr()
  mod.print_side_by_side(rows, 1e-3)
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].split()[:4] == ["model", "input", "batch", "project"]
  vrow = lines[1].split()
  assert vrow[0] == "vnet-smoke[cpu-taps]" and float(vrow[5]) == 2.0
  mfu = 100 * 0.002 / (2.0 * vn["step_s"]) / 1e-3
  assert vrow[7] == f"{mfu:.1f}%"
  assert lines[2].split()[4:6] == ["-", "-"]
