"""Ingestion benchmark: our DICOM -> shard record path vs dcm2niix, per series.

  python bench/ingest.py [--series 8] [--min-slices 100] [--max-slices 200] \
      [--shape 48,192,192] [--cpu 0] [--keep DIR] [--path stream|full] [--repeat 1]

Builds a corpus of synthetic 512x512 CT series (int16, explicit VR little
endian, one file per slice, written with pydicom; body ellipse, bone, noise),
then for every series, pinned to one CPU core and with warm file caches:

* dcm2niix: ``dcm2niix -z n`` (no compression), wall time of the process and
  its peak RSS (``os.wait4`` rusage);
* ours: a fresh python process runs scan -> load -> label -> resample +
  normalise -> encode of the full shard record (``radnet_jax.shards.convert``'s own
  functions), timing each stage after imports; peak memory is the growth of
  the process's peak RSS over its post-import baseline, compared with the
  size of one float32 volume of the series. ``--path stream`` (default,
  what ``convert`` runs): ``dicom.stream.load_resampled`` decodes straight
  onto the shard grid, so the "load" column includes the resize and
  "resample" is normalisation + float16; ``--path full``: ``load_volume``
  then ``convert.cache_record``. The last column is a hash of the encoded
  shard record: both paths give the same bytes.

Targets (issue 2): ours within 1.5x of dcm2niix's wall time per series while
also labelling and resampling; peak memory under 2x one volume.

Whole commands (issue 15, fixed cost): after the per-series table, the
whole ``python -m data_prep.build_shards --input DIR --out OUT --workers 1``
(start-up, scan, convert, shards, labels.csv, report, montages) against the
whole ``dcm2niix -z n -b n -o OUT DIR``, on one series and on the archive of
all ``--series`` series, wall and CPU time (children included) of each
process, pinned to the same core, alternating runs (``--repeat``); target:
ours within 1.2x of dcm2niix's wall. ``--whole-only`` skips the per-series
table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from radnet_jax.cli import flags  # noqa: E402  pylint: disable=wrong-import-position


# ----------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------

def _phantom_slice(z: float, rng: np.random.Generator, yy, xx) -> np.ndarray:
  """HU image 512x512: air, a body ellipse (fat rim, soft tissue), spine, noise."""
  img = np.full(yy.shape, -1000.0, np.float32)
  body = (xx / 200.0) ** 2 + (yy / 150.0) ** 2 < 1
  inner = (xx / 185.0) ** 2 + (yy / 135.0) ** 2 < 1
  img[body] = -100.0
  img[inner] = 40.0
  organ = ((xx + 60) / 80.0) ** 2 + ((yy + 20) / (60.0 + 10 * np.sin(z / 30))) ** 2 < 1
  img[organ] = 60.0
  spine = (xx / 20.0) ** 2 + ((yy - 100) / 20.0) ** 2 < 1
  img[spine] = 700.0
  img += rng.normal(0, 12, img.shape).astype(np.float32) * body
  return img


def make_corpus(root: str, n: int, min_slices: int, max_slices: int,
                seed: int = 0) -> list[str]:
  """Writes n CT series (one folder each); returns the folders."""
  import pydicom
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid

  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[-256:256, -256:256].astype(np.float32)
  folders = []
  for s in range(n):
    folder = os.path.join(root, f"series{s:02d}")
    os.makedirs(folder, exist_ok=True)
    slices = int(rng.integers(min_slices, max_slices + 1))
    dz = float(rng.choice([0.625, 1.0, 1.25, 2.5]))
    ps = float(rng.uniform(0.6, 0.9))
    study, series = generate_uid(), generate_uid()
    for i in range(slices):
      z = -dz * i
      hu = _phantom_slice(z, rng, yy, xx)
      meta = FileMetaDataset()
      meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
      meta.MediaStorageSOPInstanceUID = generate_uid()
      meta.TransferSyntaxUID = ExplicitVRLittleEndian
      ds = Dataset()
      ds.file_meta = meta
      ds.SOPClassUID = meta.MediaStorageSOPClassUID
      ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
      ds.PatientName, ds.PatientID = f"BENCH^{s}", f"BENCH{s:04d}"
      ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
      ds.Modality, ds.Manufacturer = "CT", "BENCH"
      ds.StudyDescription = "CT CHEST ABDOMEN PELVIS"
      ds.SeriesDescription = "AX 5mm PORTAL VENOUS +C"
      ds.BodyPartExamined = "ABDOMEN"
      ds.SeriesNumber, ds.InstanceNumber = 2, i + 1
      ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
      ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
      ds.ImagePositionPatient = [-256 * ps, -256 * ps, z]
      ds.PixelSpacing = [ps, ps]
      ds.SliceThickness = dz
      ds.KVP = 120
      ds.ContrastBolusAgent = "OMNIPAQUE"
      ds.Rows = ds.Columns = 512
      ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
      ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
      ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
      ds.PixelData = np.clip(np.rint(hu + 1024), -32768, 32767).astype("<i2").tobytes()
      ds.save_as(os.path.join(folder, f"IM{i:05d}.dcm"), enforce_file_format=True)
    folders.append(folder)
  return folders


# ----------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------

def _pin(cpu: int):
  def fn():
    if hasattr(os, "sched_setaffinity"):
      os.sched_setaffinity(0, {cpu})
  return fn


def _warm(folder: str) -> None:
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), "rb") as f:
      while f.read(1 << 20):
        pass


def run_dcm2niix(folder: str, out: str, cpu: int) -> dict:
  # A fresh folder each run: dcm2niix never overwrites (it adds a suffix
  # letter, and fails after 26 runs).
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(out)
  t0 = time.perf_counter()
  p = subprocess.Popen(["dcm2niix", "-z", "n", "-b", "n", "-o", out, "-f", "vol", folder],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       preexec_fn=_pin(cpu))
  _, status, usage = os.wait4(p.pid, 0)
  wall = time.perf_counter() - t0
  p.returncode = os.waitstatus_to_exitcode(status)
  if p.returncode != 0:
    raise RuntimeError(f"dcm2niix failed on {folder} (exit {p.returncode})")
  return {"seconds": wall, "cpu": usage.ru_utime + usage.ru_stime,
          "peak_mb": usage.ru_maxrss / 1024}


def run_ours(folder: str, shape: str, cpu: int, path: str = "stream") -> dict:
  env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
             MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", folder,
                        "--shape", shape, "--path", path], env=env, capture_output=True, text=True,
                       preexec_fn=_pin(cpu), check=False)
  if out.returncode != 0:
    raise RuntimeError(f"our child failed on {folder}:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def child(folder: str, shape: tuple, profile: bool = False,
          path: str = "stream") -> dict:
  """One series, in this (fresh) process: times per stage, peak RSS growth.

  path "stream": what ``convert`` runs (``dicom.stream.load_resampled``
  decodes straight onto the shard grid; the "load" stage then includes the
  resize and "resample" is normalisation + float16); "full": ``load_volume``
  (full-resolution float32 volume) then ``convert.cache_record``.
  """
  from radnet_jax import dicom, labels
  from radnet_jax.shards import convert
  from radnet_jax.shards import records
  from radnet_jax.dicom import stream as dstream
  from radnet_jax.labels import taxonomy as tx
  import radnet_jax.resample  # noqa: F401 - import cost outside the timing
  base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  prof = None
  if profile:
    import cProfile
    prof = cProfile.Profile()
    prof.enable()
  c0 = time.process_time()
  t = [time.perf_counter()]
  c = [c0]
  res = dicom.scan(folder, salt="bench", workers=1)
  stack = res.stacks[0]
  t.append(time.perf_counter())
  c.append(time.process_time())
  rv = dstream.load_resampled(stack, shape) if path == "stream" else None
  vol = dicom.load_volume(stack) if rv is None else None
  t.append(time.perf_counter())
  c.append(time.process_time())
  shape_in = rv.shape if rv is not None else vol.voxels.shape
  used = "stream" if rv is not None else "full"
  lab = labels.label((rv or vol).record, taxonomy="paper")
  targets = tx.Taxonomy("paper").encode(lab)
  t.append(time.perf_counter())
  c.append(time.process_time())
  if rv is not None:
    cached = convert.resampled_cache_record(stack, rv)
  else:
    cached = convert.cache_record(stack, vol, shape)
  del vol, rv
  t.append(time.perf_counter())
  c.append(time.process_time())
  entry = {"key": stack.key, "md": cached["metadata"], "targets": targets,
           "labels": {k: v.as_text() for k, v in lab.items()},
           "provenance": {k: v.provenance for k, v in lab.items()}}
  data = records.encode(convert.shard_record(cached, entry, "train", "paper"))
  t.append(time.perf_counter())
  c.append(time.process_time())
  cpu = time.process_time() - c0
  if prof is not None:
    prof.disable()
    import pstats
    pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
  peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  # Stages in CPU seconds: robust to other load on the machine.
  stages = dict(zip(("scan", "load", "label", "resample", "encode"), np.diff(c)))
  return {"seconds": t[-1] - t[0], "cpu": cpu, "stages": {k: float(v) for k, v in stages.items()},
          "peak_growth_mb": (peak_kb - base_kb) / 1024, "base_mb": base_kb / 1024,
          "slices": int(shape_in[0]), "shape": list(shape_in),
          "volume_mb": float(np.prod(shape_in)) * 4 / 2**20, "record_mb": len(data) / 2**20,
          "labels": entry["labels"], "path": used, "sha": hashlib.sha256(data).hexdigest()[:16]}


def _timed(cmd: list[str], cpu: int, env: dict | None = None,
           cwd: str | None = None) -> dict:
  """Wall and CPU (user + sys, children included) of one pinned process."""
  t0 = time.perf_counter()
  p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       preexec_fn=_pin(cpu), env=env, cwd=cwd)
  _, status, usage = os.wait4(p.pid, 0)
  wall = time.perf_counter() - t0
  err = p.stderr.read().decode(errors="replace") if p.stderr else ""
  if os.waitstatus_to_exitcode(status) != 0:
    raise RuntimeError(f"{cmd[0]} failed ({status}): {err[-2000:]}")
  return {"seconds": wall, "cpu": usage.ru_utime + usage.ru_stime}


def run_whole(inputs: list[tuple[str, str]], work: str, cpu: int, repeat: int,
              project: str = ROOT) -> list[tuple[str, dict, dict]]:
  """(name, dcm2niix, ours) medians of whole commands on each input folder."""
  env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
             MKL_NUM_THREADS="1", PYTHONPATH=project)
  # As a user runs it: byte-compiled modules cached (one untimed run first).
  env.pop("PYTHONDONTWRITEBYTECODE", None)
  warm = os.path.join(work, "whole_warm")
  shutil.rmtree(warm, ignore_errors=True)
  _timed([sys.executable, "-m", "data_prep.build_shards", "--input", inputs[0][1],
          "--out", warm, "--workers", "1"], cpu, env, project)
  rows = []
  for name, folder in inputs:
    runs_d, runs_o = [], []
    for k in range(repeat):
      out_d = os.path.join(work, "whole_nii", f"{name}_{k}")
      out_o = os.path.join(work, "whole_shards", f"{name}_{k}")
      for out in (out_d, out_o):
        shutil.rmtree(out, ignore_errors=True)
      os.makedirs(out_d)
      runs_d.append(_timed(["dcm2niix", "-z", "n", "-b", "n", "-o", out_d, folder], cpu))
      runs_o.append(_timed([sys.executable, "-m", "data_prep.build_shards", "--input",
                            folder, "--out", out_o, "--workers", "1"], cpu, env,
                           project))
    rows.append((name, _median(runs_d), _median(runs_o)))
  return rows


def _median(runs: list[dict]) -> dict:
  """Per-field median of repeated runs of one series (times, stages, peaks)."""
  out = dict(runs[0])
  for key, value in runs[0].items():
    if isinstance(value, float):
      out[key] = float(np.median([r[key] for r in runs]))
  if "stages" in out:
    out["stages"] = {k: float(np.median([r["stages"][k] for r in runs]))
                     for k in runs[0]["stages"]}
  return out


def main() -> None:
  p = flags.Parser(description=__doc__.split("\n\n")[0])
  p.add_argument("--series", type=int, default=8)
  p.add_argument("--min-slices", type=int, default=100)
  p.add_argument("--max-slices", type=int, default=200)
  p.add_argument("--shape", default="48,192,192")
  p.add_argument("--cpu", type=int, default=None, help="core to pin to (default: last)")
  p.add_argument("--keep", default=None, help="build/keep the corpus here")
  p.add_argument("--repeat", type=int, default=1,
                 help="runs per series (dcm2niix and ours alternately); the "
                      "table shows per-series medians")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  p.add_argument("--path", choices=("stream", "full"), default="stream",
                 help="stream: decode onto the shard grid (what convert runs); "
                      "full: load_volume + cache_record")
  p.add_argument("--profile", action="store_true",
                 help="cProfile our path on the first series (to stderr)")
  p.add_argument("--whole-only", action="store_true",
                 help="only the whole-command rows (start-up included)")
  p.add_argument("--project", default=ROOT,
                 help="checkout whose data_prep.build_shards the whole-command "
                      "rows run (a before / after figure)")
  args = p.parse_args()
  shape = tuple(int(s) for s in args.shape.split(","))
  if args.child:
    print(json.dumps(child(args.child, shape, args.profile, args.path)))
    return
  if not shutil.which("dcm2niix"):
    sys.exit("dcm2niix not found (apt-get install dcm2niix)")
  cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
  work = args.keep or tempfile.mkdtemp(prefix="radnet_ingest_")
  corpus = os.path.join(work, "dicom")
  t0 = time.perf_counter()
  if os.path.isdir(corpus) and len(os.listdir(corpus)) >= args.series:
    folders = sorted(os.path.join(corpus, d) for d in os.listdir(corpus))[:args.series]
  else:
    folders = make_corpus(corpus, args.series, args.min_slices, args.max_slices)
  print(f"corpus: {len(folders)} CT series of 512x512 in {time.perf_counter() - t0:.0f} s "
        f"({work}); pinned to cpu {cpu}; shape {shape}; path {args.path}; "
        f"median of {args.repeat} run(s) per series")
  if args.profile:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=ROOT)
    subprocess.run([sys.executable, os.path.abspath(__file__), "--child", folders[0],
                    "--shape", args.shape, "--path", args.path, "--profile"], env=env, check=True,
                   preexec_fn=_pin(cpu))
  load0 = os.getloadavg()[0]
  whole = run_whole([("1 series", folders[0]), (f"{len(folders)} series", corpus)],
                    work, cpu, args.repeat, args.project)
  print("| whole command | dcm2niix wall s | ours wall s | wall ratio | "
        "dcm2niix cpu s | ours cpu s | cpu ratio |")
  print("|---|---|---|---|---|---|---|")
  for name, d, o in whole:
    print(f"| {name} | {d['seconds']:.2f} | {o['seconds']:.2f} | "
          f"{o['seconds'] / d['seconds']:.2f} | {d['cpu']:.2f} | {o['cpu']:.2f} | "
          f"{o['cpu'] / max(d['cpu'], 1e-3):.2f} |")
  print("(whole: python -m data_prep.build_shards --workers 1 vs dcm2niix -z n -b n; "
        "target wall ratio <= 1.2)\n")
  if args.whole_only:
    print(f"load average: {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, "
          f"on {os.cpu_count()} cores")
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)
    return
  rows = []
  for folder in folders:
    _warm(folder)
    runs_d, runs_o = [], []
    for _ in range(args.repeat):   # alternate, so both see the same load
      runs_d.append(run_dcm2niix(folder, os.path.join(work, "nii", os.path.basename(folder)),
                                 cpu))
      runs_o.append(run_ours(folder, args.shape, cpu, args.path))
    rows.append((os.path.basename(folder), _median(runs_d), _median(runs_o)))
  hdr = (f"| series | slices | volume MB | dcm2niix s | ours s | ours/dcm2niix | "
         f"dcm2niix cpu s | ours cpu s | cpu ratio | "
         f"scan cpu | load cpu | label cpu | resample cpu | encode cpu | ours peak MB | peak/volume | "
         f"dcm2niix peak MB | path | record sha256 |")
  print(hdr)
  print("|---" * (hdr.count("|") - 1) + "|")
  for name, d, o in rows:
    st = o["stages"]
    print(f"| {name} | {o['slices']} | {o['volume_mb']:.0f} | {d['seconds']:.2f} | "
          f"{o['seconds']:.2f} | {o['seconds'] / d['seconds']:.2f} | "
          f"{d['cpu']:.2f} | {o['cpu']:.2f} | {o['cpu'] / d['cpu']:.2f} | "
          f"{st['scan']:.2f} | {st['load']:.2f} | {st['label']:.3f} | "
          f"{st['resample']:.2f} | {st['encode']:.3f} | {o['peak_growth_mb']:.0f} | "
          f"{o['peak_growth_mb'] / o['volume_mb']:.2f} | {d['peak_mb']:.0f} | "
          f"{o['path']} | {o['sha']} |")
  tot_d = sum(d["seconds"] for _, d, _ in rows)
  tot_o = sum(o["seconds"] for _, _, o in rows)
  worst_peak = max(o["peak_growth_mb"] / o["volume_mb"] for _, _, o in rows)
  ratios = [o["seconds"] / d["seconds"] for _, d, o in rows]
  cpu_d = sum(d["cpu"] for _, d, _ in rows)
  cpu_o = sum(o["cpu"] for _, _, o in rows)
  print(f"\ntotal: dcm2niix {tot_d:.2f} s, ours {tot_o:.2f} s, ratio {tot_o / tot_d:.2f} "
        f"(median per series {np.median(ratios):.2f}; target <= 1.5); cpu time: "
        f"dcm2niix {cpu_d:.2f} s, ours {cpu_o:.2f} s, ratio {cpu_o / cpu_d:.2f}; "
        f"series/s ours {len(rows) / tot_o:.2f}, dcm2niix {len(rows) / tot_d:.2f}; "
        f"worst peak/volume {worst_peak:.2f} (target < 2); "
        f"python baseline after imports {rows[0][2]['base_mb']:.0f} MB")
  print(f"load average: {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, "
        f"on {os.cpu_count()} cores")
  print(f"labels of series 0: {rows[0][2]['labels']}")
  if not args.keep:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
