"""Evaluators against hand-computed values."""
import numpy as np
import pytest

from radnet_jax.training import metrics


def test_auc_hand_example():
  # positives 0.8, 0.4; negatives 0.6, 0.2, 0.4 (one tie with a positive).
  # pairs: (0.8 > all 3) = 3; (0.4 > 0.2) = 1, (0.4 = 0.4) = 0.5 -> 4.5 / 6
  scores = np.array([0.8, 0.4, 0.6, 0.2, 0.4])
  labels = np.array([1, 1, 0, 0, 0])
  assert metrics.auc(scores, labels) == pytest.approx(0.75)
  assert metrics.auc(scores, np.ones(5)) != metrics.auc(scores, np.ones(5))  # NaN
  assert metrics.auc(-scores, labels) == pytest.approx(0.25)


def test_classification_evaluator_masks_padding_and_unknown():
  ev = metrics.ClassificationEvaluator(("a", "b", "c"))
  logits = np.log(np.array([[.7, .2, .1], [.1, .8, .1], [.2, .3, .5], [.6, .3, .1],
                            [.9, .05, .05], [.1, .1, .8]]))
  labels = np.array([0, 1, 2, 1, 2, -1])
  ev.update(logits[:4], labels[:4], np.ones(4))
  # second batch: one padded row (mask 0, would be wrong) and one unknown label
  ev.update(logits[4:], labels[4:], np.array([0, 1]))
  r = ev.result()
  assert r["n"] == 4
  assert r["accuracy"] == pytest.approx(3 / 4)
  assert r["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
  b = r["per_class"]["b"]
  assert b["n"] == 2
  assert b["sensitivity"] == pytest.approx(0.5) and b["specificity"] == pytest.approx(1.0)
  assert b["ppv"] == pytest.approx(1.0) and b["npv"] == pytest.approx(2 / 3)
  a = r["per_class"]["a"]
  assert a["ppv"] == pytest.approx(0.5) and a["accuracy"] == pytest.approx(3 / 4)
  # AUC of "a": scores .7(pos) vs .1,.2,.6(neg) -> 1.0
  assert a["auc"] == pytest.approx(1.0)


def test_multilabel_and_regression():
  ev = metrics.MultiLabelEvaluator(("x", "y"))
  logits = np.array([[3., -3.], [3., 3.], [-3., 3.], [9., 9.]])
  labels = np.array([[1, 0], [1, 0], [0, 1], [0, 0]])
  ev.update(logits, labels, np.array([1, 1, 1, 0]))
  r = ev.result()
  assert r["n"] == 3 and r["exact_match"] == pytest.approx(2 / 3)
  assert r["per_class"]["y"]["ppv"] == pytest.approx(0.5)
  rg = metrics.RegressionEvaluator()
  rg.update(np.array([1.0, 2.5, 7.0, 3.0]), np.array([1.5, 2.0, np.nan, 3.0]),
            np.array([1, 1, 1, 0]))
  assert rg.result()["mae_mm"] == pytest.approx(0.5) and rg.result()["n"] == 2


def test_report_outputs(tmp_path):
  ev = metrics.ClassificationEvaluator(("no", "yes"))
  ev.update(np.array([[2., 0.], [0., 2.]]), np.array([0, 0]), np.ones(2))
  r = ev.result()
  md = metrics.results_markdown({"contrast": r})
  assert "| contrast | 2 | accuracy | 0.500 |" in md
  metrics.save_confusion_png(str(tmp_path / "cm.png"), r["confusion"], r["classes"], "t")
  assert (tmp_path / "cm.png").stat().st_size > 1000
  assert metrics.jsonsafe({"a": float("nan")}) == {"a": None}
