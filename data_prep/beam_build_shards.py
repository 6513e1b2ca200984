"""DICOM -> ArrayRecord shards on Apache Beam (optional: pip install -r requirements-beam.txt).

Same conversion and output layout as ``data_prep.build_shards`` (the same
per-stack code), distributed by Beam. Local (DirectRunner, 4 processes):

  python -m data_prep.beam_build_shards --input /data/dicom --out /data/shards \
      --shape 48,192,192 -- --direct_num_workers=4 --direct_running_mode=multi_processing

Dataflow (DICOM in a bucket, one folder per series, e.g. an IDC download):

  RADNET_SALT=... python -m data_prep.beam_build_shards \
      --input gs://BUCKET/dicom --out gs://BUCKET/shards --scan-depth 1 -- \
      --runner=DataflowRunner --project=PROJECT --region=us-central1 \
      --temp_location=gs://BUCKET/tmp --requirements_file=requirements-beam.txt \
      --setup_file=./setup.py --machine_type=n2-standard-8 --max_num_workers=64

Flink / Spark: ``--runner=FlinkRunner --flink_master=HOST:8081`` or
``--runner=SparkRunner``. Everything after ``--`` goes to Beam unchanged.
"""
from __future__ import annotations

import sys

from data_prep.build_shards import add_conversion_flags
from radnet_jax.shards import convert
from radnet_jax.cli import flags


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  beam_args: list[str] = []
  if "--" in argv:
    i = argv.index("--")
    argv, beam_args = argv[:i], argv[i + 1:]
  p = flags.Parser(prog="python -m data_prep.beam_build_shards",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--input", required=True,
                 help="DICOM root: a local folder, or gs://... / s3://... prefix")
  p.add_argument("--out", required=True, help="output folder (local or gs://...)")
  add_conversion_flags(p)
  p.add_argument("--mode", choices=("auto", "stacks", "units"), default="auto",
                 help="stacks: scan on the driver, distribute stacks; units: "
                      "workers scan the folders --scan-depth levels down (no "
                      "series may span two); auto: units for gs:// / s3:// input")
  p.add_argument("--scan-depth", type=int, default=1,
                 help="units mode: folder depth of one work unit (1 = each "
                      "sub-folder of --input, e.g. one series or patient)")
  a = p.parse_args(argv)
  try:
    from radnet_jax.shards import beam as beam_pipeline  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f"apache_beam is not installed ({e}); pip install -r requirements-beam.txt",
          file=sys.stderr)
    return 2
  priors = None if a.priors.lower() == "none" else a.priors
  beam_pipeline.run(a.input, a.out, shape=a.shape, taxonomy=a.taxonomy, priors=priors,
                    overrides=a.overrides, salt=a.salt,
                    records_per_shard=a.records_per_shard, seed=a.seed,
                    split=a.split, hash_paths=a.hash_paths, mode=a.mode,
                    scan_depth=a.scan_depth,
                    pipeline_args=beam_args)
  if not beam_pipeline.is_remote(a.out):
    m = convert.read_manifest(a.out)
    print(f"records: {m['num_records']}, errors: {m['num_errors']} -> {a.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
