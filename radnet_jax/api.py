"""Use a trained network: ``load`` a checkpoint anywhere, ``predict``, ``embed``, ``segment``.

A facade over ``radnet_jax.inference``; ``load``, ``predict`` and ``embed`` are
re-exported as ``radnet_jax.load`` / ``radnet_jax.predict`` /
``radnet_jax.embed``::

  import radnet_jax
  model, variables, config = radnet_jax.load("workdirs/pretrain")
  report = radnet_jax.predict("workdirs/pretrain", "/data/dicom")
  report.write_csv("predictions.csv")           # + predictions_skipped.csv
  emb = radnet_jax.embed("workdirs/pretrain", "/data/dicom")
  emb.embedding                                 # (N, F) float32
  radnet_jax.api.segment("runs/liver", "ct.nii.gz", "liver.nii.gz")

Every input is prepared as the network's training data was, by the run's
preprocessing contract (``radnet_jax.contract``, ``<workdir>/contract.json``).

Where each job lives: ``inference.load`` (restore + contract),
``inference.inputs`` (DICOM / NIfTI -> model inputs, process pools),
``inference.apply`` (batched network calls), ``inference.header_qa``
(``Report``, ``qa_row``), ``inference.predict``, ``inference.embed``,
``inference.segment`` (segmentation runs: NIfTI mask or DICOM SEG).

The functions here import their module on first call, so ``import
radnet_jax`` and the command-line parsers stay free of jax until a network is
needed; other names resolve lazily from the module that defines them.
"""
from __future__ import annotations

import importlib
from typing import Any

# Public name -> the inference module that defines it.
_HOME = {
    "Loaded": "load", "Prepared": "inputs", "SkippedInput": "inputs",
    "prepare_inputs": "inputs", "preprocess": "inputs", "load_nifti": "inputs",
    "default_salt": "inputs", "run_batches": "apply", "Report": "header_qa",
    "qa_row": "header_qa", "QA_TASKS": "header_qa", "DEFAULT_THRESHOLD": "header_qa",
    "SPACING_RATIO": "header_qa", "INFO_COLUMNS": "header_qa", "Embeddings": "embed",
    "SegPredictor": "segment", "load_seg_predictor": "segment",
}
__all__ = ["load", "predict", "embed", "segment", *_HOME]


def _module(name: str) -> Any:
  return importlib.import_module(f"radnet_jax.inference.{name}")


def load(path: str, **kwargs: Any) -> Any:
  """Restores a trained network (``radnet_jax.inference.load.load``: path
  spellings, ``prefer``, ``config``, ``dtype``); returns a ``Loaded``."""
  return _module("load").load(path, **kwargs)


def predict(checkpoint: Any, input: str, **kwargs: Any) -> Any:  # pylint: disable=redefined-builtin
  """Header QA of every series under ``input`` (``radnet_jax.inference.
  predict.predict``: arguments and columns); returns a ``Report``."""
  return _module("predict").predict(checkpoint, input, **kwargs)


def embed(model_or_loaded: Any, volumes_or_path: Any, **kwargs: Any) -> Any:
  """Per-series embeddings (``radnet_jax.inference.embed.embed``); returns
  ``Embeddings``."""
  return _module("embed").embed(model_or_loaded, volumes_or_path, **kwargs)


def segment(run: Any, input: str, out: str, **kwargs: Any) -> dict:  # pylint: disable=redefined-builtin
  """Liver segmentation of a CT NIfTI (-> mask NIfTI) or DICOM series (-> DICOM
  SEG) with a trained run (``radnet_jax.inference.segment.predict_path``)."""
  return _module("segment").predict_path(run, input, out, **kwargs)


def __getattr__(name: str) -> Any:
  if name in _HOME:
    return getattr(_module(_HOME[name]), name)
  raise AttributeError(f"module 'radnet_jax.api' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(list(globals()) + list(_HOME))
