"""Process pools that are safe to start from a process running jax."""
from __future__ import annotations

import multiprocessing
import sys
from typing import Callable, Iterable, Iterator


def context() -> multiprocessing.context.BaseContext:
  """fork while jax is not loaded (fast, needs no __main__ guard), else spawn.

  Forking a process that already runs jax's threads can deadlock the child
  (e.g. the phantom corpus or a scan started from run.py's demo).
  """
  fork_ok = "fork" in multiprocessing.get_all_start_methods()
  return multiprocessing.get_context(
      "fork" if fork_ok and "jax" not in sys.modules else "spawn")


def imap_unordered(fn: Callable, jobs: Iterable, workers: int) -> Iterator:
  """fn over jobs on ``workers`` processes (in this process when <= 1)."""
  if workers <= 1:
    yield from map(fn, jobs)
    return
  with context().Pool(workers) as pool:
    yield from pool.imap_unordered(fn, jobs)
