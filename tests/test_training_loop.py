"""The fit loop: divergence never reaches a checkpoint or best, and a resume
(also from a damaged latest checkpoint) leaves metrics.jsonl without duplicates."""
import collections
import glob
import json
import os

import jax
import numpy as np
import pytest

import radnet_jax
from radnet_jax.tasks import pretrain as train
from radnet_jax.training import checkpoints
from radnet_jax.training import trainer
from tests import synthetic_shards as ss
from tests.test_train import tiny_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  return ss.write_shards(str(tmp_path_factory.mktemp("sh")))


def _rows(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def _losses(workdir):
  return {r["step"]: r["train/loss"] for r in _rows(workdir) if "train/loss" in r}


def test_diverged_run_keeps_the_last_healthy_checkpoint_and_best(shards, tmp_path):
  wd = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(shards, steps=4), wd)  # healthy: ckpts 2, 4
  best_before = checkpoints.Checkpointer(wd, best_metric="val/mean_accuracy").best_record()
  healthy = checkpoints.restore(wd, prefer="latest")
  assert healthy.step == 4 and best_before["step"] <= 4

  # The recipe: lr 1e6, evaluations and checkpoints between log steps.
  cfg = tiny_config(shards, steps=12)
  cfg.optim.lr = 1e6
  cfg.log_every = 8
  cfg.eval_every = 4
  cfg.checkpoint_every = 4
  with pytest.raises(FloatingPointError) as e:
    train.train_and_evaluate(cfg, wd)
  msg = str(e.value)
  assert "training diverged at step 8" in msg, msg
  assert "the last healthy log step was 5" in msg
  assert "the last checkpoint (step 4)" in msg and f"best stays step {best_before['step']}" in msg

  # Nothing after the last healthy log step was saved or promoted.
  ck = checkpoints.Checkpointer(wd, best_metric="val/mean_accuracy")
  assert ck.latest_step() == 4 and ck.best_record() == best_before
  ck.close()
  assert {int(os.path.basename(p)) for p in glob.glob(os.path.join(wd, "best", "[0-9]*"))} \
      == {best_before["step"]}
  # load (best by default) and latest both give the healthy, finite weights.
  for prefer in ("best", "latest"):
    net = radnet_jax.load(wd, prefer=prefer)
    assert net.step <= 4
    assert all(np.isfinite(np.asarray(x)).all() and np.abs(np.asarray(x)).max() < 1e3
               for x in jax.tree.leaves(net.variables))
  r = checkpoints.restore(wd, prefer="latest")
  for a, b in zip(jax.tree.leaves(r.params), jax.tree.leaves(healthy.params)):
    np.testing.assert_array_equal(a, b)


def test_resume_from_a_damaged_latest_checkpoint_without_duplicate_rows(
    shards, tmp_path, monkeypatch):
  cfg = tiny_config(shards, steps=6)
  wd = str(tmp_path / "run")
  real = trainer.make_train_step

  def killing_make_train_step(*a, **kw):
    step_fn, calls = real(*a, **kw), []

    def wrapped(state, batch):
      calls.append(1)
      if len(calls) == 6:  # killed in step 6: steps 1-5 logged, checkpoints 2 and 4
        raise KeyboardInterrupt("simulated preemption")
      return step_fn(state, batch)
    return wrapped

  monkeypatch.setattr(trainer, "make_train_step", killing_make_train_step)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(cfg, wd)
  monkeypatch.setattr(trainer, "make_train_step", real)
  first = _losses(wd)
  assert sorted(first) == [1, 2, 3, 4, 5]
  # The newest checkpoint loses half of every data file (a crash mid-copy).
  for f in glob.glob(os.path.join(wd, "checkpoints", "4", "state", "ocdbt.process_*", "d", "*")):
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)

  out = train.train_and_evaluate(cfg, wd)  # falls back to step 2 and redoes 3-6
  assert out["test"]["sequence"]["n"] == 10
  assert os.path.isdir(os.path.join(wd, "checkpoints", "4.unreadable"))
  rows = _rows(wd)
  keys = collections.Counter((r["step"], k) for r in rows for k in r if k != "step")
  assert max(keys.values()) == 1, [k for k, n in keys.items() if n > 1]
  again = _losses(wd)
  assert sorted(again) == [1, 2, 3, 4, 5, 6]
  # An exact resume from step 2: steps 3-5 repeat the first run's losses.
  for s in (3, 4, 5):
    assert again[s] == pytest.approx(first[s], rel=1e-6), s
  assert checkpoints.restore(wd, prefer="latest").step == 6
  # A finished run rerun in place: nothing to train, the final rows are redone, not doubled.
  train.train_and_evaluate(cfg, wd)
  keys = collections.Counter((r["step"], k) for r in _rows(wd) for k in r if k != "step")
  assert max(keys.values()) == 1
