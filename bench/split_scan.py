"""Scan cost of multi-volume series stored one slice per file (issue 15).

  python bench/split_scan.py [--volumes 31] [--slices 30] [--matrix 64] \
      [--styles ge_dti,philips_dwi,canon_dwi,ge_fmri] [--repeat 3] [--keep DIR]

Writes ``radnet_jax.phantom.layouts`` series (b0 + directions, or time
points; one file per slice in each vendor's tag conventions), warms the file
cache, then per series reports the best of ``--repeat`` runs of

* ``scan``: ``radnet_jax.dicom.scan`` of the folder (headers only: the fast
  struct reader for every file, pydicom for one record per volume);
* ``scan_pydicom``: the same with the fast reader switched off (every
  header through pydicom, the path diffusion files took before);
* ``dcm2niix``: ``dcm2niix -z n -b n`` (it also reads the pixels and writes
  the NIfTI: context, not a like-for-like figure);

with the number of 3D volumes each finds (truth, scan stacks, dcm2niix 4th
dimension). Wall seconds; the CPU seconds of this process for the two scans.
"""
from __future__ import annotations

import glob
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from radnet_jax import dicom  # noqa: E402  pylint: disable=wrong-import-position
from radnet_jax.dicom import fastread  # noqa: E402  pylint: disable=wrong-import-position
from radnet_jax.phantom import layouts  # noqa: E402  pylint: disable=wrong-import-position
from radnet_jax.cli import flags  # noqa: E402  pylint: disable=wrong-import-position

SALT = "bench"


def _cpu() -> float:
  ru = resource.getrusage(resource.RUSAGE_SELF)
  return ru.ru_utime + ru.ru_stime


def _best(fn, repeat: int) -> tuple[float, float, object]:
  best = (float("inf"), float("inf"), None)
  for _ in range(repeat):
    t0, c0 = time.perf_counter(), _cpu()
    out = fn()
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    if wall < best[0]:
      best = (wall, cpu, out)
  return best


def _dcm2niix(src: str, repeat: int) -> tuple[float, int]:
  if shutil.which("dcm2niix") is None:
    return float("nan"), -1
  import nibabel as nib  # pylint: disable=import-outside-toplevel
  best, count = float("inf"), 0
  for _ in range(repeat):
    out = tempfile.mkdtemp()
    t0 = time.perf_counter()
    subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-o", out, src],
                   capture_output=True, check=True)
    best = min(best, time.perf_counter() - t0)
    count = 0
    for f in glob.glob(os.path.join(out, "*.nii")):
      shape = nib.load(f).shape
      count += shape[3] if len(shape) > 3 else 1
    shutil.rmtree(out)
  return best, count


def main(argv=None) -> None:
  ap = flags.Parser(description=__doc__, formatter_class=flags.RawDescriptionHelpFormatter)
  ap.add_argument("--volumes", type=int, default=31)
  ap.add_argument("--slices", type=int, default=30)
  ap.add_argument("--matrix", type=int, default=64)
  ap.add_argument("--styles", default="ge_dti,philips_dwi,canon_dwi,ge_fmri")
  ap.add_argument("--repeat", type=int, default=3)
  ap.add_argument("--keep", default=None, help="write the series here and keep them")
  args = ap.parse_args(argv)
  styles = tuple(args.styles.split(","))
  out = args.keep or tempfile.mkdtemp(prefix="split_scan_")
  truth = layouts.make_layouts(out, styles=styles, n_slices=args.slices,
                               rows=args.matrix, cols=args.matrix,
                               n_volumes=args.volumes)
  print(f"{len(styles)} series x {args.volumes} volumes x {args.slices} slices "
        f"of {args.matrix}x{args.matrix} ({len(truth) * args.slices} files)\n")
  print(f"{'style':14s} {'files':>6s} {'truth':>5s} {'stacks':>6s} {'d2n':>4s} "
        f"{'scan s':>7s} {'cpu':>6s} {'pydicom s':>9s} {'cpu':>6s} "
        f"{'x':>5s} {'dcm2niix s':>10s}")
  real_read = fastread.read_header
  for style in styles:
    src = os.path.join(out, "dicom", style)
    n_files = len(os.listdir(src))
    expected = sum(1 for r in truth if r["style"] == style)
    for path in os.listdir(src):   # warm the file cache
      with open(os.path.join(src, path), "rb") as f:
        f.read()
    fast, fast_cpu, res = _best(lambda: dicom.scan(src, salt=SALT), args.repeat)
    fastread.read_header = lambda path: None
    try:
      slow, slow_cpu, slow_res = _best(lambda: dicom.scan(src, salt=SALT),
                                       args.repeat)
    finally:
      fastread.read_header = real_read
    assert len(slow_res.stacks) == len(res.stacks)
    d2n, d2n_vols = _dcm2niix(src, args.repeat)
    print(f"{style:14s} {n_files:6d} {expected:5d} {len(res.stacks):6d} "
          f"{d2n_vols:4d} {fast:7.3f} {fast_cpu:6.3f} {slow:9.3f} "
          f"{slow_cpu:6.3f} {slow / fast:5.1f} {d2n:10.3f}")
  if not args.keep:
    shutil.rmtree(out)


if __name__ == "__main__":
  main()
