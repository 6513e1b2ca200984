"""Fault scenarios of the shard converter at archive size: scenario / expected / observed.

  python bench/faults.py [--series 40] [--workers 2]

A phantom archive of ``--series`` patients (the issue asks for 200; the
default is small for a shared machine) is converted once as the reference,
then: killed with SIGKILL at several points and rerun; with one corrupt RLE
file; with a simulated decoder segfault; and with the output on a real tmpfs
too small for it (``mount -t tmpfs``, root only; skipped with a message
where mounting is not allowed), grown once the run stopped, and rerun.
Each rerun must give byte-identical shards to the reference.
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pydicom  # noqa: E402

from radnet_jax import phantom  # noqa: E402
from radnet_jax.cli import flags  # noqa: E402
from radnet_jax.dicom import isolation  # noqa: E402
from radnet_jax.shards import convert  # noqa: E402

SALT = "bench-faults-salt-0123456789abcdef"
SHAPE = "8,32,32"


def _cli(inp, out, workers, env=None):
  cmd = [sys.executable, "-m", "data_prep.build_shards", "--input", inp, "--out", out,
         "--salt", SALT, "--shape", SHAPE, "--workers", str(workers), "--quiet"]
  return subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _run(inp, out, workers, env=None):
  p = _cli(inp, out, workers, env)
  _, err = p.communicate()
  return p.returncode, err


def _shards(out):
  return {os.path.basename(p): open(p, "rb").read()
          for s in convert.SPLITS for p in convert.shard_paths(out, s)}


def _rows(out):
  with open(os.path.join(out, "errors.csv")) as f:
    return [line for line in f.read().splitlines()[1:] if ",scan," not in line]


def _image_series(dicom_dir):
  by = {}
  for p in sorted(glob.glob(os.path.join(dicom_dir, "**", "*"), recursive=True)):
    if os.path.isfile(p):
      try:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
      except pydicom.errors.InvalidDicomError:
        continue
      if "ImagePositionPatient" in ds:
        by.setdefault(str(ds.SeriesInstanceUID), []).append(p)
  return [v for v in by.values() if len(v) > 8]


def main() -> None:
  ap = flags.Parser()
  ap.add_argument("--series", type=int, default=40, help="phantom patients")
  ap.add_argument("--workers", type=int, default=2)
  a = ap.parse_args()
  tmp = tempfile.mkdtemp(prefix="bench_faults_")
  rows = []
  try:
    corpus = os.path.join(tmp, "corpus")
    phantom.make_corpus(corpus, n=a.series, seed=1, small=True, workers=a.workers,
                        progress=False)
    dicom_dir = os.path.join(corpus, "dicom")
    ref = os.path.join(tmp, "ref")
    t0 = time.time()
    code, _ = _run(dicom_dir, ref, a.workers)
    t_ref = time.time() - t0
    ref_shards = _shards(ref)
    n_cache = len(glob.glob(os.path.join(ref, ".work", "*", "*.rec")))
    rows.append(("reference run", "exit 0", f"exit {code}, {n_cache} stacks, {t_ref:.0f} s"))

    # --- kill -9 at several points, then rerun --------------------------------
    for frac in (0.1, 0.5, 0.9):
      out = os.path.join(tmp, f"kill{frac}")
      p = _cli(dicom_dir, out, a.workers)
      while p.poll() is None and len(glob.glob(os.path.join(out, ".work", "*", "*.rec"))) \
          < frac * n_cache:
        time.sleep(0.05)
      p.send_signal(signal.SIGKILL)
      p.wait()
      done = len(glob.glob(os.path.join(out, ".work", "*", "*.rec")))
      code, _ = _run(dicom_dir, out, a.workers)
      same = _shards(out) == ref_shards
      rows.append((f"kill -9 after {done}/{n_cache} stacks, rerun",
                   "exit 0, identical shards", f"exit {code}, identical={same}"))

    # --- a corrupt RLE file and a decoder segfault ---------------------------
    bad = os.path.join(tmp, "bad")
    shutil.copytree(dicom_dir, bad)
    files = min(_image_series(bad), key=len)
    for f in files:
      ds = pydicom.dcmread(f)
      ds.compress(pydicom.uid.RLELossless)
      ds.save_as(f)
    ds = pydicom.dcmread(files[2])
    ds.decompress()
    import numpy as np  # pylint: disable=import-outside-toplevel
    arr, r = ds.pixel_array, ds.Rows
    big = np.zeros((r + 5, ds.Columns), arr.dtype)
    big[:r] = arr
    ds.Rows, ds.PixelData = r + 5, big.tobytes()
    ds.compress(pydicom.uid.RLELossless)
    ds.Rows = r
    ds.save_as(files[2])
    out = os.path.join(tmp, "rle")
    code, _ = _run(bad, out, a.workers)
    errs = _rows(out)
    rows.append(("corrupt RLE file (decoder panic)", f"exit 0, 1 error naming it, "
                 f"{n_cache - 1} records",
                 f"exit {code}, {len(errs)} error(s) "
                 f"{'naming it' if errs and 'PanicException' in errs[0] else ''}, "
                 f"{sum(convert.read_manifest(out)['num_records'].values())} records"))
    out = os.path.join(tmp, "segv")
    code, _ = _run(bad, out, a.workers,
                   {isolation.FAULT_ENV: f"segfault:{os.path.basename(files[2])}"})
    errs = _rows(out)
    rows.append(("decoder segfault on one file", "exit 0, 1 crash row with SIGSEGV",
                 f"exit {code}, {len(errs)} error(s): "
                 f"{'crash SIGSEGV' if errs and 'SIGSEGV' in errs[0] else errs[:1]}"))

    # --- disk full on a real tmpfs -------------------------------------------
    mnt = os.path.join(tmp, "tmpfs")
    os.makedirs(mnt)
    size_kb = max(64, sum(len(v) for v in ref_shards.values()) // 1024 // 2)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", mnt],
                             capture_output=True).returncode == 0
    if not mounted:
      rows.append(("disk full (tmpfs)", "exit 3, then identical shards",
                   "skipped: cannot mount a tmpfs here (needs root)"))
    else:
      try:
        out = os.path.join(mnt, "out")
        code, err = _run(dicom_dir, out, a.workers)
        stop = err.strip().splitlines()[0].split(": ", 2)[-1][:40] if err.strip() else ""
        data_rows = [r for r in (_rows(out) if os.path.exists(os.path.join(out, "errors.csv"))
                                 else []) if "space" in r]
        rows.append((f"disk full ({size_kb} KiB tmpfs)", "exit 3, no data error",
                     f"exit {code}, {len(data_rows)} data rows: {stop}"))
        subprocess.run(["mount", "-o", "remount,size=2g", mnt], check=True)
        code, _ = _run(dicom_dir, out, a.workers)
        rows.append(("space back, rerun", "exit 0, identical shards",
                     f"exit {code}, identical={_shards(out) == ref_shards}"))
      finally:
        subprocess.run(["umount", mnt], capture_output=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  w = [max(len(r[i]) for r in rows + [("scenario", "expected", "observed")])
       for i in range(3)]
  print(f"{'scenario':<{w[0]}} | {'expected':<{w[1]}} | observed")
  print("-" * (sum(w) + 6))
  for r in rows:
    print(f"{r[0]:<{w[0]}} | {r[1]:<{w[1]}} | {r[2]}")


if __name__ == "__main__":
  main()
