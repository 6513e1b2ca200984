"""radnet_jax.cli.flags: one spelling (dashes) for every command's flags;
the old underscore spellings still parse, with a deprecation message."""
import glob
import os
import re

import pytest

from radnet_jax.cli import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parser():
  p = flags.Parser(prog="cmd")
  p.add_argument("--val-fraction", type=float, default=0.0)
  p.add_argument("--nifti-out", default="")
  p.add_argument("--hash-paths", action="store_true")
  return p


def test_underscore_spellings_parse_with_a_deprecation_message(capsys):
  a = _parser().parse_args(["--val_fraction", "0.2", "--nifti_out=m.nii.gz", "--hash_paths"])
  assert (a.val_fraction, a.nifti_out, a.hash_paths) == (0.2, "m.nii.gz", True)
  err = capsys.readouterr().err
  assert "cmd: --val_fraction is deprecated, use --val-fraction" in err
  assert "--nifti_out is deprecated, use --nifti-out" in err
  a = _parser().parse_args(["--val-fraction", "0.3"])
  assert a.val_fraction == 0.3 and capsys.readouterr().err == ""


def test_unknown_flags_and_values_after_double_dash_are_untouched(capsys):
  with pytest.raises(SystemExit):
    _parser().parse_args(["--no_such_flag", "1"])
  p = flags.Parser(prog="launch")
  p.add_argument("--cpu-devices", type=int)
  p.add_argument("command", nargs="*")
  a = p.parse_args(["--cpu_devices", "2", "--", "python", "run.py", "--config.data.shards_dir=x"])
  assert a.cpu_devices == 2 and a.command == ["python", "run.py", "--config.data.shards_dir=x"]


def test_every_command_declares_dashed_flags():
  bad = []
  files = glob.glob(os.path.join(ROOT, "radnet_jax", "**", "*.py"), recursive=True) + \
      glob.glob(os.path.join(ROOT, "data_prep", "*.py")) + glob.glob(os.path.join(ROOT, "bench",
                                                                                "*.py"))
  for f in files:
    text = open(f).read()
    for m in re.finditer(r'add_argument\(\s*"(--[^"]*_[^"]*)"', text):
      bad.append(f"{os.path.relpath(f, ROOT)}: {m.group(1)}")
    if "add_argument(" in text and "argparse.ArgumentParser(" in text:
      bad.append(f"{os.path.relpath(f, ROOT)}: argparse.ArgumentParser instead of flags.Parser")
  assert not bad, "\n".join(bad)


def test_bench_scripts_run_from_any_folder():
  """`python bench/X.py` must work without PYTHONPATH: every top-level import
  of the project's packages comes after the script puts the checkout on
  sys.path."""
  import ast
  bad = []
  for f in sorted(glob.glob(os.path.join(ROOT, "bench", "*.py"))):
    on_path = False
    for node in ast.parse(open(f).read()).body:
      if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and
          ast.unparse(node.value.func) == "sys.path.insert"):
        on_path = True
      mods = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
              [a.name for a in node.names] if isinstance(node, ast.Import) else [])
      for m in mods:
        if m.split(".")[0] in ("radnet_jax", "experiments", "tests", "data_prep") and not on_path:
          bad.append(f"{os.path.relpath(f, ROOT)}: imports {m} before sys.path.insert")
  assert not bad, "\n".join(bad)
