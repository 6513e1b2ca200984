"""Segmentation task: loss, proposal logic, end-to-end run."""
import importlib.util
import json
import logging
import os

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from radnet_jax import contract
from radnet_jax.inference import segment as seg_inference
from radnet_jax.shards import seg as segdata
from radnet_jax.tasks import proposal
from radnet_jax.tasks import segment
from tests.test_inference_load import make_checkpoint
from tests.test_segdata import AFFINE_RAS, FILE_SHAPE, _write_lits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg):
  spec = importlib.util.spec_from_file_location(
      "transfer_liver_cfg", os.path.join(ROOT, "experiments", "transfer_liver.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_seg_loss_values():
  labels = jnp.zeros((1, 2, 2, 2), jnp.int32).at[0, 0].set(1)   # 4 of 8 liver
  perfect = jax.nn.one_hot(labels, 2) * 20.0
  loss, m = segment.seg_loss(perfect, labels, 2)
  assert float(m["dice"]) == 1.0 and float(m["soft_dice"]) > 0.999
  assert float(loss) < 1e-3
  flat = jnp.zeros((1, 2, 2, 2, 2))                           # p = 0.5 everywhere
  loss, m = segment.seg_loss(flat, labels, 2)
  # CE = log 2; soft Dice = 2*(4*0.5) / (8*0.5 + 4) = 0.5.
  np.testing.assert_allclose(float(m["ce"]), np.log(2), rtol=1e-5)
  np.testing.assert_allclose(float(m["soft_dice"]), 0.5, rtol=1e-4)
  np.testing.assert_allclose(float(loss), np.log(2) + 0.5, rtol=1e-4)


class _FixedScores(proposal.SlabProposer):

  def __init__(self, scores, **kw):
    super().__init__(model=None, variables=None, **kw)
    self.scores = np.asarray(scores, np.float32)

  def slice_scores(self, volume):
    return self.scores


def test_proposal_range_recall_and_discard():
  p = _FixedScores([0, 0, .2, .7, .9, .6, .1, 0, 0, 0], margin=1)
  z = p.propose(np.zeros((10, 4, 4)))
  assert z == (2, 7)
  mask = np.zeros((10, 4, 4), np.uint8)
  mask[2:8, 1, 1] = 1
  s = p.score_case(z, mask)
  assert s == {"liver_slices": 6, "liver_slices_kept": 5, "discarded_fraction": 0.5}
  # Nothing above the threshold: keep everything rather than drop the organ.
  assert _FixedScores(np.zeros(10)).propose(np.zeros((10, 4, 4))) == (0, 10)


@pytest.fixture
def rbg_prng():
  """Cheaper-to-compile PRNG for model init in this test (threefry init of a
  3D ResNet takes ~40 s of CPU to compile); restored afterwards."""
  old = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")
  yield
  jax.config.update("jax_default_prng_impl", old)


def test_train_and_evaluate_end_to_end(tmp_path, rbg_prng):
  lits = _write_lits(str(tmp_path / "lits"), n=4)
  pre = str(tmp_path / "pretrain")
  # A pretraining workdir as training writes it (config.json + contract.json):
  # ResNetTiny behind its learnable soft-tissue curve, on HU/1000 -> [-1, 1].
  pre_params = make_checkpoint(pre)
  c = _config("tiny,n=2")
  c.data.lits_dir = lits
  c.data.cache_dir = str(tmp_path / "cache")
  c.data.spacing = (2.5, 1.5, 1.5)
  c.model.kwargs.conv_impl = "xla"
  c.init_from = pre
  c.num_devices = 1
  workdir = str(tmp_path / "wd")
  res = segment.train_and_evaluate(c, workdir)

  saved = json.load(open(os.path.join(workdir, "results.json")))
  assert saved["n_train"] == 2 and len(saved["train_cases"]) == 2
  t = saved["test"]
  assert t["num_cases"] == 1 and 0.0 <= t["liver/dice_global"] <= 1.0
  assert 0.0 <= t["proposal/recall"] <= 1.0
  assert res["test"]["liver/dice_global"] == pytest.approx(t["liver/dice_global"])
  rep = json.load(open(os.path.join(workdir, "transfer_report.json")))
  n_trunk = len(jax.tree.leaves(pre_params["trunk"]))
  # The trunk and the input curve in front of it.
  assert sorted(n for n in rep["loaded"] if n.startswith("input_windows/")) == [
      "input_windows/bias", "input_windows/scale", "input_windows/window_scales"]
  assert len(rep["loaded"]) == n_trunk + 3 and not rep["mismatched"]
  # Bug 2: the trunk is fed the intensities it was pretrained on (its contract),
  # not the config's -200..250 HU window, and the backbone is the source's model.
  con = contract.read(workdir)
  assert con.task == "segment" and con.intensity["CT"].spec == "ct_window(-1000,1000)->[-1,1]"
  assert con.spacing_mm == (2.5, 1.5, 1.5) and con.input_shape == (16, 32, 32)
  assert con.labels == {"0": "background", "1": "liver"} and con.num_classes == 2
  cfg = json.load(open(os.path.join(workdir, "config.json")))
  assert cfg["model"]["backbone"] == "resnet_tiny"
  assert cfg["model"]["kwargs"]["input_windows"] == [[-0.16, 0.24]]
  (rec,) = segdata.load_records(saved["shards_dir"], "test")
  assert rec["normalisation"] == "ct_window(-1000,1000)->[-1,1]"
  # Liver voxels are 100 + case HU (tests/test_segdata._case): HU / 1000 now,
  # where the config's window would have given (100 + 200) / 450 = 0.67.
  liver = np.asarray(rec["volume"], np.float32)[rec["mask"] > 0]
  np.testing.assert_allclose(np.median(liver), (100 + int(rec["case"])) / 1000, atol=0.01)
  # Prediction written in the original geometry of the test case.
  (case,) = [k for k in t["cases"]]
  img = nib.load(os.path.join(workdir, "predictions", f"case-{case}.nii.gz"))
  assert img.shape == FILE_SHAPE
  np.testing.assert_allclose(img.affine, AFFINE_RAS, atol=1e-6)
  assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1}
  assert os.path.exists(os.path.join(workdir, "checkpoints"))
  # A new NIfTI segmented by the saved run lands on its own grid.
  out = seg_inference.predict_nifti(workdir, os.path.join(lits, "volume-1.nii.gz"),
                                    str(tmp_path / "pred-1.nii.gz"))
  img = nib.load(out)
  assert img.shape == FILE_SHAPE and img.get_data_dtype() == np.uint8
  np.testing.assert_allclose(img.affine, AFFINE_RAS, atol=1e-6)


def test_liver_and_tumour_classes_end_to_end(tmp_path):
  # num_classes=3: background / liver / tumour, from scratch; the evaluation
  # reports tumour next to liver and the saved masks use LiTS labels.
  lits = _write_lits(str(tmp_path / "lits"), n=3)
  c = _config("tiny,scratch")
  c.num_classes = 3
  c.data.lits_dir = lits
  c.data.cache_dir = str(tmp_path / "cache")
  c.data.spacing = (2.5, 1.5, 1.5)
  c.model.kwargs.conv_impl = "xla"
  c.proposal.enabled = False
  c.num_devices = 1
  workdir = str(tmp_path / "wd")
  segment.train_and_evaluate(c, workdir)
  t = json.load(open(os.path.join(workdir, "results.json")))["test"]
  for key in ("liver/dice_global", "tumour/dice_global", "tumour/dice_per_case"):
    assert 0.0 <= t[key] <= 1.0, key
  (case,) = t["cases"]
  assert "tumour/dice" in t["cases"][case]
  # The saved network predicts 3 classes (a run that ignored num_classes
  # would give 2 and still report a tumour Dice).
  predict_fn, cfg = seg_inference.load_seg_predictor(workdir)
  probs = np.asarray(predict_fn(jnp.zeros((1, *cfg.input_shape, 1), jnp.float32)))
  assert probs.shape == (1, *cfg.input_shape, 3)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  img = nib.load(os.path.join(workdir, "predictions", f"case-{case}.nii.gz"))
  assert img.shape == FILE_SHAPE
  assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1, 2}


def test_intensity_from_the_source_contract_or_the_config(tmp_path, caplog):
  pre = str(tmp_path / "pretrain")
  make_checkpoint(pre)
  c = _config("tiny")
  c.init_from = pre
  with caplog.at_level(logging.INFO, logger="radnet_jax"):
    eff, src = segment.resolve_source(c, str(tmp_path / "wd1"))
  assert src == pre and tuple(eff.data.window) == (-1000.0, 1000.0)
  assert tuple(eff.data.out_range) == (-1.0, 1.0)
  assert [tuple(w) for w in eff.model.kwargs.input_windows] == [(-0.16, 0.24)]
  assert eff.model.backbone == "resnet_tiny"
  assert "instead of config.data.window (-200.0, 250.0)" in caplog.text
  caplog.clear()
  c.intensity_from = "config"   # the knob: keep the config's window, and say so
  with caplog.at_level(logging.INFO, logger="radnet_jax"):
    eff, _ = segment.resolve_source(c, str(tmp_path / "wd2"))
  assert tuple(eff.data.window) == (-200.0, 250.0) and tuple(eff.data.out_range) == (0, 1)
  assert "input_windows" not in eff.model.kwargs
  assert "intensity_from=config" in caplog.text and "ct_window(-1000,1000)" in caplog.text
  c.intensity_from = "hu"
  with pytest.raises(ValueError, match="intensity_from must be"):
    segment.resolve_source(c, str(tmp_path / "wd3"))
  # Scratch: the config's window, the backbone of config.pretrain.
  eff, src = segment.resolve_source(_config("tiny,scratch"), str(tmp_path / "wd4"))
  assert src == "" and tuple(eff.data.window) == (-200.0, 250.0)
  assert eff.model.backbone == "resnet_tiny"


def test_shards_must_hold_what_the_network_is_fed():
  c = _config("tiny,scratch")
  built = {"normalisation": "ct_window(-200,250)->[0,1]", "config": {"spacing": [5.0, 3.0, 3.0]}}
  segment.check_shards(built, c, "S")
  c.data.window, c.data.out_range = (-1000.0, 1000.0), (-1.0, 1.0)   # a source's contract
  with pytest.raises(ValueError, match=r"S: shards built as ct_window\(-200,250\)->\[0,1\] "
                                       r".*--window=-1000,1000 --range=-1,1 --spacing 5,3,3"):
    segment.check_shards(built, c, "S")
