"""Multi-process (multi-host) set-up: ``jax.distributed`` from flags or env.

One training process runs per host (TPU VM worker, GPU node) or per GPU; all
processes run the same program on their share of the data and meet in the
jit-compiled step. This module decides *whether* and *how* to call
``jax.distributed.initialize`` and checks the batch arithmetic, so that
``run.py`` and the tasks stay free of cluster details.

How the processes are described, by priority:

1. explicit arguments / absl flags (``--coordinator_address``,
   ``--num_processes``, ``--process_id``): GPU clusters without a scheduler,
   and CPU multi-process tests (gloo collectives on 127.0.0.1);
2. environment: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
   ``JAX_PROCESS_ID`` (and ``JAX_LOCAL_DEVICE_IDS``), which ``launch_local``
   and the docs' ``torchrun``-style scripts set;
3. auto-detection by JAX of a Cloud TPU slice (any host count), a Slurm or
   Open MPI job with more than one task;
4. otherwise a single process: nothing is initialised.

Must run before anything touches a JAX backend (``jax.devices()``, any
computation); ``initialize`` raises a clear error otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import flags
from absl import logging as absl_logging
from jax.experimental import multihost_utils

from radnet_jax.cli import flags as cli_flags  # one flag spelling (absl owns `flags`)

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins the job (the output of ``resolve``).

  mode: "single" (no initialisation), "explicit" (coordinator, count and id
    all known) or "auto" (JAX detects a TPU slice / Slurm / Open MPI job).
  source: where the decision came from, for the start-up log line.
  """
  mode: str
  source: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None


def _int_or_none(value: Any, name: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _ids(value: Any) -> tuple[int, ...] | None:
  if value is None or value == "" or value == []:
    return None
  if isinstance(value, str):
    value = [v for v in value.split(",") if v.strip()]
  try:
    return tuple(int(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(
        f"local_device_ids must be comma-separated integers, got {value!r}"
    ) from None


def _tpu_present() -> bool:
  """A Cloud TPU VM: libtpu installed and TPU chips visible (cheap, no RPC)."""
  if importlib.util.find_spec("libtpu") is None:
    return False
  return any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0"))


def resolve(coordinator_address: str | None = None,
            num_processes: int | None = None,
            process_id: int | None = None,
            local_device_ids: Sequence[int] | str | None = None,
            *, environ: Mapping[str, str] | None = None,
            tpu_present: bool | None = None) -> Plan:
  """Decides how this process joins the job; pure (no JAX calls).

  Arguments win over the environment. Raises ValueError when the description
  is incomplete or inconsistent (e.g. a coordinator without a process count,
  ``process_id >= num_processes``), naming what is missing.
  """
  env = os.environ if environ is None else environ
  source = "flags"
  if coordinator_address is None and num_processes is None and process_id is None:
    coordinator_address = env.get(ENV_COORDINATOR) or None
    num_processes = _int_or_none(env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
    process_id = _int_or_none(env.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
    source = "env"
  ids = _ids(local_device_ids if local_device_ids is not None
             else env.get(ENV_LOCAL_DEVICE_IDS))
  given = {"coordinator_address": coordinator_address,
           "num_processes": num_processes, "process_id": process_id}
  if any(v is not None for v in given.values()):
    if num_processes == 1 and coordinator_address is None:
      return Plan("single", f"{source}: num_processes=1")
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise ValueError(
          f"multi-process set-up from {source} is incomplete: {', '.join(missing)} "
          f"missing (give all of coordinator_address, num_processes, process_id; "
          f"env: {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
    if num_processes < 1:
      raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if ":" not in coordinator_address:
      raise ValueError(f"coordinator_address must be host:port, got "
                       f"{coordinator_address!r}")
    return Plan("explicit", source, coordinator_address, num_processes,
                process_id, ids)
  # Schedulers: only a job with several tasks is multi-process (a one-task
  # Slurm job on an 8-GPU node must keep all 8 GPUs in one process, whereas
  # JAX's Slurm detection would give it one GPU).
  slurm_tasks = _int_or_none(env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS"),
                             "SLURM_NTASKS")
  if slurm_tasks and slurm_tasks > 1 and "SLURM_PROCID" in env:
    return Plan("auto", f"slurm ({slurm_tasks} tasks)", local_device_ids=ids)
  ompi = _int_or_none(env.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE")
  if ompi and ompi > 1:
    return Plan("auto", f"open mpi ({ompi} ranks)", local_device_ids=ids)
  if tpu_present is None:
    tpu_present = _tpu_present()
  if tpu_present:
    return Plan("auto", "cloud tpu", local_device_ids=ids)
  return Plan("single", "no cluster detected")


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: Sequence[int] | str | None = None,
               *, initialization_timeout: int = 300,
               cpu_collectives: str = "gloo") -> Plan:
  """Initialises ``jax.distributed`` when this is a multi-process job.

  Call first thing in ``main`` (before any JAX computation or
  ``jax.devices()``). Idempotent: a second call returns the plan without
  re-initialising. On CPU, cross-process collectives use ``cpu_collectives``
  (gloo by default; "mpi" needs an MPI build). Returns the ``Plan`` taken.

  An auto-detected TPU VM that turns out to be a single host (or whose
  metadata cannot be read) falls back to one process with a warning, so the
  same command runs on a v5e-8 and on a v5e-256 slice.
  """
  plan = resolve(coordinator_address, num_processes, process_id,
                 local_device_ids)
  if is_initialized():
    return plan
  if plan.mode == "single":
    return plan
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  ids = list(plan.local_device_ids) if plan.local_device_ids else None
  try:
    if plan.mode == "explicit":
      jax.distributed.initialize(
          coordinator_address=plan.coordinator_address,
          num_processes=plan.num_processes, process_id=plan.process_id,
          local_device_ids=ids, cluster_detection_method="deactivate",
          initialization_timeout=initialization_timeout)
    else:
      jax.distributed.initialize(local_device_ids=ids,
                                 initialization_timeout=initialization_timeout)
  except RuntimeError as e:
    if "must be called before" in str(e):
      raise RuntimeError(
          "radnet_jax.training.distributed.initialize() ran after JAX was already used "
          "(jax.devices(), an array, a jit call ...); call it first in main()"
      ) from e
    raise
  except ValueError as e:
    if plan.mode != "auto":
      raise
    log.warning("cluster auto-detection (%s) failed (%s); running as a single "
                "process", plan.source, e)
    return Plan("single", f"{plan.source}: detection failed")
  log.info("jax.distributed: process %d of %d (%s), %d local / %d global devices",
           jax.process_index(), jax.process_count(), plan.source,
           jax.local_device_count(), jax.device_count())
  return plan


def is_initialized() -> bool:
  """True once ``jax.distributed.initialize`` has run in this process."""
  return jax.distributed.is_initialized()


def shutdown() -> None:
  """Leaves the job cleanly (no-op for a single process)."""
  if is_initialized():
    jax.distributed.shutdown()


def is_main_process() -> bool:
  """Process 0 writes logs, reports, TensorBoard events and config copies.

  Every process must still take part in Orbax saves and restores (they are
  collective); only side outputs are restricted to the main process.
  """
  return jax.process_index() == 0


def configure_logging(level: int = logging.INFO) -> None:
  """Quiets non-main processes: they log warnings and errors only.

  Keeps a 64-host job's log readable while still surfacing a failure on any
  host. Works for both ``logging`` and absl logging.
  """
  quiet = not is_main_process()
  logging.getLogger().setLevel(logging.WARNING if quiet else level)
  absl_logging.set_verbosity(absl_logging.WARNING if quiet else absl_logging.INFO)


def check_batch(global_batch: int, *, mesh: Any = None, device_count: int | None = None,
                process_count: int | None = None,
                local_device_count: int | None = None) -> int:
  """Checks the global batch against the devices; returns the per-process batch.

  The global batch is split evenly over all devices of the data mesh
  (``mesh``, else ``device_count``, else every device), and each process
  feeds the rows that belong to its local devices, so the global batch must
  be a multiple of the mesh's device count (hence of the process count).
  Raises ValueError with the numbers and the nearest valid batch sizes.
  """
  if mesh is not None:
    device_count = int(mesh.devices.size)
  device_count = jax.device_count() if device_count is None else device_count
  process_count = jax.process_count() if process_count is None else process_count
  if local_device_count is None:
    local_device_count = (jax.local_device_count()
                          if device_count == jax.device_count()
                          else device_count // process_count)
  if global_batch <= 0:
    raise ValueError(f"global batch size must be positive, got {global_batch}")
  if device_count % process_count or local_device_count * process_count != device_count:
    raise ValueError(
        f"{device_count} devices cannot be split evenly over {process_count} "
        f"processes with {local_device_count} local devices each; every host "
        f"must expose the same number of devices")
  if global_batch % device_count:
    lower = (global_batch // device_count) * device_count
    upper = lower + device_count
    hint = f"{upper}" if lower == 0 else f"{lower} or {upper}"
    raise ValueError(
        f"global batch size {global_batch} is not divisible by the device count "
        f"{device_count} ({process_count} process(es) x {local_device_count} "
        f"local devices); use e.g. {hint}")
  return global_batch // process_count


def barrier(name: str) -> None:
  """Waits until every process reaches ``name`` (no-op for one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def assert_same_on_all_processes(value: Any, what: str) -> None:
  """Fails fast when hosts disagree (config, data manifest, code version).

  ``value`` is hashed to an int on each host and compared across processes:
  a pod where one host read a stale config would otherwise train silently
  on inconsistent state.
  """
  if jax.process_count() == 1:
    return
  digest = hashlib.sha256(repr(value).encode()).digest()[:4]
  code = np.frombuffer(digest, dtype=np.int32).copy()
  multihost_utils.assert_equal(
      code, f"{what} differs between processes (process {jax.process_index()})")


# ---------------------------------------------------------------------------
# absl flags (run.py calls define_flags() at import and
# initialize_from_flags() first thing in main).
# ---------------------------------------------------------------------------

def define_flags(flag_values: Any = None) -> None:
  """Defines --coordinator_address, --num_processes, --process_id,
  --local_device_ids, --distributed_timeout (idempotent)."""
  fv = flags.FLAGS if flag_values is None else flag_values
  if "coordinator_address" in fv:
    return
  flags.DEFINE_string(
      "coordinator_address", None,
      "host:port of process 0 for a multi-process job (GPU cluster, CPU test); "
      "omit on Cloud TPU / Slurm / Open MPI, where it is detected",
      flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "total number of processes",
                       flag_values=fv)
  flags.DEFINE_integer("process_id", None, "this process's id in [0, n)",
                       flag_values=fv)
  flags.DEFINE_string("local_device_ids", None,
                      "comma-separated local accelerator ids this process uses",
                      flag_values=fv)
  flags.DEFINE_integer("distributed_timeout", 300,
                       "seconds to wait for all processes to join",
                       flag_values=fv)


def initialize_from_flags(flag_values: Any = None) -> Plan:
  """``initialize`` with the values of ``define_flags``'s flags."""
  fv = flags.FLAGS if flag_values is None else flag_values
  plan = initialize(fv.coordinator_address, fv.num_processes, fv.process_id,
                    fv.local_device_ids,
                    initialization_timeout=fv.distributed_timeout)
  configure_logging()
  return plan


# ---------------------------------------------------------------------------
# Local launcher: N processes on this machine (CPU tests, one process per GPU
# on a single node without a scheduler).
# ---------------------------------------------------------------------------

def free_port() -> int:
  """A TCP port free on 127.0.0.1 right now (for a local coordinator)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class LocalResult:
  returncodes: list[int]
  logs: list[str]

  @property
  def ok(self) -> bool:
    return all(rc == 0 for rc in self.returncodes)

  def report(self, tail: int = 4000) -> str:
    """All processes' return codes and the end of their logs."""
    parts = []
    for i, (rc, text) in enumerate(zip(self.returncodes, self.logs)):
      parts.append(f"--- process {i} (exit {rc}) ---\n{text[-tail:]}")
    return "\n".join(parts)


def launch_local(argv: Sequence[str], num_processes: int, *,
                 env: Mapping[str, str] | None = None,
                 devices_per_process: int | None = None,
                 gpus_per_process: int | None = None,
                 timeout: float = 600.0, cwd: str | None = None) -> LocalResult:
  """Runs ``argv`` as ``num_processes`` cooperating JAX processes here.

  Each child gets ``JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>``,
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, so a program that calls
  ``initialize()`` joins the job. ``devices_per_process`` simulates CPU
  devices (``--xla_force_host_platform_device_count``); ``gpus_per_process``
  gives child i GPUs ``[i*g, (i+1)*g)`` via ``CUDA_VISIBLE_DEVICES``.
  All children are killed at ``timeout`` seconds (return code -9 and the log
  says so); a failing child does not leave the others hanging.
  """
  port = free_port()
  base = dict(os.environ if env is None else env)
  procs, files = [], []
  for i in range(num_processes):
    child = dict(base)
    child[ENV_COORDINATOR] = f"127.0.0.1:{port}"
    child[ENV_NUM_PROCESSES] = str(num_processes)
    child[ENV_PROCESS_ID] = str(i)
    if devices_per_process:
      flags_ = child.get("XLA_FLAGS", "")
      flags_ = " ".join(f for f in flags_.split()
                        if "xla_force_host_platform_device_count" not in f)
      child["XLA_FLAGS"] = (flags_ + " --xla_force_host_platform_device_count="
                            f"{devices_per_process}").strip()
    if gpus_per_process:
      child["CUDA_VISIBLE_DEVICES"] = ",".join(
          str(g) for g in range(i * gpus_per_process, (i + 1) * gpus_per_process))
    f = tempfile.TemporaryFile(mode="w+")
    files.append(f)
    procs.append(subprocess.Popen(list(argv), env=child, cwd=cwd, stdout=f,
                                  stderr=subprocess.STDOUT))
  deadline = time.monotonic() + timeout
  timed_out = False
  while any(p.poll() is None for p in procs):
    if time.monotonic() > deadline:
      timed_out = True
      break
    if any(p.poll() not in (None, 0) for p in procs):
      # One process failed: the others would wait for it at the next
      # collective until the heartbeat timeout; give them a moment, then stop.
      grace = time.monotonic() + 20
      while any(p.poll() is None for p in procs) and time.monotonic() < grace:
        time.sleep(0.2)
      break
    time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  logs = []
  for f in files:
    f.seek(0)
    logs.append(f.read() + ("\n[killed: timeout]" if timed_out else ""))
    f.close()
  return LocalResult([p.returncode for p in procs], logs)


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m radnet_jax.training.distributed -n 2 [--cpu-devices 4] -- CMD ...``"""
  parser = cli_flags.Parser(
      description="Run a command as N cooperating JAX processes on this machine.")
  parser.add_argument("-n", "--num-processes", type=int, required=True)
  parser.add_argument("--cpu-devices", type=int, default=None,
                      help="simulated CPU devices per process")
  parser.add_argument("--gpus-per-process", type=int, default=None)
  parser.add_argument("--timeout", type=float, default=24 * 3600)
  parser.add_argument("command", nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not cmd:
    parser.error("no command given (put it after --)")
  res = launch_local(cmd, args.num_processes, devices_per_process=args.cpu_devices,
                     gpus_per_process=args.gpus_per_process, timeout=args.timeout)
  for i, text in enumerate(res.logs):
    sys.stdout.write(f"===== process {i} (exit {res.returncodes[i]}) =====\n{text}")
  return 0 if res.ok else 1


if __name__ == "__main__":
  sys.exit(main())
