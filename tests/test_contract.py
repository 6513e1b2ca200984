"""radnet_jax.contract: training writes the preprocessing contract, inference reads it.

A tiny real pretraining run on shards built at another shape than its config
says (the paper config's situation) predicts the same after its shards
folder is deleted; a workdir from before contracts derives one, with a
warning.
"""
import json
import logging
import os
import shutil

import ml_collections
import nibabel as nib
import numpy as np
import pytest

import radnet_jax
from experiments import pretrain
from radnet_jax import contract
from radnet_jax.shards import records
from radnet_jax.tasks import pretrain as train
from tests import synthetic_shards as ss

SHARDS_SHAPE = (10, 20, 20)     # what the shards hold
CONFIG_SHAPE = (12, 24, 24)     # what config.data.shard_shape claims


def _shards(root: str) -> str:
  out = ss.write_shards(root, counts={"train": 16, "val": 4, "test": 4}, shape=SHARDS_SHAPE)
  manifest = {"kind": "pretrain", "taxonomy": "paper", "shape": list(SHARDS_SHAPE),
              "normalisation": {"CT": "ct_window(-1000,1000)->[-1,1]",
                                "other": "pct(0.5,99.5)->[0,1]"}}
  with open(os.path.join(out, records.MANIFEST), "w") as f:
    json.dump(manifest, f)
  return out


def _config(shards_dir: str) -> ml_collections.ConfigDict:
  c = pretrain.get_config("tiny")
  c.data.shards_dir = shards_dir
  c.data.shard_shape = CONFIG_SHAPE
  c.model.name = "tests.synthetic_shards:TinyCNN"
  c.model.kwargs = ml_collections.ConfigDict()
  c.num_steps = 2
  c.num_devices = 1
  return c


def _ct_nifti(path: str) -> str:
  rng = np.random.default_rng(3)
  hu = rng.normal(0, 300, (30, 26, 14)).astype(np.float32)
  hu[8:20, 6:18, 4:10] += 400.0
  nib.save(nib.Nifti1Image(hu, np.diag([0.9, 0.9, 2.5, 1.0])), path)
  return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("contract")
  shards = _shards(str(root / "shards"))
  wd = str(root / "run")
  train.train_and_evaluate(_config(shards), wd)
  return wd, shards, _ct_nifti(str(root / "ct.nii.gz"))


def test_training_writes_the_contract(run):
  wd, _, _ = run
  c = contract.read(wd)
  assert c is not None and c.task == "pretrain" and c.origin == "training"
  assert c.shard_shape == SHARDS_SHAPE and c.input_shape == (8, 16, 16)
  assert c.intensity["CT"].spec == "ct_window(-1000,1000)->[-1,1]"
  assert c.intensity["other"].spec == "pct(0.5,99.5)->[0,1]"
  assert c.orientation == "plane" and c.taxonomy == "paper"
  assert c.classes["plane"] == ["AX", "COR", "SAG"]
  assert contract.Contract.from_dict(c.to_dict()) == c


def test_predictions_identical_without_the_shards_folder(run, tmp_path):
  wd, shards, nii = run
  before = radnet_jax.load(wd)
  assert before.shard_shape == SHARDS_SHAPE       # the shards', not the config's
  rows = radnet_jax.predict(before, nii, salt="s", modality="CT").rows
  moved = str(tmp_path / "shards-moved")
  shutil.move(shards, moved)                      # the checkpoint alone, e.g. on Colab
  try:
    after = radnet_jax.load(wd)
    assert after.shard_shape == SHARDS_SHAPE
    again = radnet_jax.predict(after, nii, salt="s", modality="CT").rows
    probs = [k for k in rows[0] if k.startswith("p_")]
    assert len(rows) == len(again) == 1 and len(probs) > 10
    for k in probs:
      assert again[0][k] == rows[0][k], k
    # The config's shard shape would have given other inputs (the old fallback).
    vol = radnet_jax.api.load_nifti(nii, "CT")
    x_contract, _ = radnet_jax.api.preprocess(vol, after.shard_shape, after.input_shape)
    x_config, _ = radnet_jax.api.preprocess(vol, CONFIG_SHAPE, after.input_shape)
    assert not np.allclose(x_contract, x_config)
  finally:
    shutil.move(moved, shards)


def test_old_workdir_derives_the_contract_with_a_warning(run, tmp_path, caplog):
  wd, shards, _ = run
  old = str(tmp_path / "old")
  shutil.copytree(wd, old)
  os.remove(os.path.join(old, contract.CONTRACT_FILE))
  with caplog.at_level(logging.WARNING, logger="radnet_jax"):
    loaded = radnet_jax.load(old)
  assert "no contract.json" in caplog.text
  assert loaded.contract.origin.startswith("derived") and loaded.shard_shape == SHARDS_SHAPE
  # The transfer reads a source's contract the same way (from config.json).
  from radnet_jax.training import transfer
  assert transfer.source_contract(old).shard_shape == SHARDS_SHAPE
  assert transfer.source_contract(wd) == contract.read(wd)
  # Shards gone too: only the config is left to say it.
  moved = str(tmp_path / "gone")
  shutil.move(shards, moved)
  try:
    assert radnet_jax.load(old).shard_shape == CONFIG_SHAPE
  finally:
    shutil.move(moved, shards)


def test_contract_is_the_task_not_a_parameter_count(run):
  wd, _, nii = run
  loaded = radnet_jax.load(wd)
  assert loaded.task == "pretrain"
  seg = contract.Contract.from_dict(dict(loaded.contract.to_dict(), task="segment"))
  with pytest.raises(ValueError, match="a segment network"):
    radnet_jax.api.predict(radnet_jax.api.Loaded(**{**loaded.__dict__, "contract": seg}),
                           nii)


def test_resumed_run_refuses_a_changed_contract(run, tmp_path):
  wd, _, _ = run
  c = contract.read(wd)
  changed = contract.Contract.from_dict(dict(c.to_dict(), input_shape=[4, 8, 8]))
  with pytest.raises(ValueError, match="differs from the contract"):
    contract.write(wd, changed)
  contract.write(wd, c)   # the same contract again (a resume) is fine
