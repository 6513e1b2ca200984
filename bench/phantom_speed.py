"""Phantom corpus generation speed: series per second, wall and CPU, per tree.

  python bench/phantom_speed.py [--n 60] [--seed 0] [--workers 1] [--peer DIR]

Builds ``make_corpus(n)`` into a fresh temporary folder with this checkout's
``radnet_jax`` and, with ``--peer``, with another checkout's (e.g. a
``git worktree`` of an older commit), each in its own process, and prints
one table row per tree: wall seconds, CPU seconds (user + sys of the child),
series, files, MB written and the ratio to the peer. On a shared machine the
CPU column and the ratio are the figures to read; wall time depends on load.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from radnet_jax.cli import flags  # noqa: E402  pylint: disable=wrong-import-position

_CHILD = r"""
import json, sys, time
from radnet_jax.phantom import make_corpus
t0 = time.time()
s = make_corpus(sys.argv[1], n=int(sys.argv[2]), seed=int(sys.argv[3]), workers=int(sys.argv[4]), progress=False)
print(json.dumps({"wall": time.time() - t0, "series": s["n_series"], "files": s["n_files"], "bytes": s["bytes"]}))
"""


def run(tree: str, n: int, seed: int, workers: int) -> dict:
  with tempfile.TemporaryDirectory() as out:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    res = subprocess.run([sys.executable, "-c", _CHILD, os.path.join(out, "c"), str(n), str(seed), str(workers)],
                         cwd=tree, env=dict(os.environ, PYTHONPATH=tree), capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = json.loads(res.stdout.strip().splitlines()[-1])
    row["process_wall"] = time.time() - t0
    row["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return row


def main(argv=None) -> None:
  ap = flags.Parser(description=__doc__.split("\n")[0])
  ap.add_argument("--n", type=int, default=60)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--workers", type=int, default=1)
  ap.add_argument("--peer", default="", help="another checkout to time the same way")
  args = ap.parse_args(argv)
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  trees = [("this tree", here)] + ([("peer", os.path.abspath(args.peer))] if args.peer else [])
  rows = [(name, run(tree, args.n, args.seed, args.workers)) for name, tree in trees]
  ref = rows[-1][1]["cpu"]
  print(f"make_corpus(n={args.n}, seed={args.seed}, workers={args.workers}), load {os.getloadavg()[0]:.1f}")
  print("| tree | generation wall s | CPU s (user+sys) | series | files | MB | CPU vs peer |")
  print("|---|---|---|---|---|---|---|")
  for name, r in rows:
    print(f"| {name} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['series']} | {r['files']} | {r['bytes'] / 1e6:.0f} | "
          f"{r['cpu'] / ref:.2f} |")


if __name__ == "__main__":
  main()
