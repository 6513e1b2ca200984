"""Segmentation inference: a trained liver run on a new CT (NIfTI or DICOM series).

NIfTI in -> uint8 mask NIfTI on the input's own grid; a DICOM CT series in ->
a DICOM SEG on its images (optionally also a NIfTI mask). The preprocessing
is the run's contract (``radnet_jax.contract``: voxel spacing, HU window and
output range, axial canonical orientation, label vocabulary), read from the
workdir and nowhere else; the sliding window is the network's input shape,
padded with the low end of its intensity range; the sliding-window settings
(overlap, blending, batch, largest-component filter) come from the run's
``config.eval``. No task or training loop is imported here: the training task
(``radnet_jax.tasks.segment``) uses ``predictor`` and ``segment_volume`` for
its own evaluation.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import secrets
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from radnet_jax import contract as contract_lib
from radnet_jax import dicom
from radnet_jax.dicom import nifti
from radnet_jax.dicom import seg as segdicom
from radnet_jax.dicom import seg_write
from radnet_jax.inference import load as load_lib
from radnet_jax.inference import sliding_window
from radnet_jax.labels import lits
from radnet_jax.shards import seg as segdata
from radnet_jax.training import seg_metrics

log = logging.getLogger("radnet_jax")

# Sliding-window settings used when a run's config.eval lacks one.
EVAL_DEFAULTS = {"overlap": 0.25, "sw_batch_size": 2, "mode": "gaussian", "lcc": True}

_PREDICT_FNS: dict[int, tuple[Any, Any]] = {}


def _logits(out):
  return out[0] if isinstance(out, (tuple, list)) else out


def _predict_probs_fn(model):
  """Jitted (variables, windows) -> softmax probabilities, one per model
  object (keyed by identity: Flax modules with dict fields do not hash)."""
  hit = _PREDICT_FNS.get(id(model))
  if hit is None or hit[0] is not model:
    def f(variables, x):
      return jax.nn.softmax(_logits(model.apply(variables, x, train=False))
                            .astype(jnp.float32), axis=-1)
    hit = _PREDICT_FNS[id(model)] = (model, jax.jit(f))
  return hit[1]


def predictor(model, state_or_vars) -> sliding_window.PredictFn:
  """Softmax predictor for sliding windows; compiled once per window shape.

  ``state_or_vars``: a train state (``.params``, ``.batch_stats``) or a
  variables dict.
  """
  if hasattr(state_or_vars, "params"):
    variables = {"params": state_or_vars.params}
    if jax.tree.leaves(state_or_vars.batch_stats):
      variables["batch_stats"] = state_or_vars.batch_stats
  else:
    variables = state_or_vars
  # Plain single-device copies: a training state lives on the mesh (with
  # explicit data-axis shardings) but windows are blended on one device.
  variables = jax.device_put(jax.device_get(variables), jax.devices()[0])
  return functools.partial(_predict_probs_fn(model), variables)


def segment_volume(predict_fn: sliding_window.PredictFn, volume: np.ndarray,
                   roi: tuple[int, int, int], eval_cfg: Mapping, *,
                   pad_value: float = 0.0, z_range: tuple[int, int] | None = None
                   ) -> np.ndarray:
  """Label map ``(D, H, W)`` uint8 of a normalised record-grid volume.

  Sliding windows of ``roi`` (the network's input shape) over ``z_range``
  (slices [z0, z1), everything else background) or the whole volume, padded
  with ``pad_value`` (the low end of the intensity range: air); argmax;
  largest connected component when ``eval_cfg["lcc"]``.
  """
  cfg = {**EVAL_DEFAULTS, **dict(eval_cfg)}
  vol = np.asarray(volume, np.float32)
  out = np.zeros(vol.shape, np.uint8)
  z0, z1 = (0, vol.shape[0]) if z_range is None else z_range
  if z1 <= z0:
    return out
  probs = sliding_window.sliding_window_inference(
      vol[z0:z1, ..., None], tuple(int(r) for r in roi), predict_fn,
      overlap=cfg["overlap"], sw_batch_size=cfg["sw_batch_size"], mode=cfg["mode"],
      pad_value=pad_value)
  out[z0:z1] = np.asarray(jnp.argmax(probs, axis=-1), np.uint8)
  if cfg["lcc"]:
    out = seg_metrics.keep_largest_organ(out, organ=tuple(range(1, int(out.max()) + 1))
                                         or (1,))
  return out


def prep_config(c: contract_lib.Contract) -> segdata.SegPrepConfig:
  """The record-grid preprocessing of a segmentation contract."""
  if c.task != contract_lib.SEGMENT:
    raise ValueError(f"a {c.task} network, not a segmentation network "
                     f"(header QA of pretraining networks: radnet_jax.predict)")
  if c.orientation != contract_lib.ORIENT_AXIAL:
    raise ValueError(f"segmentation contract orientation {c.orientation!r}; this version "
                     f"reads {contract_lib.ORIENT_AXIAL!r} only")
  ct = c.intensity_for("CT")
  if ct.kind != "window":
    raise ValueError(f"segmentation contract CT intensity {ct.spec}: only HU windows "
                     f"are supported")
  return segdata.SegPrepConfig(spacing=c.spacing_mm, window=ct.window,
                               out_range=tuple(ct.out_range))


@dataclasses.dataclass(frozen=True)
class SegPredictor:
  """A restored segmentation run. Unpacks as ``predict_fn, config``.

  predict_fn: softmax windows ``(B, d, h, w, 1)`` -> ``(B, d, h, w, K)``.
  config: the run's config (``config.eval``: sliding-window settings).
  contract: its preprocessing contract.
  """
  predict_fn: sliding_window.PredictFn
  config: Any
  contract: contract_lib.Contract

  def __iter__(self) -> Iterator[Any]:
    return iter((self.predict_fn, self.config))

  @property
  def num_classes(self) -> int:
    return int(self.contract.num_classes or self.config.num_classes)

  @property
  def pad_value(self) -> float:
    return float(self.contract.intensity_for("CT").out_range[0])

  def segment(self, volume: np.ndarray, z_range: tuple[int, int] | None = None
              ) -> np.ndarray:
    """``segment_volume`` with this run's window, padding and eval settings."""
    eval_cfg = self.config.eval.to_dict() if self.config.get("eval") else {}
    return segment_volume(self.predict_fn, volume, self.contract.input_shape, eval_cfg,
                          pad_value=self.pad_value, z_range=z_range)


def load_seg_predictor(workdir: str, prefer: str = "latest") -> SegPredictor:
  """The softmax predictor, config and contract of a trained segmentation run
  (its best or latest checkpoint, ``prefer``; ``inference.load``)."""
  loaded = load_lib.load(workdir, prefer=prefer)
  prep_config(loaded.contract)   # a pretraining run raises here, by its contract
  return SegPredictor(predictor(loaded.model, loaded.variables), loaded.config,
                      loaded.contract)


def predict_canonical(pred: SegPredictor, hu: np.ndarray, affine: np.ndarray,
                      geometry: dict) -> tuple[np.ndarray, dict]:
  """Canonical HU ``(D, H, W)`` (``nifti.load_nifti_canonical`` or
  ``segdicom.load_ct_canonical``) -> (uint8 label map on the record grid,
  geometry for ``nifti.to_original_grid`` / ``save_nifti``)."""
  vol, _, geometry = segdata.preprocess(hu, affine, geometry, prep_config(pred.contract))
  return pred.segment(vol), geometry


def _as_predictor(run: str | SegPredictor, prefer: str) -> SegPredictor:
  return run if isinstance(run, SegPredictor) else load_seg_predictor(run, prefer)


def predict_nifti(run: str | SegPredictor, nifti_path: str, out_path: str,
                  prefer: str = "latest") -> str:
  """Segments a CT NIfTI (HU) with a trained run; writes the uint8 mask NIfTI
  on the input's own voxel grid and affine. Returns ``out_path``.

  ``run``: the workdir (its best or latest checkpoint, ``prefer``) or a
  ``SegPredictor``. The slab proposal is not applied here (its classifier is
  not saved with the run).
  """
  pred = _as_predictor(run, prefer)
  hu, affine, geometry = nifti.load_nifti_canonical(nifti_path)
  labels, geometry = predict_canonical(pred, hu, affine, geometry)
  return nifti.save_nifti(labels, geometry, out_path)


def _int(v) -> int | None:
  try:
    return int(v)
  except (TypeError, ValueError):
    return None


def select_ct_stack(input_path: str, series_number: int | None = None):
  """The one CT stack under ``input_path`` (folder or file).

  Raises ValueError naming the folder when there is none, or several and
  ``series_number`` (SeriesNumber) does not pick exactly one.
  """
  # The salt only ties stacks to series inside this call; nothing is stored.
  res = dicom.scan(input_path, salt=secrets.token_hex(8))
  cts = [s for s in res.stacks if str(s.record.get("Modality", "")).upper() == "CT"]
  if series_number is not None:
    cts = [s for s in cts if _int(s.record.get("SeriesNumber")) == series_number]
  if len(cts) == 1:
    return cts[0]
  if not cts:
    reasons = sorted({k.reason for k in res.skipped})[:3]
    raise ValueError(f"{input_path}: no CT series"
                     + (f" with SeriesNumber {series_number}" if series_number is not None
                        else "")
                     + (f" (skipped files: {'; '.join(reasons)})" if reasons else ""))
  root = input_path if os.path.isdir(input_path) else os.path.dirname(input_path)
  listing = "; ".join(f"{os.path.relpath(os.path.dirname(s.files[0]), root)}: SeriesNumber "
                      f"{s.record.get('SeriesNumber', '?')}, "
                      f"{s.record.get('NumberOfSlices', len(s.files))} slices" for s in cts)
  raise ValueError(f"{input_path}: {len(cts)} CT stacks ({listing}); pass --series N "
                   f"or a folder with one series")


def predict_dicom(run: str | SegPredictor, input_path: str, out_path: str, *,
                  prefer: str = "best", nifti_out: str | None = None,
                  series_number: int | None = None) -> dict:
  """Segments a CT DICOM series and writes a DICOM SEG on its images.

  Args:
    run: trained segmentation workdir (``config.json``, ``contract.json``,
      checkpoints) or a ``SegPredictor`` already loaded (reuse across calls).
    input_path: folder (or file) with the CT series.
    out_path: SEG file to write.
    prefer: "best" or "latest" checkpoint.
    nifti_out: also write the mask as NIfTI (on the ``load_volume`` grid).
    series_number: SeriesNumber of the series when the folder holds several.

  Returns {"seg": out_path, "nifti": path or None, "voxels": {label: count}}
  with voxel counts on the CT grid. The NIfTI mask is written first; when
  the SEG cannot be written (e.g. an anonymiser replaced the images' UIDs by
  strings that are not UIDs) "seg" is None, "seg_error" says why, and the
  mask is saved all the same (at ``nifti_out``, else ``fallback_mask_path``).
  """
  stack = select_ct_stack(input_path, series_number)
  pred = _as_predictor(run, prefer)
  hu, affine, geometry, vol = segdicom.load_ct_canonical(stack)
  labels, geometry = predict_canonical(pred, hu, affine, geometry)
  on_ct = nifti.to_original_grid(labels, geometry)
  counts = np.bincount(on_ct.ravel(), minlength=len(lits.LABELS))
  out = {"seg": out_path, "nifti": nifti_out or None,
         "voxels": {lits.NAMES[v]: int(counts[v]) for v in (lits.LIVER, lits.TUMOUR)}}
  # The mask first: an output that can be written never waits on one that
  # may fail (the SEG needs UIDs and headers that anonymisers break).
  if nifti_out:
    nifti.save_nifti(labels, geometry, nifti_out)
  try:
    seg_write.write_seg(on_ct, vol.affine, stack.files, out_path,
                        label_values=lits.label_values(pred.num_classes))
  except Exception as e:  # noqa: BLE001 - highdicom rejects headers in many ways
    reason = f"{type(e).__name__}: {e}"
    log.warning("SEG not written (%s)", reason)
    if os.path.exists(out_path):
      os.remove(out_path)   # never leave a partial SEG behind
    if not nifti_out:
      out["nifti"] = fallback_mask_path(out_path)
      nifti.save_nifti(labels, geometry, out["nifti"])
    out["seg"] = None
    out["seg_error"] = reason
  return out


def fallback_mask_path(seg_path: str) -> str:
  """Where the mask goes when the SEG cannot be written and no --nifti-out
  was given: beside the SEG, ``X.dcm`` -> ``X.nii.gz``."""
  root = seg_path[:-4] if seg_path.lower().endswith(".dcm") else seg_path
  return root + ".nii.gz"


def predict_path(run: str | SegPredictor, input_path: str, out_path: str, *,
                 prefer: str = "best", nifti_out: str | None = None,
                 series_number: int | None = None) -> dict:
  """NIfTI in -> NIfTI mask ({"nifti": path}); anything else -> DICOM series -> SEG
  (see ``predict_dicom``)."""
  if not os.path.exists(input_path):
    raise FileNotFoundError(f"{input_path}: no such file or directory")
  if nifti.is_nifti(input_path):
    return {"nifti": predict_nifti(run, input_path, out_path, prefer)}
  return predict_dicom(run, input_path, out_path, prefer=prefer, nifti_out=nifti_out,
                       series_number=series_number)
