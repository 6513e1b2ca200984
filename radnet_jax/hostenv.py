"""Process settings for CPU hosts that only work if set before the process starts.

Transparent huge pages for malloc. XLA:CPU allocates each step's temporary
buffers afresh; they are larger than glibc's mmap threshold (at most 32 MB),
so every step maps new memory and touches it page by page: the phantom demo
spent ~24% of its CPU time in the kernel (108M minor page faults in a 10-min
run). With the glibc tunable ``glibc.malloc.hugetlb=1`` (glibc >= 2.35) malloc
asks for transparent huge pages, one fault per 2 MB instead of per 4 KB:
the demo's train step went from 0.65 to 0.41 s on 2 cores (bench/RESULTS.md).
glibc reads tunables only at process start, so ``run.py`` re-executes itself
once with the tunable added (``reexec_with_hugepage_malloc``). Opt out with
``RADNET_HUGEPAGE_MALLOC=0``; nothing happens off Linux/glibc, on older glibc,
when transparent huge pages are disabled, or when GLIBC_TUNABLES already sets
``hugetlb``.
"""
from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
_GUARD = "RADNET_HUGEPAGE_REEXEC"


def _glibc_at_least(version: str, need: tuple[int, int] = (2, 35)) -> bool:
  try:
    parts = tuple(int(p) for p in version.split(".")[:2])
  except ValueError:
    return False
  return len(parts) == 2 and parts >= need


def thp_mode(path: str = THP_MODE_FILE) -> str:
  """The kernel's transparent-huge-page mode ("always", "madvise", "never"),
  or "" if unknown."""
  try:
    with open(path, encoding="ascii") as f:
      text = f.read()
  except OSError:
    return ""
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else ""


def hugepage_malloc_env(environ: Mapping[str, str], *, system: str | None = None,
                        libc: tuple[str, str] | None = None,
                        thp: str | None = None) -> dict[str, str] | None:
  """The environment to re-execute with, or None if it does not apply.

  ``system``, ``libc`` (name, version) and ``thp`` default to this host's
  (``platform.system()``, ``platform.libc_ver()``, ``thp_mode()``).
  """
  system = platform.system() if system is None else system
  libc = platform.libc_ver() if libc is None else libc
  thp = thp_mode() if thp is None else thp
  if environ.get("RADNET_HUGEPAGE_MALLOC", "1") == "0" or environ.get(_GUARD):
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if (system != "Linux" or libc[0] != "glibc" or not _glibc_at_least(libc[1])
      or thp not in ("always", "madvise") or "malloc.hugetlb" in tunables):
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
  env[_GUARD] = "1"
  return env


def reexec_with_hugepage_malloc(argv: Sequence[str]) -> None:
  """Replaces this process by ``python argv...`` with the tunable set, if it
  applies (see the module docstring); returns only when it does not. Pass
  ``sys.orig_argv[1:]`` to keep the interpreter's own options (-u, -X, -m)."""
  env = hugepage_malloc_env(os.environ)
  if env is None or not sys.executable or not argv:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv], env)
