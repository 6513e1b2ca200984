"""Native pixel decoders in processes that may die.

The compressed transfer syntaxes (RLE, JPEG, JPEG-LS, JPEG 2000) are decoded
by native libraries (pylibjpeg's Rust and C plugins, gdcm). On a corrupt
stream they can raise a ``pyo3_runtime.PanicException`` (a ``BaseException``,
not an ``Exception``), crash the process (segfault, abort) or hang in a loop
that no Python signal interrupts. One such file must become one logged,
named skip, never the end of a conversion. Three mechanisms:

* ``is_fatal(e)``: the handlers that turn a bad file into a reason catch every
  ``BaseException`` except the ones that must propagate (KeyboardInterrupt,
  SystemExit, GeneratorExit, ``NeedsIsolation``), so a panic is a reason.
* ``Supervisor``: worker processes that run one job at a time and publish the
  file they are reading (``reading(path)``, called by ``dicom.volume`` and ``dicom.stream`` before
  each file) in shared memory. A worker that dies is attributed to its job
  and that file (``crash`` reason with the signal), a worker silent on one
  file for longer than ``file_timeout_s`` is killed (``timeout`` reason), and
  a fresh worker takes its place; the other jobs go on. Workers exit when the
  parent dies (``die_with_parent``).
* In-process runs (``workers=1``) decode uncompressed data inline, as fast as
  before: inside ``inline_until_native()`` the first compressed file raises
  ``NeedsIsolation`` (a ``BaseException``, so no handler on the way swallows
  it) and the runner hands that job to one long-lived ``Supervisor`` worker.

For tests and ``bench/faults.py`` only: ``$RADNET_TEST_DECODER_FAULT`` =
``"KIND:NAME"`` makes the native-decode step of every file whose path
contains NAME fail like a broken decoder: KIND ``panic`` (a BaseException
that is not an Exception), ``segfault`` (SIGSEGV) or ``hang`` (sleeps).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence

FAULT_ENV = "RADNET_TEST_DECODER_FAULT"
DEFAULT_FILE_TIMEOUT_S = 300.0
_PATH_BYTES = 4096


class NeedsIsolation(BaseException):
  """Raised inside ``inline_until_native()`` before a native decode: the job
  must run in an isolated worker. A BaseException, so that the per-file and
  per-stack handlers (which turn errors into reasons) let it through."""


class ReadStalled(BaseException):
  """A read of one file exceeded its time limit (``read_deadline``). A
  BaseException, so that it reaches the runner that reports it."""

  def __init__(self, path: str, seconds: float):
    super().__init__(f"reading {path} took longer than {seconds:g} s "
                     "(a stalled network mount or a blocking special file); skipped")
    self.path = path


def is_fatal(e: BaseException) -> bool:
  """True for exceptions that must propagate rather than become a reason."""
  return isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit, NeedsIsolation,
                        ReadStalled))


class _State:
  mode = "inline"                 # "inline" | "parent" | "worker"
  slot_path: Any = None           # shared char array (worker)
  slot_time: Any = None           # shared double: monotonic time of the last file
  deadline_s = 0.0                # > 0 inside read_deadline (main thread only)
  current = ""


def reading(path: str) -> None:
  """Called before each input file is read: in a supervised worker, publishes
  the file and the time, so a crash or a stall is attributed to it; inside
  ``read_deadline``, restarts the per-file timer."""
  if _State.mode == "worker":
    raw = os.fsencode(path)[:_PATH_BYTES - 1]
    _State.slot_path.raw = raw + b"\0"
    _State.slot_time.value = time.monotonic()
  elif _State.deadline_s > 0:
    _State.current = path
    signal.setitimer(signal.ITIMER_REAL, _State.deadline_s)


def _on_alarm(signum, frame) -> None:
  del signum, frame
  raise ReadStalled(_State.current, _State.deadline_s)


@contextlib.contextmanager
def read_deadline(seconds: float, path: str = "") -> Iterator[None]:
  """Every file read inside (``reading(path)`` restarts the timer) gets at
  most ``seconds``; a blocked ``open``/``read`` is interrupted by SIGALRM and
  ``ReadStalled`` raised. Only in the main thread (elsewhere: no limit), and
  not for native decoders, which no signal interrupts (``Supervisor``)."""
  if (seconds <= 0 or _State.deadline_s > 0 or not hasattr(signal, "setitimer") or
      threading.current_thread() is not threading.main_thread()):
    yield
    return
  old = signal.signal(signal.SIGALRM, _on_alarm)
  _State.deadline_s, _State.current = float(seconds), path
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    _State.deadline_s = 0.0
    signal.signal(signal.SIGALRM, old)


def before_native_decode(path: str) -> None:
  """Called right before a native decoder runs on ``path``."""
  if _State.mode == "parent":
    raise NeedsIsolation(path)
  reading(path)


def injected_fault(path: str) -> None:
  """Test hook, called where the native decoder runs: ``$RADNET_TEST_DECODER_FAULT``."""
  fault = os.environ.get(FAULT_ENV)
  if fault:
    _inject(fault, path)


class _InjectedPanic(BaseException):
  """What a Rust decoder's panic looks like to Python (test hook)."""


def _inject(spec: str, path: str) -> None:
  kind, _, name = spec.partition(":")
  if not name or name not in path:
    return
  if kind == "panic":
    raise _InjectedPanic(f"injected decoder panic on {os.path.basename(path)}")
  if kind == "segfault":
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(5)
  if kind == "hang":
    time.sleep(3600)


@contextlib.contextmanager
def inline_until_native() -> Iterator[None]:
  """Decodes in this process until a file needs a native decoder (which then
  raises ``NeedsIsolation``)."""
  old = _State.mode
  _State.mode = "parent"
  try:
    yield
  finally:
    _State.mode = old


# ----------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------

def die_with_parent(parent: int | None = None) -> None:
  """Ask the kernel to SIGKILL this process when its parent dies (Linux);
  elsewhere, and as a second line, a watchdog thread polls the parent pid.
  ``parent``: the pid of the process that started this one (pass it: the
  parent may already have died while this process was starting)."""
  parent = os.getppid() if parent is None else int(parent)
  if sys.platform.startswith("linux"):
    try:
      libc = ctypes.CDLL(None, use_errno=True)
      libc.prctl(1, signal.SIGKILL, 0, 0, 0)   # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
      pass
  if os.getppid() != parent:     # the parent died before prctl
    os._exit(1)

  def watch() -> None:
    while True:
      time.sleep(1.0)
      if os.getppid() != parent:
        os._exit(1)

  threading.Thread(target=watch, daemon=True, name="radnet-parent-watch").start()


@contextlib.contextmanager
def _environ(env: dict) -> Iterator[None]:
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _worker_main(conn, fn: Callable[[Any], Any], slot_path, slot_time, parent: int
                 ) -> None:
  die_with_parent(parent)
  _State.mode, _State.slot_path, _State.slot_time = "worker", slot_path, slot_time
  while True:
    try:
      msg = conn.recv()
    except (EOFError, OSError):
      return
    if msg is None:
      return
    index, job = msg
    slot_time.value = time.monotonic()
    slot_path.raw = b"\0"
    try:
      out = ("ok", fn(job))
    except BaseException as e:  # noqa: BLE001 - reported, the worker goes on
      if isinstance(e, (KeyboardInterrupt, SystemExit)):
        raise
      out = ("raised", f"{type(e).__name__}: {e}")
    slot_time.value = 0.0
    try:
      conn.send((index, out))
    except (TypeError, AttributeError, ValueError, pickle.PicklingError) as e:
      conn.send((index, ("raised", f"unpicklable result ({type(e).__name__}: {e})")))


@dataclasses.dataclass
class _Worker:
  proc: Any
  conn: Any
  slot_path: Any
  slot_time: Any
  job: int | None = None
  since: float = 0.0

  def current_file(self) -> str:
    return os.fsdecode(self.slot_path.raw.split(b"\0", 1)[0])


def _signal_name(code: int | None) -> str:
  if code is None:
    return "no exit status"
  if code < 0:
    try:
      return signal.Signals(-code).name
    except ValueError:
      return f"signal {-code}"
  return f"exit status {code}"


class Supervisor:
  """``fn(job)`` on ``workers`` spawned processes, one job per process at a time.

  ``map(jobs)`` yields ``(index, kind, value)`` in completion order: kind "ok"
  (value = ``fn``'s result), "crash" or "timeout" (value = the reason, naming
  the file the worker was on), "raised" (``fn`` raised; value = the error).
  ``fn`` must be a picklable top-level function. Workers are started on first
  use, kept across ``map`` calls, and replaced when one dies or is killed.
  """

  def __init__(self, fn: Callable[[Any], Any], workers: int = 1, *,
               file_timeout_s: float = DEFAULT_FILE_TIMEOUT_S,
               env: dict | None = None):
    self.fn = fn
    self.n = max(1, int(workers))
    self.file_timeout_s = float(file_timeout_s)
    # Workers inherit these at start (e.g. one BLAS thread each).
    self.env = dict(env or {})
    self.ctx = multiprocessing.get_context("spawn")   # safe even with jax loaded
    self.workers: list[_Worker] = []

  def _start(self) -> _Worker:
    parent, child = self.ctx.Pipe()
    slot_path = self.ctx.Array("c", _PATH_BYTES, lock=False)
    slot_time = self.ctx.Value("d", 0.0, lock=False)
    proc = self.ctx.Process(target=_worker_main, daemon=True,
                            args=(child, self.fn, slot_path, slot_time, os.getpid()))
    with _environ(self.env):   # inherited at spawn, before numpy is imported
      proc.start()
    child.close()
    return _Worker(proc, parent, slot_path, slot_time)

  def _retire(self, w: _Worker, kill: bool) -> None:
    if kill and w.proc.is_alive():
      w.proc.kill()
    w.proc.join(timeout=5)   # a process stuck in the kernel may not go at once
    w.conn.close()
    self.workers.remove(w)

  def map(self, jobs: Sequence[Any]) -> Iterator[tuple[int, str, Any]]:
    pending = list(enumerate(jobs))[::-1]
    while len(self.workers) < min(self.n, len(pending)):
      self.workers.append(self._start())
    try:
      yield from self._loop(pending)
    except BaseException:
      self.close(kill=True)
      raise

  def _loop(self, pending) -> Iterator[tuple[int, str, Any]]:
    while True:
      for w in list(self.workers):
        if w.job is None and pending:
          index, job = pending.pop()
          try:
            w.conn.send((index, job))
          except (BrokenPipeError, OSError):   # died while idle: replace, retry
            pending.append((index, job))
            self._replace(w)
            continue
          w.job, w.since = index, time.monotonic()
      busy = [w for w in self.workers if w.job is not None]
      if not busy:
        if not pending:
          return
        continue
      waits = {}
      for w in busy:
        waits[w.conn] = w
        waits[w.proc.sentinel] = w
      ready = multiprocessing.connection.wait(list(waits), timeout=1.0)
      for w in {id(waits[o]): waits[o] for o in ready}.values():
        index = w.job
        result = None
        if w.conn.poll():
          try:
            got, result = w.conn.recv()
            if got != index:
              result = None
          except (EOFError, OSError):
            result = None
        if result is not None:
          w.job = None
          yield index, result[0], result[1]
        elif not w.proc.is_alive():
          path = w.current_file()
          code = w.proc.exitcode
          self._replace(w)
          yield index, "crash", (
              f"worker process died ({_signal_name(code)}) while "
              f"{'decoding ' + path if path else 'loading this stack'}: a crash in a "
              "native pixel decoder, or the out-of-memory killer")
      now = time.monotonic()
      for w in list(self.workers):
        if w.job is None:
          continue
        last = w.slot_time.value   # 0 until the worker has picked the job up
        limit = self.file_timeout_s if last else max(120.0, 10 * self.file_timeout_s)
        if now - (last or w.since) > limit:
          index, path = w.job, w.current_file()
          self._replace(w)
          what = f"reading/decoding {path}" if path else "loading this stack"
          yield index, "timeout", (f"{what} took longer than {self.file_timeout_s:g} s "
                                   "(a hung pixel decoder or a stalled read); skipped")

  def _replace(self, w: _Worker) -> None:
    self._retire(w, kill=True)
    self.workers.append(self._start())

  def close(self, kill: bool = False) -> None:
    for w in list(self.workers):
      if not kill:
        try:
          w.conn.send(None)
        except (BrokenPipeError, OSError):
          pass
      self._retire(w, kill=kill)

  def __enter__(self) -> "Supervisor":
    return self

  def __exit__(self, *exc) -> None:
    self.close(kill=exc[0] is not None)


def map_isolated(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int = 1, *,
                 file_timeout_s: float = DEFAULT_FILE_TIMEOUT_S, ordered: bool = False,
                 env: dict | None = None) -> Iterator[tuple[int, str, Any]]:
  """``fn`` over ``jobs`` with native decoding isolated; yields ``(index, kind,
  value)`` as ``Supervisor.map`` (in job order with ``ordered``).

  ``workers > 1``: a ``Supervisor`` pool. ``workers <= 1``: in this process
  inside ``inline_until_native()``; a job that reaches a native decoder is
  rerun at once in one long-lived worker (started on first need), so the
  order is kept and uncompressed data never pays for a process.
  """
  if not jobs:
    return
  if workers > 1 and len(jobs) > 1:
    with Supervisor(fn, min(workers, len(jobs)), file_timeout_s=file_timeout_s,
                    env=env) as sup:
      if not ordered:
        yield from sup.map(jobs)
        return
      buffered: dict[int, tuple[str, Any]] = {}
      following = 0
      for index, kind, value in sup.map(jobs):
        buffered[index] = (kind, value)
        while following in buffered:
          yield (following,) + buffered.pop(following)
          following += 1
    return
  sup = None
  try:
    for index, job in enumerate(jobs):
      try:
        with inline_until_native(), read_deadline(file_timeout_s):
          out = fn(job)
        yield index, "ok", out
        continue
      except NeedsIsolation:
        pass
      except ReadStalled as e:
        yield index, "timeout", str(e)
        continue
      if sup is None:
        sup = Supervisor(fn, 1, file_timeout_s=file_timeout_s, env=env)
      for _, kind, value in sup.map([job]):
        yield index, kind, value
  finally:
    if sup is not None:
      sup.close()
