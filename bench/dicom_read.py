"""DICOM read benchmark: scan and load_volume vs dcm2niix on the same series.

  python bench/dicom_read.py [--slices 150] [--series 2] [--repeat 3] \
      [--keep DIR] [--profile] [--phantom N] [--full]

Writes synthetic 512x512 int16 CT series with pydicom (explicit VR little
endian, one file per slice, RescaleIntercept -1024), warms the file cache,
then per series reports the best of ``--repeat`` runs (in this process) of

* ``scan``: ``radnet_jax.dicom.scan`` of the series folder (headers only);
* ``load``: ``radnet_jax.dicom.load_volume`` of its stack;
* ``full``: with ``--full``, also labels + ``convert.cache_record`` (the
  resample to the shard shape), i.e. the converter's per-stack path;
* ``dcm2niix``: ``dcm2niix -z n`` as a subprocess (wall and CPU from rusage).

Times are wall seconds and CPU seconds (CPU is the robust figure on a loaded
machine). Peak memory of ``load_volume`` is measured with tracemalloc (numpy
allocations are traced) in a separate run, as a multiple of one float32
volume. ``--profile`` prints the top of a cProfile of scan + load on the first
series; ``--phantom N`` also scans + loads every stack of a
``radnet_jax.phantom.make_corpus`` archive of N patients.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from radnet_jax import dicom  # noqa: E402  pylint: disable=wrong-import-position
from radnet_jax.cli import flags  # noqa: E402  pylint: disable=wrong-import-position

SALT = "bench"


def write_ct_series(folder: str, slices: int, seed: int = 0,
                    rotated: bool = False) -> None:
  """One axial CT series of (slices, 512, 512) int16 files, HU = stored - 1024.

  ``rotated``: rows and columns run the other way (IOP -1,0,0,0,-1,0, as in
  prone scans), so the canonical reorientation flips H and W.
  """
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[-256:256, -256:256].astype(np.float32)
  body = (xx / 200.0) ** 2 + (yy / 150.0) ** 2 < 1
  study, series = generate_uid(), generate_uid()
  for i in range(slices):
    hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 12, body.shape) * body
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = "BENCH^READ", f"BENCH{seed:04d}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.Manufacturer = "CT", "BENCH"
    ds.StudyDescription, ds.SeriesDescription = "CT ABDOMEN", "AX 1.25mm +C"
    ds.BodyPartExamined = "ABDOMEN"
    ds.SeriesNumber, ds.InstanceNumber = 2, i + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    if rotated:
      ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
      ds.ImagePositionPatient = [180.0, 180.0, -1.25 * i]
    else:
      ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
      ds.ImagePositionPatient = [-180.0, -180.0, -1.25 * i]
    ds.PixelSpacing = [0.703125, 0.703125]
    ds.SliceThickness = 1.25
    ds.KVP = 120
    ds.Rows = ds.Columns = 512
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = np.rint(hu + 1024).astype("<i2").tobytes()
    # Shuffled names: scan must sort by position, not by name.
    name = f"IM{(i * 7919) % 100003:06d}.dcm"
    ds.save_as(os.path.join(folder, name), enforce_file_format=True)


def _warm(folder: str) -> None:
  for dirpath, _, names in os.walk(folder):
    for name in names:
      with open(os.path.join(dirpath, name), "rb") as f:
        while f.read(1 << 22):
          pass


def _timed(fn):
  w, c = time.perf_counter(), time.process_time()
  out = fn()
  return out, time.perf_counter() - w, time.process_time() - c


def _best(fn, repeat: int):
  best = None
  for _ in range(repeat):
    out, wall, cpu = _timed(fn)
    if best is None or cpu < best[2]:
      best = (out, wall, cpu)
  return best


def run_dcm2niix(folder: str, out: str) -> tuple[float, float]:
  """(wall s, cpu s) of ``dcm2niix -z n`` on ``folder``."""
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(out)
  t0 = time.perf_counter()
  p = subprocess.Popen(["dcm2niix", "-z", "n", "-b", "n", "-o", out, "-f", "v", folder],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _, status, usage = os.wait4(p.pid, 0)
  wall = time.perf_counter() - t0
  if os.waitstatus_to_exitcode(status) != 0:
    raise RuntimeError(f"dcm2niix failed on {folder}")
  return wall, usage.ru_utime + usage.ru_stime


def load_peak_ratio(stack) -> float:
  """Peak traced memory of load_volume / bytes of the returned volume."""
  tracemalloc.start()
  vol = dicom.load_volume(stack)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  return peak / vol.voxels.nbytes


def full_path(stack, shape=(48, 192, 192)):
  """The converter's per-stack work: load, label, resample (cache_record)."""
  from radnet_jax import labels
  from radnet_jax.shards import convert  # pylint: disable=import-outside-toplevel
  vol = dicom.load_volume(stack)
  labels.label(vol.record, taxonomy="paper")
  return convert.cache_record(stack, vol, shape)


def main() -> None:
  p = flags.Parser(description=__doc__.split("\n\n")[0])
  p.add_argument("--slices", type=int, default=150)
  p.add_argument("--series", type=int, default=2)
  p.add_argument("--repeat", type=int, default=3)
  p.add_argument("--keep", default=None, help="build/keep the corpus here")
  p.add_argument("--profile", action="store_true")
  p.add_argument("--rotated", action="store_true",
                 help="IOP -1,0,0,0,-1,0 (reorientation flips H and W)")
  p.add_argument("--full", action="store_true",
                 help="also time load + label + resample (convert.cache_record)")
  p.add_argument("--phantom", type=int, default=0,
                 help="also scan+load a phantom corpus of N patients")
  args = p.parse_args()
  work = args.keep or tempfile.mkdtemp(prefix="radnet_dicom_read_")
  folders = []
  for s in range(args.series):
    folder = os.path.join(work, f"ct{args.slices}{'r' if args.rotated else ''}_{s}")
    if not os.path.isdir(folder) or len(os.listdir(folder)) != args.slices:
      shutil.rmtree(folder, ignore_errors=True)
      write_ct_series(folder, args.slices, seed=s, rotated=args.rotated)
    folders.append(folder)
  has_d2n = shutil.which("dcm2niix") is not None
  print(f"{args.series} CT series of {args.slices}x512x512 int16 "
        f"{'(rotated IOP) ' if args.rotated else ''}in {work}; "
        f"best of {args.repeat}; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores")

  if args.profile:
    import cProfile  # pylint: disable=import-outside-toplevel
    import pstats  # pylint: disable=import-outside-toplevel
    _warm(folders[0])
    prof = cProfile.Profile()
    prof.enable()
    st = dicom.scan(folders[0], salt=SALT).stacks[0]
    (full_path(st) if args.full else dicom.load_volume(st))
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)

  hdr = ("| series | scan s | scan cpu | load s | load cpu | load peak/vol |"
         + (" full s | full cpu |" if args.full else "")
         + " dcm2niix s | dcm2niix cpu | (scan+load)/dcm2niix cpu |")
  print(hdr)
  print("|---" * (hdr.count("|") - 1) + "|")
  for folder in folders:
    _warm(folder)
    res, s_wall, s_cpu = _best(lambda f=folder: dicom.scan(f, salt=SALT), args.repeat)
    stack = res.stacks[0]
    _, l_wall, l_cpu = _best(lambda st=stack: dicom.load_volume(st), args.repeat)
    peak = load_peak_ratio(stack)
    row = (f"| {os.path.basename(folder)} | {s_wall:.3f} | {s_cpu:.3f} | {l_wall:.3f} | "
           f"{l_cpu:.3f} | {peak:.2f} |")
    if args.full:
      _, f_wall, f_cpu = _best(lambda st=stack: full_path(st), args.repeat)
      row += f" {f_wall:.3f} | {f_cpu:.3f} |"
    if has_d2n:
      d = min((run_dcm2niix(folder, os.path.join(work, "nii")) for _ in range(args.repeat)),
              key=lambda x: x[1])
      row += f" {d[0]:.3f} | {d[1]:.3f} | {(s_cpu + l_cpu) / d[1]:.2f} |"
    else:
      row += " n/a | n/a | n/a |"
    print(row)

  if args.phantom:
    from radnet_jax import phantom  # pylint: disable=import-outside-toplevel
    pdir = os.path.join(work, f"phantom{args.phantom}")
    if not os.path.isdir(pdir):
      phantom.make_corpus(pdir, n=args.phantom, seed=0, workers=1)
    _warm(pdir)
    res, s_wall, s_cpu = _timed(lambda: dicom.scan(pdir, salt=SALT))
    nfiles = sum(len(n) for _, _, n in os.walk(pdir))

    def load_all():
      ok = 0
      for st in res.stacks:
        try:
          dicom.load_volume(st)
          ok += 1
        except dicom.DicomError:
          pass
      return ok
    ok, l_wall, l_cpu = _timed(load_all)
    print(f"\nphantom corpus ({args.phantom} patients, {nfiles} files, "
          f"{len(res.stacks)} stacks, {len(res.skipped)} skipped): "
          f"scan {s_wall:.2f} s ({s_cpu:.2f} cpu, {1e3 * s_cpu / nfiles:.2f} ms/file), "
          f"load {ok} volumes {l_wall:.2f} s ({l_cpu:.2f} cpu)")
  if not args.keep:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
