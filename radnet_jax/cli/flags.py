"""One spelling for command-line flags: words joined by dashes (``--batch-size``).

Every argparse command of the project (``radnet_jax.cli``, ``data_prep``,
``bench``) builds its parser as a ``Parser``. Flags are declared with dashes;
the underscore spelling of a declared flag (``--val_fraction`` for
``--val-fraction``) still works for a release and prints a deprecation
message naming the new spelling. (``run.py`` and ``--config.*`` overrides are
absl / ml_collections flags: ``--config.data.shards_dir`` names a config
field and keeps its underscores.)
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

RawDescriptionHelpFormatter = argparse.RawDescriptionHelpFormatter
ArgumentDefaultsHelpFormatter = argparse.ArgumentDefaultsHelpFormatter


def dashed(arg: str) -> str:
  """``--val_fraction[=x]`` -> ``--val-fraction[=x]`` (the value is kept)."""
  name, eq, value = arg.partition("=")
  return "--" + name[2:].replace("_", "-") + eq + value


class Parser(argparse.ArgumentParser):
  """``argparse.ArgumentParser`` that accepts the old underscore spellings of
  its dashed flags, with a deprecation message on stderr."""

  def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):
    args = list(sys.argv[1:] if args is None else args)
    known = {s for a in self._actions for s in a.option_strings}
    out = []
    for arg in args:
      if arg == "--":
        out.extend(args[len(out):])
        break
      name = arg.partition("=")[0]
      if arg.startswith("--") and "_" in name and name not in known and \
          dashed(name) in known:
        print(f"{self.prog}: {name} is deprecated, use {dashed(name)}", file=sys.stderr)
        arg = dashed(arg)
      out.append(arg)
    return super().parse_known_args(out, namespace)
