"""``predict``: run a pretraining network on every series of a folder (header QA)."""
from __future__ import annotations

import logging
from typing import Any, Sequence

from radnet_jax.inference import apply
from radnet_jax.inference import header_qa
from radnet_jax.inference import inputs as inputs_lib
from radnet_jax.inference import load as load_lib
from radnet_jax.labels import taxonomy as tax

log = logging.getLogger("radnet_jax")


def predict(checkpoint: Any, input: str, *, threshold: float = header_qa.DEFAULT_THRESHOLD,  # pylint: disable=redefined-builtin
            qa_tasks: Sequence[str] = header_qa.QA_TASKS, batch_size: int = 4,
            salt: str | None = None, priors: Any = None, modality: str | None = None,
            workers: int = 1, keep_inputs: bool = False, progress: bool = False,
            hash_paths: bool = True) -> header_qa.Report:
  """Runs the network on every stack of a DICOM folder (or NIfTI file/folder).

  The header-QA report: per stack, the network's class and probabilities
  for each task next to the label derived from the metadata (and the rule
  that produced it), with ``disagree_<task>`` flags and an overall
  ``qa_flag`` where the pixels contradict the header with confidence.

  Args:
    checkpoint: a path as for ``load``, or a ``Loaded``.
    input: a DICOM folder tree, one DICOM file, a ``.nii[.gz]`` file, or a
      folder with NIfTI files (no metadata labels for NIfTI).
    threshold: probability of the network's top class (or of a coverage
      band against the header) needed for ``qa_flag``.
    qa_tasks: tasks that can raise ``qa_flag``.
    batch_size: volumes per network call.
    salt: identifier hashing salt (default: $RADNET_SALT or a per-user salt
      in the radnet cache); the same salt as the shards gives the same
      hashes (join with ``labels.csv`` or the phantom's ``truth.csv``).
    priors: label priors as in ``build.build_shards`` (None, "builtin", a
      file).
    modality: modality of NIfTI inputs ("CT", "MR"; None: guessed).
    workers: processes loading volumes.
    keep_inputs: keep each stack's model input in ``Report.inputs``.
    progress: tqdm progress bars.
    hash_paths: skipped files by salted hash of their relative path (default,
      as ``build_shards``: folder names may hold patient names); False: the path.
  Returns:
    ``Report``: ``rows`` with the columns ``source, series_hash, stack_key,
    study_hash, patient_hash, modality, series_description, n_files, shape,
    spacing_mm``; per softmax task ``pred_<t>, prob_<t>, label_<t>,
    provenance_<t>, disagree_<t>, p_<t>_<class>...``; ``pred_coverage,
    label_coverage, provenance_coverage, disagree_coverage,
    p_coverage_<band>...``; ``pred_spacing_mm, label_spacing_mm,
    provenance_spacing, disagree_spacing``; ``qa_flag, qa_tasks,
    qa_confidence``. ``skipped`` lists every file or stack without a
    prediction and why; nothing aborts the run.
  """
  loaded = load_lib.as_loaded(checkpoint)
  heads = loaded.heads
  if not any(t in heads for t in (*tax.CLASSIFICATION_TASKS, "coverage")):
    raise ValueError(f"{loaded.path}: model {type(loaded.model).__name__} has no "
                     f"classification heads (config.entry="
                     f"{loaded.config.get('entry', 'radnet_jax.tasks.pretrain')}); predict needs a "
                     f"pretraining checkpoint (segmentation: radnet_jax.tasks.segment)")
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f"threshold must be in (0, 1], got {threshold}")
  inputs_lib.check_contract(loaded.contract, loaded.path)
  taxonomy = tax.Taxonomy(loaded.taxonomy)
  it, skipped = inputs_lib.prepare_inputs(str(input), shard_shape=loaded.shard_shape,
                               input_shape=loaded.input_shape, salt=salt,
                               taxonomy=loaded.taxonomy, priors=priors, modality=modality,
                               workers=workers, progress=progress, hash_paths=hash_paths)
  skipped = list(skipped)
  rows, inputs = [], {}
  pending: list[inputs_lib.Prepared] = []

  def flush():
    if not pending:
      return
    outs, _ = apply.run_batches(loaded.model, loaded.variables, [p.x for p in pending],
                          batch_size)
    for i, p in enumerate(pending):
      one = {k: v[i] for k, v in outs.items() if k != "embedding"}
      row = dict(p.info)
      row.update(header_qa.qa_row(one, p.labels, taxonomy, threshold, qa_tasks))
      rows.append(row)
    pending.clear()

  for item in it:
    if isinstance(item, inputs_lib.SkippedInput):
      skipped.append(item)
      continue
    if keep_inputs:
      inputs[item.key] = item.x[..., 0]
    pending.append(item)
    if len(pending) >= batch_size:
      flush()
  flush()
  extra = ["modality_source"] if any("modality_source" in r for r in rows) else []
  columns = header_qa.INFO_COLUMNS + extra + header_qa.qa_columns(heads, taxonomy) + \
      ["qa_flag", "qa_tasks", "qa_confidence"]
  log.info("predict: %d stacks, %d flagged by header QA (threshold %.2f), %d skipped",
           len(rows), sum(bool(r["qa_flag"]) for r in rows), threshold, len(skipped))
  return header_qa.Report(rows, skipped, columns, inputs)
