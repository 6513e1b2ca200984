"""DICOM -> ArrayRecord shards on Apache Beam (Direct, Dataflow, Flink, Spark).

The same conversion as ``radnet_jax.shards.build.build_shards`` (one stack in, one
record out, through the *same* functions: ``convert.convert_stack_staged``
for load + resample + normalise, ``labelling.label_entry`` for the labels and
their targets, ``convert.split_of`` for the patient split and
``convert.shard_record`` + ``records.encode`` for the bytes), distributed by
an existing engine instead of a local process pool:

::

  units (folders)      --Reshuffle-->  ConvertUnit: [localise] scan, convert
     or stacks (local)  --Reshuffle-->  ConvertStack: convert one stack
        -> (split, shard_of(stack key)), record bytes       [+ label row, errors]
        -> GroupByKey -> WriteShard (sorted by stack key)   -> shard info
        -> one manifest.json, labels.csv, errors.csv

Two input modes:

* **local** (``input_dir`` is a folder every worker can read: DirectRunner,
  Flink/Spark on a shared filesystem): the driver scans headers once
  (``radnet_jax.dicom.scan``) and the stacks are distributed;
* **remote** (``gs://`` / ``s3://`` prefix, e.g. an IDC download mirrored to
  a bucket with one folder per series): the driver lists the sub-folders
  (``--scan-depth`` levels down) and each worker copies one folder to local
  disk, scans and converts it. A series must not span two units.

Shard layout: records of a split go to ``ceil(n / records_per_shard)``
shards by a stable hash of the stack key and are sorted by key inside each
shard, so the output depends only on the input and the salt (not on the
runner or the number of workers); the *set* of records per split is exactly
the one ``build_shards`` writes (``tests/test_beam.py``). Shards are written
to a local temporary file and copied with Beam's ``FileSystems``, so
``out_dir`` may be ``gs://...``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from typing import Any, Iterator, Mapping, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from radnet_jax import privacy
from radnet_jax.shards import convert
from radnet_jax.shards import labelling
from radnet_jax.shards import records
from radnet_jax import resample as rs
from radnet_jax.labels import taxonomy as tx

ERRORS_TAG = "errors"
LABELS_TAG = "labels"
_REMOTE = ("gs://", "s3://", "hdfs://", "abfs://", "az://")


def is_remote(path: str) -> bool:
  return str(path).startswith(_REMOTE)


def _join(base: str, name: str) -> str:
  return FileSystems.join(base, name) if is_remote(base) else os.path.join(base, name)


def shard_of(key: str, num_shards: int) -> int:
  """Stable shard index of a stack key (same on every worker and runner)."""
  digest = hashlib.sha256(key.encode()).digest()
  return int.from_bytes(digest[:8], "big") % max(num_shards, 1)


# ----------------------------------------------------------------------------
# The per-stack conversion (shared with radnet_jax.shards.convert)
# ----------------------------------------------------------------------------

class Options:
  """Picklable conversion settings (what ``build_shards`` takes as kwargs)."""

  def __init__(self, *, shape: Sequence[int], taxonomy: str, salt: str,
               split: Sequence[float], seed: int, priors: Any = None,
               overrides: str | None = None, hash_paths: bool = True,
               records_per_shard: int = convert.DEFAULT_RECORDS_PER_SHARD):
    self.shape = tuple(int(s) for s in shape)
    self.taxonomy = taxonomy
    self.salt = salt
    self.split = tuple(float(f) for f in split)
    self.seed = int(seed)
    self.priors = priors
    self.overrides = overrides
    self.hash_paths = hash_paths
    self.records_per_shard = int(records_per_shard)


# A stack failed at ``stage`` ("load" | "resample" | "label").
StageError = convert.StageError


def stack_record(stack: Any, opts: Options, priors_obj: Any = None,
                 overrides_table: Any = None) -> tuple[str, bytes, dict]:
  """One stack -> (split, encoded shard record, label-report row).

  Exactly ``build_shards``' per-stack path: ``convert.convert_stack_staged``
  (streaming onto the shard grid for classic stacks, ``load_volume``
  otherwise), then the cached record goes through ``records.encode``/
  ``decode`` as it does through the work cache there, so the bytes are
  identical. Raises ``StageError`` on a bad stack (the caller logs it).
  """
  cached = convert.convert_stack_staged(stack, opts.shape)  # raises StageError
  try:
    cached = records.decode(records.encode(cached))
  except Exception as e:  # noqa: BLE001
    raise StageError("resample", e) from e
  md = cached["metadata"]
  try:
    entry = labelling.label_entry(md, stack.key, opts.taxonomy, priors_obj,
                                overrides_table, scan_record=stack.record)
  except Exception as e:  # noqa: BLE001
    raise StageError("label", e) from e
  sp = convert.split_of(convert.patient_key(md, stack.key), opts.split, opts.seed)
  texts, provs, targets = entry["labels"], entry["provenance"], entry["targets"]
  rec = convert.shard_record(cached, entry, sp, opts.taxonomy)
  row = {"stack": stack.key, "series_hash": md.get("SeriesHash", ""), "split": sp,
         "modality": cached.get("modality", ""), **texts,
         **{f"{t}_provenance": provs[t] for t in tx.TASKS},
         "_targets": {k: v for k, v in targets.items()}}
  return sp, records.encode(rec), row


class _ConvertBase(beam.DoFn):
  """Loads priors/overrides once per worker; converts stacks; tags errors."""

  def __init__(self, opts: Options):
    super().__init__()
    self.opts = opts
    self._priors = None
    self._overrides = None

  def setup(self):
    self._priors = labelling.load_priors(self.opts.priors)
    self._overrides = labelling.load_overrides(self.opts.overrides, self.opts.taxonomy)

  def _convert(self, stack: Any, root: str) -> Iterator[Any]:
    scrub = convert.PathScrubber(root, self.opts.salt, self.opts.hash_paths)
    try:
      sp, data, row = stack_record(stack, self.opts, self._priors, self._overrides)
    except Exception as e:  # noqa: BLE001 - one bad series never stops the job
      stage, text = ((e.stage, str(e)) if isinstance(e, StageError)
                     else ("label", f"{type(e).__name__}: {e}"))
      yield beam.pvalue.TaggedOutput(ERRORS_TAG, {
          "path": scrub.show(convert.stack_dir(stack.files)),
          "series": stack.record.get("SeriesHash", ""), "stack": stack.key,
          "stage": stage, "reason": scrub.text(text, stack.files)})
      return
    beam.metrics.Metrics.counter("radnet", "records").inc()
    yield beam.pvalue.TaggedOutput(LABELS_TAG, row)
    yield (sp, stack.key, data)


class ConvertStack(_ConvertBase):
  """Local mode: ``(root, Stack)`` -> ``(split, key, bytes)`` + labels/errors."""

  def process(self, element):
    root, stack = element
    yield from self._convert(stack, root)


class ConvertUnit(_ConvertBase):
  """Unit mode: one folder -> [copy to local disk] scan, convert its stacks.

  ``root`` is the input root: error paths stay relative to it, as in
  ``build_shards``. Remote folders (gs://, s3://) are copied to a temporary
  local folder first; local ones are scanned in place.
  """

  def __init__(self, opts: Options, root: str):
    super().__init__(opts)
    self.root = root.rstrip("/")

  def process(self, unit: str):
    from radnet_jax import dicom  # pylint: disable=g-import-not-at-top
    tmp = tempfile.mkdtemp(prefix="radnet_unit_")
    try:
      if is_remote(unit):
        rel = unit.rstrip("/")[len(self.root) + 1:]
        base = os.path.join(tmp, "in")
        local = os.path.join(base, *rel.split("/")) if rel else base
        _localise(unit, local)
      else:
        base, local = self.root, unit
      scrub = convert.PathScrubber(base, self.opts.salt, self.opts.hash_paths)
      scanned = dicom.scan(local, salt=self.opts.salt, workers=1, progress=False)
      for sk in scanned.skipped:
        yield beam.pvalue.TaggedOutput(ERRORS_TAG, {
            "path": scrub.show(sk.path), "series": sk.series, "stack": "",
            "stage": "scan", "reason": scrub.text(sk.reason, [sk.path])})
      for st in sorted(scanned.stacks, key=lambda s: s.key):
        yield from self._convert(st, base)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)


def _localise(url: str, dest: str) -> None:
  """Copies every file under ``url`` (a folder URL) into ``dest``."""
  prefix = url.rstrip("/") + "/"
  matches = FileSystems.match([prefix + "**"])[0].metadata_list
  if not matches:
    raise FileNotFoundError(f"{url}: no files")
  for m in matches:
    rel = m.path[len(prefix):]
    if not rel or rel.endswith("/"):
      continue
    out = os.path.join(dest, *rel.split("/"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with FileSystems.open(m.path) as src, open(out, "wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 20)


def list_units(input_dir: str, depth: int) -> list[str]:
  """Folders ``depth`` levels below ``input_dir`` (1 = its sub-folders).

  Files directly inside ``input_dir`` (or above ``depth``) form no unit and
  are reported by ``build_pipeline``. Works for local paths and any
  filesystem Beam knows (gs://, s3://, ...).
  """
  root = input_dir.rstrip("/")
  if depth <= 0:
    return [root]
  if not is_remote(root):
    units = []
    for dirpath, dirnames, _ in os.walk(root):
      dirnames.sort()
      rel = os.path.relpath(dirpath, root)
      level = 0 if rel == "." else rel.count(os.sep) + 1
      if level == depth:
        units.append(dirpath)
        dirnames[:] = []
    return sorted(units)
  prefix = root + "/"
  units = set()
  for m in FileSystems.match([prefix + "**"])[0].metadata_list:
    parts = m.path[len(prefix):].split("/")
    if len(parts) > depth:
      units.add(prefix + "/".join(parts[:depth]))
  return sorted(units)


# ----------------------------------------------------------------------------
# Writing shards
# ----------------------------------------------------------------------------

class WriteShard(beam.DoFn):
  """((split, index), [(key, bytes)]) -> shard file; yields its info."""

  def __init__(self, out_dir: str):
    super().__init__()
    self.out_dir = out_dir

  def process(self, element, num_shards: Mapping[str, int]):
    (split, index), items = element
    items = sorted(items, key=lambda kv: kv[0])
    n = num_shards[split]
    name = convert.shard_name(split, index, n)
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
    fd, tmp = tempfile.mkstemp(suffix=".array_record")
    os.close(fd)
    try:
      writer = ArrayRecordWriter(tmp, convert.WRITER_OPTIONS)
      try:
        for _, data in items:
          writer.write(data)
      finally:
        writer.close()
      _publish(tmp, _join(self.out_dir, name))
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    yield {"split": split, "index": index, "file": name, "records": len(items)}


def _publish(local: str, dest: str) -> None:
  """Moves a finished local file to ``dest`` (local rename or upload)."""
  if is_remote(dest):
    with open(local, "rb") as src, FileSystems.create(dest) as dst:
      shutil.copyfileobj(src, dst, 1 << 20)
  else:
    tmp = dest + ".tmp"
    shutil.copyfile(local, tmp)
    os.replace(tmp, dest)


def _write_text(path: str, text: str) -> None:
  if is_remote(path):
    with FileSystems.create(path) as f:
      f.write(text.encode())
  else:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)


class WriteReports(beam.DoFn):
  """Single element (None) + side inputs -> manifest.json, labels.csv, errors.csv."""

  def __init__(self, out_dir: str, opts: Options):
    super().__init__()
    self.out_dir = out_dir
    self.opts = opts

  def process(self, _, shards, labels, errors):
    from radnet_jax.shards import report  # pylint: disable=g-import-not-at-top
    tax = tx.Taxonomy(self.opts.taxonomy)
    by_split = {s: sorted((x for x in shards if x["split"] == s), key=lambda x: x["index"])
                for s in convert.SPLITS}
    items = {s: [] for s in convert.SPLITS}
    rows = []
    for r in sorted(labels, key=lambda r: r["stack"]):
      r = dict(r)
      targets = r.pop("_targets")
      rows.append(r)
      items[r["split"]].append({"labels": {t: r[t] for t in tx.TASKS},
                                "targets": targets})
    errs = sorted(errors, key=lambda r: (r["stage"] != "scan", r["path"], r["stack"],
                                         r["reason"]))
    manifest = {
        "schema_version": records.SCHEMA_VERSION, "kind": "pretrain",
        "taxonomy": self.opts.taxonomy, "tasks": list(tx.TASKS),
        "classes": {t: list(tax.classes(t)) for t in ("sequence", "plane", "contrast",
                                                      "coverage")},
        "shape": list(self.opts.shape), "dtype": "float16",
        "normalisation": {"CT": rs.normalisation_for("CT"),
                          "other": rs.normalisation_for("MR"),
                          "doc": "see radnet_jax/resample.py"},
        "splits": list(convert.SPLITS),
        "num_records": {s: len(items[s]) for s in convert.SPLITS},
        "num_errors": len(errs),
        "shards": {s: [{"file": x["file"], "records": x["records"]} for x in by_split[s]]
                   for s in convert.SPLITS},
        "counts": {s: convert.counts(items[s], tax) for s in convert.SPLITS},
        "config": {"shape": list(self.opts.shape), "taxonomy": self.opts.taxonomy,
                   "split": list(self.opts.split), "seed": self.opts.seed,
                   "records_per_shard": self.opts.records_per_shard,
                   "writer_options": convert.WRITER_OPTIONS,
                   "overrides_sha256": convert.file_digest(self.opts.overrides)
                   if self.opts.overrides and not is_remote(self.opts.overrides) else None,
                   "priors": labelling.priors_id(self.opts.priors, self.opts.priors),
                   "hash_paths": self.opts.hash_paths,
                   "cache_version": convert.CACHE_VERSION,
                   "engine": "apache_beam"},
    }
    tmpdir = tempfile.mkdtemp(prefix="radnet_reports_")
    try:
      for name, writer, data in (("labels.csv", report.write_labels_csv, rows),
                                 ("errors.csv", report.write_errors_csv, errs)):
        local = os.path.join(tmpdir, name)
        writer(local, data)
        _publish(local, _join(self.out_dir, name))
    finally:
      shutil.rmtree(tmpdir, ignore_errors=True)
    _write_text(_join(self.out_dir, convert.MANIFEST),
                json.dumps(manifest, indent=1, sort_keys=True))
    if not is_remote(self.out_dir):   # shards of an earlier, larger run
      keep = {x["file"] for x in shards}
      for name in os.listdir(self.out_dir):
        if convert.SHARD_RE.match(name) and name not in keep:
          os.remove(os.path.join(self.out_dir, name))
    yield manifest


# ----------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------

def build_pipeline(p: beam.Pipeline, input_dir: str, out_dir: str, opts: Options, *,
                   mode: str = "auto", scan_depth: int = 1, scan_workers: int = 1):
  """Adds the conversion to pipeline ``p``; returns the manifest PCollection.

  mode: "stacks" (the driver scans ``input_dir`` and distributes stacks),
    "units" (workers scan the folders ``scan_depth`` levels down; no series
    may span two of them) or "auto" (units for remote input, else stacks).
  """
  if mode == "auto":
    mode = "units" if is_remote(input_dir) else "stacks"
  if mode not in ("stacks", "units"):
    raise ValueError(f"mode must be 'stacks', 'units' or 'auto', got {mode!r}")
  if not is_remote(input_dir) and not os.path.isdir(input_dir):
    raise FileNotFoundError(f"{input_dir}: input folder does not exist")
  root = input_dir.rstrip("/") if is_remote(input_dir) else os.path.abspath(input_dir)
  if mode == "units":
    units = list_units(root, scan_depth)
    if not units:
      raise FileNotFoundError(f"{input_dir}: no input folders at depth {scan_depth}")
    converted = (p | "Units" >> beam.Create(units)
                 | "SpreadUnits" >> beam.Reshuffle()
                 | "Convert" >> beam.ParDo(ConvertUnit(opts, root)).with_outputs(
                     ERRORS_TAG, LABELS_TAG, main="records"))
    scan_errors = p | "NoScanErrors" >> beam.Create([])
  else:
    from radnet_jax import dicom  # pylint: disable=g-import-not-at-top
    scanned = dicom.scan(root, salt=opts.salt, workers=scan_workers, progress=False)
    scrub = convert.PathScrubber(root, opts.salt, opts.hash_paths)
    errors0, stacks = [], {}
    for sk in scanned.skipped:
      errors0.append({"path": scrub.show(sk.path), "series": sk.series, "stack": "",
                      "stage": "scan", "reason": scrub.text(sk.reason, [sk.path])})
    for st in sorted(scanned.stacks, key=lambda s: s.key):
      if st.key in stacks:
        errors0.append({"path": scrub.show(convert.stack_dir(st.files)),
                        "series": st.record.get("SeriesHash", ""), "stack": st.key,
                        "stage": "scan", "reason": "duplicate stack key; kept the first"})
        continue
      stacks[st.key] = st
    converted = (p | "Stacks" >> beam.Create([(root, s) for s in stacks.values()])
                 | "SpreadStacks" >> beam.Reshuffle()
                 | "Convert" >> beam.ParDo(ConvertStack(opts)).with_outputs(
                     ERRORS_TAG, LABELS_TAG, main="records"))
    scan_errors = p | "ScanErrors" >> beam.Create(errors0)

  recs = converted.records
  per_split = (recs | "SplitOf" >> beam.Map(lambda r: (r[0], 1))
               | "CountPerSplit" >> beam.CombinePerKey(sum))
  rps = opts.records_per_shard
  num_shards = beam.pvalue.AsDict(
      per_split | "NumShards" >> beam.Map(lambda kv: (kv[0], math.ceil(kv[1] / rps))))
  shards = (recs
            | "AssignShard" >> beam.Map(
                lambda r, n: ((r[0], shard_of(r[1], n[r[0]])), (r[1], r[2])), num_shards)
            | "GroupShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(WriteShard(out_dir), num_shards))
  errors = (converted[ERRORS_TAG], scan_errors) | "AllErrors" >> beam.Flatten()
  return (p | "Once" >> beam.Create([None])
          | "Reports" >> beam.ParDo(WriteReports(out_dir, opts),
                                    beam.pvalue.AsList(shards),
                                    beam.pvalue.AsList(converted[LABELS_TAG]),
                                    beam.pvalue.AsList(errors)))


def run(input_dir: str, out_dir: str, *, shape: Sequence[int] = convert.DEFAULT_SHAPE,
        taxonomy: str = "paper", priors: Any = None, overrides: str | None = None,
        salt: str | None = None, records_per_shard: int = convert.DEFAULT_RECORDS_PER_SHARD,
        seed: int = 0, split: Sequence[float] = convert.DEFAULT_SPLIT,
        hash_paths: bool = True, mode: str = "auto", scan_depth: int = 1,
        pipeline_args: Sequence[str] = ()) -> None:
  """Runs the conversion on the runner named in ``pipeline_args``.

  ``pipeline_args`` are Beam's own flags (``--runner=DataflowRunner
  --project=... --region=... --temp_location=gs://...``,
  ``--runner=FlinkRunner --flink_master=...``, ``--direct_num_workers=4
  --direct_running_mode=multi_processing``); DirectRunner by default.
  The salt is resolved on the driver (explicit > $RADNET_SALT >
  ``out_dir/.salt`` for a local ``out_dir``) and shipped to the workers; a
  remote ``out_dir`` needs ``salt`` or $RADNET_SALT.
  """
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  if taxonomy not in tx.SEQUENCE_CLASSES:
    raise ValueError(f"unknown taxonomy {taxonomy!r}; choose from "
                     f"{sorted(tx.SEQUENCE_CLASSES)}")
  if is_remote(out_dir):
    salt = salt or os.environ.get(privacy.SALT_ENV)
    if not salt:
      raise ValueError(f"{out_dir} is remote: pass --salt or set ${privacy.SALT_ENV} "
                       "(keep it secret, and the same for every run of this corpus)")
  else:
    os.makedirs(out_dir, exist_ok=True)
    salt = privacy.load_or_create_salt(out_dir, salt)
  opts = Options(shape=shape, taxonomy=taxonomy, salt=salt, split=split, seed=seed,
                 priors=priors, overrides=overrides, hash_paths=hash_paths,
                 records_per_shard=records_per_shard)
  options = PipelineOptions(list(pipeline_args))
  with beam.Pipeline(options=options) as p:
    build_pipeline(p, input_dir, out_dir, opts, mode=mode, scan_depth=scan_depth)
