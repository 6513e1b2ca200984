"""radnet_jax.hostenv: when run.py re-executes itself with huge-page malloc."""
import os
import subprocess
import sys

import pytest

from radnet_jax import hostenv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINUX = dict(system="Linux", libc=("glibc", "2.36"), thp="madvise")


def test_env_only_where_it_applies():
  env = hostenv.hugepage_malloc_env({"PATH": "/bin"}, **LINUX)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  assert env["PATH"] == "/bin"
  # Existing tunables are kept, colon-separated.
  env = hostenv.hugepage_malloc_env(
      {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **LINUX)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  none = [
      ({}, dict(LINUX, system="Darwin")),
      ({}, dict(LINUX, libc=("", ""))),                 # musl / unknown
      ({}, dict(LINUX, libc=("glibc", "2.31"))),         # no hugetlb tunable
      ({}, dict(LINUX, thp="never")),
      ({}, dict(LINUX, thp="")),
      ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, LINUX),  # user's choice
      ({"RADNET_HUGEPAGE_MALLOC": "0"}, LINUX),               # opt-out
      (env, LINUX),                                           # already re-executed
  ]
  for environ, host in none:
    assert hostenv.hugepage_malloc_env(environ, **host) is None, (environ, host)


def test_thp_mode_parses_the_kernel_file(tmp_path):
  p = tmp_path / "enabled"
  p.write_text("always [madvise] never\n")
  assert hostenv.thp_mode(str(p)) == "madvise"
  assert hostenv.thp_mode(str(tmp_path / "missing")) == ""


def test_reexec_keeps_arguments_and_sets_the_tunable(tmp_path):
  if hostenv.hugepage_malloc_env(os.environ) is None:
    pytest.skip("huge-page malloc does not apply on this host")
  script = tmp_path / "child.py"
  script.write_text(
      "import os, sys\n"
      "from radnet_jax import hostenv\n"
      "hostenv.reexec_with_hugepage_malloc(sys.orig_argv[1:])\n"
      "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n")
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("RADNET_HUGEPAGE_REEXEC", None)
  p = subprocess.Popen([sys.executable, "-u", str(script), "a", "--b=1"], env=env,
                       stdout=subprocess.PIPE, text=True)
  out, _ = p.communicate(timeout=60)
  pid, tunables, args = out.strip().split(" ", 2)
  assert int(pid) == p.pid                      # replaced in place, same process
  assert "glibc.malloc.hugetlb=1" in tunables
  assert args == "['a', '--b=1']"
