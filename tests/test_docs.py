"""docs/usage.md: every ```python block runs (in order, one namespace) against a
tiny checkpoint and phantom corpus; the ```bash CLI lines parse with the real CLI."""
import contextlib
import os
import re
import shlex

import numpy as np
import pytest

from tests.test_api import ROOT, make_checkpoint

DOC = os.path.join(ROOT, "docs", "usage.md")


def blocks(lang: str) -> list[str]:
  with open(DOC) as f:
    text = f.read()
  return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def medicalnet_state_dict(depth_preset: str = "resnet10") -> dict:
  """A MedicalNet-format state dict (torch key names and (O, I, kD, kH, kW)
  kernels) for the full-width preset, random values, plus MedicalNet's
  segmentation head, which the importer must leave out."""
  import jax
  from radnet_jax.models import resnet3d
  model = resnet3d.get_model(depth_preset, layout="medicalnet", shortcut_type="B")
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             np.zeros((1, 16, 16, 16, 1), np.float32), False))
  rng = np.random.default_rng(0)
  bn = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
  sd = {}
  for col in ("params", "batch_stats"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes[col]["trunk"])[0]:
      names = [p.key for p in path]
      mod, last = names[:-1], names[-1]
      if mod[0].startswith("stem"):
        prefix = "conv1" if mod[0] == "stem_conv" else "bn1"
      else:
        stage, block = re.fullmatch(r"stage(\d)_block(\d+)", mod[0]).groups()
        sub = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(
            mod[1], mod[1])
        prefix = f"layer{stage}.{int(block) - 1}.{sub}"
      if last == "kernel":
        v = rng.normal(0, 0.05, leaf.shape).astype(np.float32).transpose(4, 3, 0, 1, 2)
        sd[f"{prefix}.weight"] = v
      else:
        v = (np.ones if last in ("scale", "var") else np.zeros)(leaf.shape, np.float32)
        sd[f"{prefix}.{bn[last]}"] = v
  sd["conv_seg.0.weight"] = np.zeros((512, 32, 2, 2, 2), np.float32)
  return sd


def test_usage_snippets_run(tmp_path, monkeypatch, capsys):
  from radnet_jax import phantom
  corpus = str(tmp_path / "corpus")
  phantom.make_corpus(corpus, n=4, seed=2, workers=1, small=True, progress=False)
  wd = str(tmp_path / "run")
  make_checkpoint(wd)
  monkeypatch.setenv("RADNET_CHECKPOINT", wd)
  monkeypatch.setenv("RADNET_DICOM", os.path.join(corpus, "dicom"))
  monkeypatch.setenv("RADNET_SALT", "docs-salt")
  code = blocks("python")
  assert len(code) == 5, "usage.md: setup, load, predict, embed, MedicalNet"
  try:
    import torch
    pth = str(tmp_path / "resnet_10.pth")
    torch.save({f"module.{k}": torch.from_numpy(v) for k, v in
                medicalnet_state_dict().items()}, pth)
    monkeypatch.setenv("MEDICALNET_PTH", pth)
  except ImportError:
    torch = None
    code = code[:-1]   # reading .pth files needs torch
  monkeypatch.chdir(tmp_path)
  ns = {"__name__": "usage_md"}
  for i, block in enumerate(code):
    try:
      exec(compile(block, f"docs/usage.md block {i + 1}", "exec"), ns)
    except Exception as e:
      raise AssertionError(f"docs/usage.md python block {i + 1} failed: {e}\n{block}") from e
  out = capsys.readouterr().out
  # What the snippets promise, checked on their own variables.
  assert ns["loaded"].step == 3 and "embedding" in ns["outputs"]
  assert len(ns["report"].rows) == 4 and (tmp_path / "predictions.csv").exists()
  assert (tmp_path / "predictions_skipped.csv").exists()
  assert ns["emb"].embedding.shape == (4, 64) and len(ns["emb"].features) == 5
  assert "held-out accuracy" in out
  if torch is not None:
    assert ns["mn"].embedding.shape == (2, 512)
    assert "tensors mapped" in out and ns["mn_report"].shortcut_type == "B"
    assert any(k == "conv_seg.0.weight" for k, _ in ns["mn_report"].left_out)


def test_usage_cli_lines_parse():
  from radnet_jax import predict as cli
  lines = [b.replace("\\\n", " ") for b in blocks("bash")]
  cmds = [shlex.split(l) for b in lines for l in b.splitlines() if "radnet_jax.predict" in l]
  assert cmds
  for cmd in cmds:
    assert cmd[:3] == ["python", "-m", "radnet_jax.predict"]
    with contextlib.redirect_stderr(open(os.devnull, "w")):
      args = cli.build_parser().parse_args(cmd[3:])   # SystemExit on an unknown flag
    assert args.checkpoint and args.input
