"""Ingestion scaling: series/s of ``build.build_shards`` with 1 and 2 processes,
and the projected wall time and cost of a 60,000-series conversion.

  python bench/ingest_scaling.py [--series 8] [--min-slices 64] [--max-slices 96] \
      [--workers 1,2] [--shape 48,192,192] [--target 60000] [--slices-per-series 178] \
      [--mb-per-series 73.4] [--read-mb-s-per-node 150] [--usd-per-vcpu-hour 0.07] \
      [--nodes 1,8,32,64] [--vcpus-per-node 8]

Builds the synthetic 512x512 CT corpus of ``bench/ingest.py`` once, then runs
the full local converter (scan -> load -> label -> resample -> encode ->
shards + reports) on it with each worker count into a fresh output folder (no
work cache reuse). Reports wall time, series/s, CPU seconds (this process and
its pool children) and CPU seconds per 100 slices, the cost unit used for the
projection (conversion cost grows with the number of 512x512 slices read).

Projection: total CPU = target series x slices-per-series x (CPU s / slice);
on ``nodes x vcpus-per-node`` workers at the measured parallel efficiency of
2 processes (CPU time per series with 2 workers vs 1): CPU-bound wall = total
CPU / (vCPUs x efficiency); read-bound wall = target x MB-per-series /
(nodes x read MB/s per node); the projected wall is the larger, and the cost
is vCPUs x wall x price (workers are paid while they wait on I/O). The
defaults for slices and MB per series are the means over the original CT/MR
series (>= 16 instances) of the ``idc-index-data`` 25.0.5 index (CT 209, MR
128 instances; 99.7% uncompressed transfer syntaxes).
"""
from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
from radnet_jax.cli import flags  # noqa: E402  pylint: disable=wrong-import-position


def _cpu() -> float:
  me = resource.getrusage(resource.RUSAGE_SELF)
  kids = resource.getrusage(resource.RUSAGE_CHILDREN)
  return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
  p = flags.Parser(description=__doc__.split("\n\n")[0])
  p.add_argument("--series", type=int, default=8)
  p.add_argument("--min-slices", type=int, default=64)
  p.add_argument("--max-slices", type=int, default=96)
  p.add_argument("--workers", default="1,2")
  p.add_argument("--shape", default="48,192,192")
  p.add_argument("--target", type=int, default=60000)
  p.add_argument("--slices-per-series", type=float, default=178.0,
                 help="average slices per series of the target archive")
  p.add_argument("--mb-per-series", type=float, default=73.4,
                 help="average DICOM MB per series (read from the bucket)")
  p.add_argument("--read-mb-s-per-node", type=float, default=150.0,
                 help="sustained bucket read throughput of one worker node")
  p.add_argument("--usd-per-vcpu-hour", type=float, default=0.07)
  p.add_argument("--nodes", default="1,8,32,64")
  p.add_argument("--vcpus-per-node", type=int, default=8)
  p.add_argument("--keep", default=None, help="reuse/keep the corpus here")
  a = p.parse_args()

  import ingest  # bench/ingest.py: the synthetic CT corpus
  from radnet_jax.shards import build

  shape = tuple(int(s) for s in a.shape.split(","))
  tmp = tempfile.mkdtemp(prefix="ingest_scaling_")
  corpus = a.keep or os.path.join(tmp, "corpus")
  if not os.path.isdir(corpus) or not os.listdir(corpus):
    os.makedirs(corpus, exist_ok=True)
    ingest.make_corpus(corpus, a.series, a.min_slices, a.max_slices)
  slices = sum(len(f) for _, _, f in os.walk(corpus))
  rows = []
  try:
    for w in (int(x) for x in a.workers.split(",")):
      out = os.path.join(tmp, f"out{w}")
      shutil.rmtree(out, ignore_errors=True)
      c0, t0 = _cpu(), time.perf_counter()
      s = build.build_shards(corpus, out, shape=shape, workers=w, salt="bench",
                               progress=False, keep_work=False)
      wall, cpu = time.perf_counter() - t0, _cpu() - c0
      n = sum(s["num_records"].values())
      rows.append({"workers": w, "series": n, "slices": slices, "wall": wall,
                   "cpu": cpu, "series_s": n / wall,
                   "cpu_per_100_slices": 100 * cpu / slices})
  finally:
    if not a.keep:
      shutil.rmtree(tmp, ignore_errors=True)

  print(f"corpus: {a.series} CT series, {slices} slices of 512x512, "
        f"shape {shape}, load average {os.getloadavg()[0]:.1f}")
  print("| processes | series | wall s | series/s | speed-up | CPU s | CPU s / 100 slices |")
  print("|---|---|---|---|---|---|---|")
  base = rows[0]
  for r in rows:
    print(f"| {r['workers']} | {r['series']} | {r['wall']:.1f} | {r['series_s']:.3f} | "
          f"{r['series_s'] / base['series_s']:.2f} | {r['cpu']:.1f} | "
          f"{r['cpu_per_100_slices']:.2f} |")
  per_slice = base["cpu"] / base["slices"]
  eff = min(1.0, base["cpu"] / rows[-1]["cpu"]) if len(rows) > 1 else 1.0
  total_cpu_h = a.target * a.slices_per_series * per_slice / 3600
  total_mb = a.target * a.mb_per_series
  print(f"\nprojection: {a.target} series x {a.slices_per_series:.0f} slices "
        f"({total_mb / 1e6:.1f} TB), {per_slice * 1000:.1f} ms CPU/slice, parallel "
        f"efficiency {eff:.2f}, {a.read_mb_s_per_node:.0f} MB/s read per node, "
        f"${a.usd_per_vcpu_hour:.3f}/vCPU-h")
  print(f"total CPU: {total_cpu_h:.1f} vCPU-h")
  print("| nodes | vCPUs | CPU-bound h | read-bound h | wall h | cost $ |")
  print("|---|---|---|---|---|---|")
  for nodes in (int(x) for x in a.nodes.split(",")):
    v = nodes * a.vcpus_per_node
    cpu_h = total_cpu_h / (v * eff)
    io_h = total_mb / (nodes * a.read_mb_s_per_node) / 3600
    wall = max(cpu_h, io_h)
    print(f"| {nodes} | {v} | {cpu_h:.2f} | {io_h:.2f} | {wall:.2f} | "
          f"{v * wall * a.usd_per_vcpu_hour:.1f} |")


if __name__ == "__main__":
  main()
