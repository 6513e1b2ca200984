"""Multi-process training on one machine (2 JAX CPU processes, gloo collectives).

The 2-process run goes through ``run.py`` (flags -> ``radnet_jax.training.distributed``
-> ``radnet_jax.tasks.pretrain``), each process with 2 simulated CPU devices. The
reference is one process with 4 devices fed the *same global batches* (each
global batch = process 0's rows + process 1's rows, built with the real
``input_pipeline.train_dataset`` for each process index), so the per-step
training losses and the final parameters must agree up to float summation
order. The 2-process checkpoint is then restored in this single process.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from radnet_jax.training import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
SHAPE = (10, 20, 20)


# ------------------------------------------------------------- pure checks --
def test_resolve_single_explicit_and_env():
  assert distributed.resolve(environ={}, tpu_present=False).mode == "single"
  p = distributed.resolve("10.0.0.1:1234", 4, 3, "0,1", environ={})
  assert (p.mode, p.coordinator_address, p.num_processes, p.process_id,
          p.local_device_ids) == ("explicit", "10.0.0.1:1234", 4, 3, (0, 1))
  env = {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "2",
         "JAX_PROCESS_ID": "1"}
  p = distributed.resolve(environ=env)
  assert (p.mode, p.source, p.process_id) == ("explicit", "env", 1)
  # Flags win over the environment.
  assert distributed.resolve("a:1", 3, 0, environ=env).num_processes == 3
  assert distributed.resolve(num_processes=1, environ={}).mode == "single"


def test_resolve_clusters():
  slurm = {"SLURM_NTASKS": "16", "SLURM_PROCID": "3"}
  assert distributed.resolve(environ=slurm, tpu_present=False).mode == "auto"
  # A one-task Slurm job keeps all its GPUs in one process.
  one = {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}
  assert distributed.resolve(environ=one, tpu_present=False).mode == "single"
  assert distributed.resolve(environ={"OMPI_COMM_WORLD_SIZE": "4"},
                             tpu_present=False).source.startswith("open mpi")
  assert distributed.resolve(environ={}, tpu_present=True).source == "cloud tpu"


@pytest.mark.parametrize("kwargs, match", [
    (dict(coordinator_address="a:1"), "num_processes, process_id missing"),
    (dict(coordinator_address="a:1", num_processes=2, process_id=2), r"\[0, 2\)"),
    (dict(coordinator_address="nohostport", num_processes=2, process_id=0),
     "host:port"),
    (dict(coordinator_address="a:1", num_processes=0, process_id=0), ">= 1"),
])
def test_resolve_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    distributed.resolve(environ={}, **kwargs)
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer"):
    distributed.resolve(environ={"JAX_NUM_PROCESSES": "two"})


def test_batch_arithmetic():
  assert distributed.check_batch(64, device_count=32, process_count=8,
                                 local_device_count=4) == 8
  with pytest.raises(ValueError, match="not divisible by the device count 32.*32 or 64"):
    distributed.check_batch(48, device_count=32, process_count=8, local_device_count=4)
  with pytest.raises(ValueError, match="e.g. 32"):
    distributed.check_batch(8, device_count=32, process_count=8, local_device_count=4)
  with pytest.raises(ValueError, match="same number of devices"):
    distributed.check_batch(8, device_count=8, process_count=2, local_device_count=3)


def test_single_process_helpers():
  # In one process: main process, barrier and equality checks are no-ops.
  assert distributed.is_main_process()
  distributed.barrier("noop")
  distributed.assert_same_on_all_processes({"a": 1}, "config")
  assert not distributed.is_initialized()


# ------------------------------------------------------------ 2 processes --
def _write_shards(out_dir: str, n: int = 40) -> None:
  """Train-only shards (no val/test: the run skips evaluation)."""
  from array_record.python import array_record_module as arm
  from radnet_jax.shards import records
  os.makedirs(out_dir, exist_ok=True)
  rng = np.random.default_rng(0)
  w = arm.ArrayRecordWriter(os.path.join(out_dir, "train-00000-of-00001.array_record"),
                            "group_size:1")
  for i in range(n):
    seq, plane = i % 5, (i // 5) % 3
    vol = rng.normal(0, 0.2, SHAPE).astype(np.float32) + 0.3 * (seq - 2)
    cov = np.zeros(9, np.float32)
    cov[i % 9] = 1
    w.write(records.encode({
        "kind": "pretrain", "volume": vol.astype(np.float16), "coverage": cov,
        "targets": {"sequence": seq, "plane": plane, "contrast": i % 2,
                    "coverage_mask": 1, "spacing": 1.0 + i % 3},
        "split": "train", "series": f"{i:016x}"}))
  w.close()


_OVERRIDES = [f"--config.num_steps={STEPS}", "--config.checkpoint_every=100",
              "--config.log_every=1", "--config.data.threads=1",
              "--config.augment.enabled=False", "--config.tensorboard=False",
              "--config.keep_checkpoints=1"]

_REFERENCE = textwrap.dedent("""
    # One process, 4 devices, fed the global batches of a 2-process run.
    import json, sys
    import numpy as np
    from absl import app, flags
    from radnet_jax.data import pretrain as input_pipeline
    NPROC = 2
    _orig = input_pipeline.train_dataset

    class _Zip:
      def __init__(self, its):
        self.its = its
      def __iter__(self):
        return self
      def __next__(self):
        parts = [next(i) for i in self.its]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      def get_state(self):
        return json.dumps([i.get_state() for i in self.its]).encode()
      def set_state(self, state):
        for i, s in zip(self.its, json.loads(state)):
          i.set_state(s)

    class _Merged:
      def __init__(self, dss):
        self.dss = dss
      def __iter__(self):
        return _Zip([iter(d) for d in self.dss])

    def train_dataset(paths, *, batch_size, process_index=0, process_count=1, **kw):
      assert process_count == 1, process_count
      return _Merged([_orig(paths, batch_size=batch_size // NPROC, process_index=i,
                            process_count=NPROC, **kw) for i in range(NPROC)])

    input_pipeline.train_dataset = train_dataset
    sys.argv[0] = "run.py"
    import run
    app.run(run.main)
""")


def _env(devices: int) -> dict:
  env = dict(os.environ)
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  # Cheap XLA:CPU compiles (the same flags for both runs, so numerics agree):
  # compiling the tiny ResNet drops from about a minute to seconds.
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                      "--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["OMP_NUM_THREADS"] = "1"
  return env


def _losses(workdir: str) -> dict[int, float]:
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      for k in ("train/loss", "loss"):
        if k in row:
          out[int(row["step"])] = float(row[k])
  return out


def _run_both(tmp) -> dict:
  shards = str(tmp / "shards")
  _write_shards(shards)
  common = ["--config=experiments/pretrain.py:tiny",
            f"--config.data.shards_dir={shards}"] + _OVERRIDES
  multi = str(tmp / "multi")
  res = distributed.launch_local(
      [sys.executable, os.path.join(ROOT, "run.py"), f"--workdir={multi}"] + common,
      2, env=_env(2), timeout=420, cwd=ROOT)
  assert res.ok, "2-process run failed:\n" + res.report()
  ref = str(tmp / "ref")
  script = tmp / "reference.py"
  script.write_text(_REFERENCE)
  try:
    proc = subprocess.run([sys.executable, str(script), f"--workdir={ref}"] + common,
                          env=_env(4), cwd=ROOT, capture_output=True, text=True,
                          timeout=420)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"reference run timed out:\n{(e.stdout or '')[-3000:]}")
  assert proc.returncode == 0, ("reference run failed:\n" + proc.stdout[-3000:]
                                + proc.stderr[-4000:])
  return {"multi": multi, "ref": ref, "logs": res.logs}


def test_two_processes_match_one_and_restore_in_one(tmp_path):
  # One test (not a shared fixture): under pytest-xdist a module fixture would
  # run once per worker, doubling the most expensive test of the module.
  runs = _run_both(tmp_path)
  _check_losses(runs)
  _check_restore(runs)


def _check_losses(runs):
  multi, ref = _losses(runs["multi"]), _losses(runs["ref"])
  assert sorted(multi) == list(range(1, STEPS + 1)), multi
  assert sorted(ref) == sorted(multi)
  for step in multi:
    np.testing.assert_allclose(multi[step], ref[step], rtol=2e-4, atol=1e-5,
                               err_msg=f"loss at step {step}")
  # Both processes joined one 4-device job (gloo), and each saved its own
  # data-iterator state beside the shared model state.
  assert "2 process(es)" in runs["logs"][0] or "process 0 of 2" in runs["logs"][0]
  data_dir = os.path.join(runs["multi"], "checkpoints", str(STEPS), "data")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_dir))
  # Only process 0 writes the run's side outputs.
  assert os.path.exists(os.path.join(runs["multi"], "config.json"))


def _check_restore(runs):
  import jax
  from radnet_jax.training import checkpoints
  multi, ref = checkpoints.restore(runs["multi"], "latest"), checkpoints.restore(runs["ref"], "latest")
  params, stats, config, step = multi.params, multi.batch_stats, multi.config, multi.step
  ref_params, ref_stats, ref_step = ref.params, ref.batch_stats, ref.step
  assert step == ref_step == STEPS
  assert config is not None and config["num_steps"] == STEPS
  leaves = jax.tree.leaves(params)
  assert leaves and all(isinstance(x, np.ndarray) for x in leaves)
  # Same data and steps: the parameters agree. Adam turns float-order noise in
  # a near-zero gradient into up to a full step (lr = 3e-3) on an isolated
  # weight, so the bound is on the mean difference (a different global batch
  # moves the mean by ~1e-3), plus Adam's maximum drift per weight.
  a = np.concatenate([x.ravel() for x in leaves])
  b = np.concatenate([x.ravel() for x in jax.tree.leaves(ref_params)])
  assert a.shape == b.shape
  diff = np.abs(a - b)
  assert diff.mean() < 2e-5, diff.mean()
  assert diff.max() <= 2 * 3e-3 * STEPS, diff.max()
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
