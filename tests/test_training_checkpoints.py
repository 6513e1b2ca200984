"""Damaged checkpoints: resume and restore fall back to the newest readable step.

Each corruption a crash or a bad disk leaves (a truncated array data file, a
missing ``_METADATA``, a missing OCDBT manifest) is written on disk into the
newest step of a real workdir; restore and resume must name that step and
the reason, fall back to the next older step, and stop only when none reads.
"""
import glob
import json
import logging
import os
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest

from radnet_jax.training import checkpoints
from radnet_jax.training import trainer
from tests import synthetic_shards as ss

SHAPE = (8, 16, 16, 1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(mesh, seed=0):
  model = ss.TinyCNN(heads={"plane": 3, "spacing": 1})
  tx, _ = trainer.make_optimizer({"name": "adamw", "lr": 0.1}, 10)
  return trainer.create_train_state(model, tx, SHAPE, seed, mesh)


def _iter():
  return iter(grain.MapDataset.range(100).to_iter_dataset())


def _bump(state, k):
  """A state that differs from ``state`` in every parameter (step k)."""
  return state.replace(step=state.step * 0 + k,
                       params=jax.tree.map(lambda x: x + k, state.params))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A workdir with training checkpoints at steps 2 and 4 (iterator at 2 and
  4 items) and best = step 4; returns (workdir, {step: params})."""
  wd = str(tmp_path_factory.mktemp("run"))
  mesh = trainer.make_mesh(1)
  base = _state(mesh)
  ck = checkpoints.Checkpointer(wd, keep=3, best_metric="val/acc")
  it = _iter()
  saved = {}
  for k in (2, 4):
    next(it), next(it)
    st = _bump(base, k)
    ck.save(k, st, it)
    saved[k] = jax.device_get(st.params)
  assert ck.maybe_save_best(4, _bump(base, 4), {"val/acc": 0.9})
  ck.close()
  checkpoints.save_config(wd, {"model": {"name": "tiny"}})
  return wd, saved


def _copy(src, dst):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(src, dst)
  return str(dst)


def _truncate_data(state_dir):
  """Halves every array data file (what a crash during a copy leaves)."""
  files = glob.glob(os.path.join(state_dir, "ocdbt.process_*", "d", "*"))
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)


def _remove(path):
  assert os.path.exists(path), path
  os.remove(path)


CORRUPTIONS = {
    "truncated": (_truncate_data, "data file is truncated"),
    "no_metadata": (lambda d: _remove(os.path.join(d, "_METADATA")), "_METADATA is missing"),
    "no_manifest": (lambda d: _remove(os.path.join(d, "manifest.ocdbt")),
                    "manifest.ocdbt is missing"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_restore_and_resume_fall_back_to_the_older_step(run, tmp_path, kind, caplog):
  src, saved = run
  wd = _copy(src, tmp_path / "wd")
  corrupt, reason = CORRUPTIONS[kind]
  corrupt(os.path.join(wd, "checkpoints", "4", "state"))

  # Portable restore (radnet_jax.load, the transfer, init_from).
  caplog.set_level(logging.WARNING, logger="radnet_jax")
  r = checkpoints.restore(wd, prefer="latest")
  assert r.step == 2 and r.path == os.path.join(wd, "checkpoints", "2", "state")
  (skipped,) = r.skipped
  assert os.path.join(wd, "checkpoints", "4") in skipped and reason in skipped
  np.testing.assert_array_equal(r.params["head_plane"]["kernel"],
                                saved[2]["head_plane"]["kernel"])
  assert any("step 4" in m and reason in m for m in caplog.messages), caplog.messages

  # A step folder given explicitly does not fall back; step=4 may only use
  # the other copy of step 4 (best/4).
  with pytest.raises(checkpoints.UnreadableCheckpoint, match=reason):
    checkpoints.restore(os.path.join(wd, "checkpoints", "4"))
  r4 = checkpoints.restore(wd, prefer="latest", step=4)
  assert r4.step == 4 and r4.path == os.path.join(wd, "best", "4", "state")

  # Exact resume: state and data iterator of step 2; the unreadable step is
  # set aside, so the run can save step 4 again.
  ck = checkpoints.Checkpointer(wd, keep=3, best_metric="val/acc")
  it = _iter()
  state = ck.restore(_state(trainer.make_mesh(2), seed=1), it)
  assert int(state.step) == 2 and next(it) == 2
  np.testing.assert_array_equal(np.asarray(state.params["head_plane"]["kernel"]),
                                saved[2]["head_plane"]["kernel"])
  assert os.path.isdir(os.path.join(wd, "checkpoints", "4.unreadable"))
  assert ck.latest_step() == 2
  ck.save(4, state, it)
  assert ck.latest_step() == 4
  ck.close()


def test_unreadable_best_falls_back_to_latest(run, tmp_path):
  src, saved = run
  wd = _copy(src, tmp_path / "wd")
  _truncate_data(os.path.join(wd, "best", "4", "state"))
  r = checkpoints.restore(wd)  # prefer="best"
  assert r.step == 4 and r.path == os.path.join(wd, "checkpoints", "4", "state")
  assert len(r.skipped) == 1 and os.path.join(wd, "best", "4") in r.skipped[0]
  np.testing.assert_array_equal(r.params["Conv_0"]["kernel"], saved[4]["Conv_0"]["kernel"])
  ck = checkpoints.Checkpointer(wd, keep=3, best_metric="val/acc")
  state, step = ck.restore_best(_state(trainer.make_mesh(1)))
  assert step == 4 and int(state.step) == 4
  ck.close()
  # In a plain process (no pytest hooks): one warning line, no traceback spam
  # from Orbax's closed event loop or its abandoned read coroutines.
  proc = subprocess.run(
      [sys.executable, "-c", "from radnet_jax.training import checkpoints; "
       f"print(checkpoints.restore({str(tmp_path / 'wd')!r}).step)"],
      capture_output=True, text=True, timeout=300, cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
  assert proc.returncode == 0 and proc.stdout.split() == ["4"], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, \
      proc.stderr[-3000:]


def test_restore_from_a_relative_path(run, monkeypatch):
  # The README's Colab line: radnet_jax.load("workdirs/pretrain") from the
  # project root.
  src, saved = run
  monkeypatch.chdir(os.path.dirname(src))
  for rel in (os.path.basename(src), os.path.join(os.path.basename(src), "best", "4")):
    r = checkpoints.restore(rel)
    assert r.step == 4 and not r.skipped, r.skipped
    np.testing.assert_array_equal(r.params["Conv_0"]["kernel"], saved[4]["Conv_0"]["kernel"])


def test_orbax_paths_are_absolute_and_urls_unchanged(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  assert checkpoints._orbax_path("runs/a") == os.path.join(str(tmp_path), "runs", "a")
  assert checkpoints._orbax_path("gs://bucket/runs/paper/checkpoints") == \
      "gs://bucket/runs/paper/checkpoints"


def test_no_readable_step_lists_every_reason(run, tmp_path):
  src, _ = run
  wd = _copy(src, tmp_path / "wd")
  _truncate_data(os.path.join(wd, "checkpoints", "4", "state"))
  _remove(os.path.join(wd, "checkpoints", "2", "state", "_METADATA"))
  _remove(os.path.join(wd, "best", "4", "state", "manifest.ocdbt"))
  with pytest.raises(checkpoints.UnreadableCheckpoint) as e:
    checkpoints.restore(wd)
  lines = str(e.value).splitlines()
  for d, why in (("best/4", "state/manifest.ocdbt is missing"),
                 ("checkpoints/4", "a data file is truncated"),
                 ("checkpoints/2", "state/_METADATA is missing")):
    assert any(l.strip().startswith(f"{os.path.join(wd, *d.split('/'))}: {why}")
               for l in lines), lines
  ck = checkpoints.Checkpointer(wd)
  with pytest.raises(checkpoints.UnreadableCheckpoint, match="no checkpoint restores"):
    ck.restore(_state(trainer.make_mesh(1)), _iter())
  ck.close()
  assert json.load(open(os.path.join(wd, "config.json"))) == {"model": {"name": "tiny"}}
