"""bench/gpu_check.py's built-in paper settings (used on accelerator images
without ml_collections) must equal experiments/pretrain.py:paper."""
import importlib.util
import json
import os

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
