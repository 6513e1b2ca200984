r"""Select a label-balanced subset of a labelled IDC index; write download lists.

    python -m data_prep.select_series --index out/idc_labels.parquet \
        --out out/selection --per-class 500 --modalities CT,MR \
        --require-known sequence,plane --max-per-patient 4 --seed 0

then download and convert (see docs/tpu.md, "From the IDC index"):

    s5cmd --no-sign-request --endpoint-url https://s3.amazonaws.com \
        run out/selection/manifest.s5cmd          # or: idc download ...
    python -m data_prep.build_shards ...           # DICOM -> ArrayRecord

The index is the output of ``data_prep.label_index`` (one row per series with
``sequence``/``plane``/``contrast``/``coverage`` text labels). Nothing is
downloaded by this script.
"""
from __future__ import annotations

import sys

from radnet_jax.labels import selection
from radnet_jax.cli import flags


def _csv(text: str | None) -> tuple[str, ...]:
  return tuple(t.strip() for t in (text or "").split(",") if t.strip())


def main(argv: list[str] | None = None) -> int:
  p = flags.Parser(description=__doc__.split("\n\n")[0])
  p.add_argument("--index", required=True,
                 help="labelled index (.parquet/.csv) from data_prep.label_index")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--per-class", type=int, default=100,
                 help="target series per (task, class)")
  p.add_argument("--tasks", default=",".join(selection.SELECT_TASKS),
                 help="tasks to balance (comma-separated)")
  p.add_argument("--modalities", default="CT,MR,PT",
                 help="keep these modalities ('' = all)")
  p.add_argument("--min-instances", type=int, default=16,
                 help="drop series with fewer DICOM instances")
  p.add_argument("--max-size-mb", type=float, default=None)
  p.add_argument("--include-derived", action="store_true",
                 help="keep IDC analysis-result series")
  p.add_argument("--require-known", default="",
                 help="tasks whose label must be known (comma-separated)")
  p.add_argument("--max-per-patient", type=int, default=None)
  p.add_argument("--max-series", type=int, default=None, help="overall budget")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dest", default="dicom",
                 help="download folder named in the s5cmd lines")
  a = p.parse_args(argv)

  crit = selection.Criteria(
      per_class=a.per_class, tasks=_csv(a.tasks),
      modalities=_csv(a.modalities) or None, min_instances=a.min_instances,
      max_size_mb=a.max_size_mb, original_only=not a.include_derived,
      require_known=_csv(a.require_known), max_per_patient=a.max_per_patient,
      max_series=a.max_series, seed=a.seed)
  df = selection.load_labelled_index(a.index)
  df = selection.attach_download_columns(df)
  sel = selection.select(df, crit)
  paths = selection.write_outputs(sel, a.out, dest=a.dest)
  print(selection.format_summary(sel))
  for kind, path in paths.items():
    print(f"{kind:>8}: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
