"""docs/usage.md: every ```python block runs (in order, one namespace) against a
tiny checkpoint, a phantom corpus and a phantom CT + DICOM SEG case; the ```bash
command lines of the library's CLIs parse with their real argparse parsers."""
import argparse
import contextlib
import importlib
import os
import re
import shlex
import sys

import numpy as np
import pytest

from tests.test_inference_load import ROOT, make_checkpoint

DOC = os.path.join(ROOT, "docs", "usage.md")


def blocks(lang: str) -> list[str]:
  with open(DOC) as f:
    text = f.read()
  return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def medicalnet_state_dict(depth_preset: str = "resnet10", **model_kwargs) -> dict:
  """A MedicalNet-format state dict (torch key names and (O, I, kD, kH, kW)
  kernels) for the preset (full width unless ``num_filters=``), random
  values, plus MedicalNet's segmentation head, which the importer must
  leave out."""
  import jax
  from radnet_jax.models import resnet3d
  model = resnet3d.get_model(depth_preset, layout="medicalnet",
                             **{"shortcut_type": "B", **model_kwargs})
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
  lits = tmp_path / "lits"
  phantom.make_lits(str(lits), n=1, seed=0, workers=1, progress=False, small=True,
                    dicom=True)
  monkeypatch.setenv("RADNET_SEG_DICOM", str(lits / "dicom"))
  code = blocks("python")
  # setup, load, predict, embed, MedicalNet, DICOM SEG (more may come).
  assert len(code) >= 6, f"usage.md has {len(code)} python blocks"
  try:
    import torch
    pth = str(tmp_path / "resnet_10.pth")
    torch.save({f"module.{k}": torch.from_numpy(v) for k, v in
                medicalnet_state_dict().items()}, pth)
    monkeypatch.setenv("MEDICALNET_PTH", pth)
  except ImportError:
    torch = None
    # reading .pth files needs torch
    code = [b for b in code if "load_medicalnet" not in b]
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
  # mean + max of the last three stages (64, 32 and 16 channels: the demo
  # config pools "avgmax" over pool_stages=3), 2 * (64 + 32 + 16) = 224
  assert ns["emb"].embedding.shape == (4, 224) and len(ns["emb"].features) == 5
  assert "held-out accuracy" in out
  if torch is not None:
    assert ns["mn"].embedding.shape == (2, 512)
    assert "tensors mapped" in out and ns["mn_report"].shortcut_type == "B"
    assert any(k == "conv_seg.0.weight" for k, _ in ns["mn_report"].left_out)
  # The SEG section: the phantom case's reference SEG painted onto its CT grid,
  # written back as a SEG and read again unchanged.
  assert len(ns["cases"]) == 1 and not ns["problems"]
  labels = ns["labels"]
  assert labels.shape == ns["vol"].voxels.shape and labels.dtype == np.uint8
  assert (labels == 1).sum() > 1000 and set(np.unique(labels)) <= {0, 1, 2}
  np.testing.assert_array_equal(ns["again"], labels)
  assert (tmp_path / "out" / "liver_seg.dcm").exists()
  assert "SEG round trip identical: True" in out


class _Parsed(Exception):
  """Raised by the patched parse_args: stops a CLI's main() once it has parsed."""

  def __init__(self, namespace: argparse.Namespace):
    super().__init__()
    self.namespace = namespace


def parse_cli(module: str, argv: list[str], monkeypatch) -> argparse.Namespace:
  """``argv`` parsed by ``module``'s own parser (SystemExit on a bad flag).

  Uses the module's ``build_parser()`` when it has one; otherwise runs its
  ``main(argv)`` with ``ArgumentParser.parse_args`` patched to stop right
  after parsing, so nothing is built or written.
  """
  mod = importlib.import_module(module)
  with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
    if hasattr(mod, "build_parser"):
      return mod.build_parser().parse_args(argv)
    real = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
      raise _Parsed(real(self, args, namespace))

    with monkeypatch.context() as m:
      m.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
      try:
        mod.main(argv)
      except _Parsed as e:
        return e.namespace
  raise AssertionError(f"{module}.main did not parse its arguments")


# The CLIs whose lines in usage.md are checked, and what each must be given.
_CLIS = {
    "radnet_jax.cli.predict": ("checkpoint", "input"),
    "radnet_jax.cli.predict_seg": ("workdir", "input", "out"),
    "data_prep.build_seg_shards": ("input", "out"),
    "data_prep.make_phantoms": ("out",),
}
_CLI_RE = re.compile(r"\bpython -m (" + "|".join(re.escape(m) for m in _CLIS) + r")(?![\w.])")


def cli_commands() -> list[list[str]]:
  """Every ``python -m <one of _CLIS>`` line of the bash blocks, split."""
  lines = [b.replace("\\\n", " ") for b in blocks("bash")]
  return [shlex.split(l) for b in lines for l in b.splitlines() if _CLI_RE.search(l)]


def test_cli_line_matching_is_exact():
  # radnet_jax.cli.predict_seg is not radnet_jax.predict, and a prefix is no match.
  assert _CLI_RE.search("python -m radnet_jax.cli.predict_seg --workdir W").group(1) == \
      "radnet_jax.cli.predict_seg"
  assert _CLI_RE.search("python -m radnet_jax.cli.predict --checkpoint C").group(1) == \
      "radnet_jax.cli.predict"
  assert not _CLI_RE.search("python -m radnet_jax.predictor --x 1")
  assert not _CLI_RE.search("python -m data_prep.make_phantoms_v2 --out P")


def test_usage_cli_lines_parse(monkeypatch):
  cmds = cli_commands()
  seen = {cmd[2] for cmd in cmds}
  assert seen == set(_CLIS), f"usage.md shows no command line for {set(_CLIS) - seen}"
  for cmd in cmds:
    assert cmd[:2] == ["python", "-m"] and cmd[2] in _CLIS, cmd
    args = parse_cli(cmd[2], cmd[3:], monkeypatch)   # SystemExit on an unknown flag
    for name in _CLIS[cmd[2]]:
      assert getattr(args, name), (cmd, name)
    if cmd[2] == "data_prep.build_seg_shards" and args.label_map:
      from data_prep import build_seg_shards
      mapping = build_seg_shards._label_map(args.label_map)  # pylint: disable=protected-access
      assert mapping and set(mapping.values()) <= {0, 1, 2}


def test_parse_cli_rejects_unknown_flags(monkeypatch):
  for module in ("radnet_jax.cli.predict_seg", "data_prep.build_seg_shards"):
    with pytest.raises(SystemExit):
      parse_cli(module, ["--input", "x", "--out", "y", "--no-such-flag"], monkeypatch)


def test_ci_runs_the_readme_test_command_verbatim():
  # .ci/run extracts the README's test line instead of keeping its own copy,
  # so the README's command is what CI proves on a fresh clone.
  sys.path.insert(0, os.path.join(ROOT, ".ci"))
  try:
    import readme_command  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  test_line = readme_command.command("test")
  assert "pytest" in test_line and "requirements-dev.txt" in test_line
  assert test_line in open(os.path.join(ROOT, "README.md")).read()
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  assert "readme_command.py test" in ci and "pytest" not in ci.replace("readme_command", "")
  assert readme_command.command("install").endswith("python run.py --config=experiments/pretrain.py")
