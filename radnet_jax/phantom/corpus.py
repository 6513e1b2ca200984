"""``make_corpus``: the synthetic DICOM archive with ground truth.

Layout: ``out_dir/dicom/<patient>/<study>/<random file names>`` (all series of
a study mixed in one folder, as exported archives often are), plus
``out_dir/truth.csv`` and the completion marker ``out_dir/phantom.json``.
Deterministic by seed: UIDs, dates, names and pixels derive from the seed only,
so the same seed gives byte-identical files whatever the worker count.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import time

import numpy as np

from radnet_jax import parallel
from radnet_jax.phantom import acquisition, ct, protocols, truth
from radnet_jax.phantom.anatomy import make_patient
from radnet_jax.phantom.noise import HeaderNoise, corrupt

MARKER = "phantom.json"
# Bumped whenever the same seed gives other images (2: template heads, head protocols;
# 3: CT contrast phases, kernels and dose, body CT display FOV; 4: pre-contrast
# T1 AX of the head and pre / post pairs in MR studies, the head's sinuses,
# arteries, falx, choroid plexus and pituitary, spin-echo flow voids; 5: BOLD
# fMRI (gradient-echo EPI) in brain studies, EPI distortion and T2* dropout
# near air; 6: head MR slabs through part of the brain, coverage of a band
# that fills the scan's range, abdomen-pelvis CT studies; 7: the head coil's
# receive profile on brain MR, the neck fading below the chin);
# the demo cache folder names it, so shards of an older phantom are never reused.
VERSION = 7
CT_AGENTS = ("OMNIPAQUE 350", "ISOVUE-370", "Iohexol", "VISIPAQUE 320", "ULTRAVIST 370")
MR_AGENTS = ("GADAVIST", "DOTAREM", "MAGNEVIST", "gadobutrol", "MultiHance")


@dataclasses.dataclass(frozen=True)
class _Job:
  seed: int
  pid: int
  studies: tuple      # tuple of lists of SeriesPlan
  dicom_dir: str
  noise: HeaderNoise
  max_slices: int
  small: bool
  randomise: bool = False


def _name(rng, style: int) -> str:
  h = "".join(rng.choice(list("0123456789ABCDEF"), 10))
  return (f"IM_{h}", f"{h}.dcm", f"1.3.12.{int(h[:8], 16)}.dcm", h.lower())[style]


# The plan's reconstruction kernel (soft, standard, sharp) as each vendor names it.
_KERNEL_NAMES = {"SIEMENS": ("B20f", "B30f", "B70f"), "GE MEDICAL SYSTEMS": ("SOFT", "STANDARD", "BONE"),
                 "Philips": ("A", "B", "D"), "TOSHIBA": ("FC02", "FC13", "FC30")}


def series_tags(plan, rng) -> dict:
  """Series-level header tags from the plan (before header noise)."""
  t = {"SeriesDescription": plan.description, "ProtocolName": plan.description,
       "BodyPartExamined": plan.body_part}
  if plan.modality == "CT":
    t["ImageType"] = (["DERIVED", "SECONDARY", "REFORMATTED"] if plan.reformat
                      else ["ORIGINAL", "PRIMARY", "AXIAL"])
    t["ConvolutionKernel"] = _KERNEL_NAMES[plan.vendor][ct.KERNELS.index(plan.kernel)]
    t["KVP"] = plan.kvp
    if plan.mas:
      t["Exposure"] = int(round(plan.mas))
    if plan.reformat:
      t["SpacingBetweenSlices"] = plan.spacing
  elif plan.modality == "PT":
    t["ImageType"] = ["ORIGINAL", "PRIMARY"]
  elif plan.epi:
    t["ImageType"] = ["ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW" if plan.b_value else "NONE"]
    t["ScanningSequence"] = ["EP"]
    t["SequenceVariant"] = ["SK", "SP"]
    t["ScanOptions"] = ["FS"]
    t["SequenceName"] = f"*ep_b{int(plan.b_value)}t"
    t["MRAcquisitionType"] = "2D"
    t["DiffusionBValue"] = plan.b_value
    t["EchoTime"], t["RepetitionTime"], t["FlipAngle"] = round(plan.te, 2), round(plan.tr, 1), 90.0
    t["SpacingBetweenSlices"] = plan.spacing
  elif plan.bold:
    t["ImageType"] = ["ORIGINAL", "PRIMARY", "M", "ND"]
    t["ScanningSequence"] = ["EP"]
    t["SequenceVariant"] = ["SK"]
    t["ScanOptions"] = ["FS"]
    t["SequenceName"] = {"SIEMENS": "epfid2d1_64", "Philips": "FEEPI"}.get(plan.vendor, "EPI")
    t["MRAcquisitionType"] = "2D"
    t["EchoTime"], t["RepetitionTime"] = round(plan.te, 2), round(plan.tr, 1)
    t["FlipAngle"] = round(plan.flip, 1)
    t["SpacingBetweenSlices"] = plan.spacing
  else:
    ir = plan.ti is not None
    t["ImageType"] = ["ORIGINAL", "PRIMARY", "M", "ND"]
    if plan.iso3d:   # MPRAGE / IR-FSPGR (IR-prepared GRE), or Philips 3D TFE (GRE)
      t["ScanningSequence"] = ["GR", "IR"] if ir else ["GR"]
      t["SequenceVariant"] = ["SK", "SP", "MP"]
      t["ScanOptions"] = ["IR"] if ir else []
      t["SequenceName"] = "*tfl3d1_16ns" if ir else "T1TFE"
    else:
      t["ScanningSequence"] = (["SE", "IR"] if ir else ["GR"] if plan.gre else ["SE"])
      t["SequenceVariant"] = ["SK", "SP", "MP"] if ir else ["SP", "OSP"] if plan.gre else ["SK", "SP"]
      t["ScanOptions"] = (["FS"] if plan.fat_sat else []) + (["IR"] if ir else [])
      t["SequenceName"] = ("*tir2d1_16" if ir else "*fl3d1" if plan.gre else
                           "*tse2d1_15" if plan.sequence == "T2" else "*se2d1")
    t["MRAcquisitionType"] = "3D" if plan.gre else "2D"
    t["EchoTime"], t["RepetitionTime"] = round(plan.te, 2), round(plan.tr, 1)
    if ir:
      t["InversionTime"] = round(plan.ti, 1)
    t["FlipAngle"] = round(plan.flip, 1)
    t["SpacingBetweenSlices"] = plan.spacing
  if plan.contrast == "yes":
    is_ct = plan.modality == "CT"
    t["ContrastBolusAgent"] = str(rng.choice(CT_AGENTS if is_ct else MR_AGENTS))
    t["ContrastBolusRoute"] = "IV"
    t["ContrastBolusVolume"] = 100.0 if is_ct else 7.5
  elif rng.random() < 0.2:
    t["ContrastBolusAgent"] = ""   # present but empty: common on plain scans
  return t


def _patient_job(job: _Job) -> list:
  """Simulates and writes all studies of one patient -> truth rows + extras."""
  patient = make_patient(np.random.default_rng([job.seed, job.pid, 1]), job.pid)
  rng = np.random.default_rng([job.seed, job.pid, 2])
  pid_text = "PH%06X" % (int(acquisition.uid(job.seed, job.pid, "pid")[5:15]) % 0xFFFFFF)
  pdir = os.path.join(job.dicom_dir, pid_text)
  rows, extras = [], 0
  for s_no, plans in enumerate(job.studies):
    study_no = job.pid * 10 + s_no
    sdir = os.path.join(pdir, "ST%s" % acquisition.uid(job.seed, job.pid, s_no, "dir")[5:13])
    os.makedirs(sdir, exist_ok=True)
    date = "%04d%02d%02d" % (2015 + job.pid % 9, 1 + (job.pid * 7 + s_no) % 12, 1 + (job.pid * 13) % 28)
    ids = {"patient_id": pid_text, "study_no": study_no, "study_uid": acquisition.uid(job.seed, job.pid, s_no),
           "for_uid": acquisition.uid(job.seed, job.pid, s_no, "for")}
    style = int(rng.integers(4))
    for se_no, plan in enumerate(plans):
      ids = dict(ids, series_uid=acquisition.uid(job.seed, job.pid, s_no, se_no), series_no=se_no + 2)
      if job.small:
        plan.matrix = min(plan.matrix, 40)
      # 3D isotropic series keep their 160-192 slices (except in tests' small mode).
      cap = job.max_slices if job.small or not plan.iso3d else max(job.max_slices, 200)
      grid = acquisition.plan_grid(patient, plan, rng, cap)
      img = acquisition.simulate(patient, plan, grid, rng, randomise=job.randomise)
      z_low, z_high = acquisition.grid_z_range(grid)
      row = {"series_uid": ids["series_uid"], "patient_id": pid_text, "modality": plan.modality,
             "sequence": plan.sequence, "plane": plan.plane, "contrast": plan.contrast,
             "coverage": "|".join(truth.coverage(patient.bands, z_low, z_high, plan.region)),
             "spacing": round(grid.spacing[0], 4), "region": plan.region, "n_slices": grid.shape[0],
             "study_uid": ids["study_uid"], "vendor": plan.vendor, "thickness": plan.thickness,
             "tilt_deg": round(plan.tilt_deg, 2), "rows": grid.shape[1], "columns": grid.shape[2],
             "pixel_spacing": round(grid.spacing[1], 4), "fat_sat": int(plan.fat_sat),
             "z_low": round(z_low, 2), "z_high": round(z_high, 2), "field_t": plan.field_t if plan.modality == "MR" else ""}
      tags = series_tags(plan, rng)
      row["header_noise"] = "|".join(corrupt(tags, row, list(plan.alt_descriptions), job.noise, rng))
      order = np.arange(grid.shape[0]) if rng.random() < 0.5 else np.arange(grid.shape[0])[::-1]
      names = [_name(rng, style) for _ in range(grid.shape[0])]
      acquisition.write_series(sdir, names, plan, patient, grid, img, tags, ids, date, order)
      rows.append(row)
    for kind, p in (("localizer", 0.5), ("sr", 0.12), ("gsps", 0.08)):
      if rng.random() < p:
        ids = dict(ids, series_uid=acquisition.uid(job.seed, job.pid, s_no, kind), series_no=1 if kind == "localizer" else 900)
        acquisition.write_extras(sdir, [_name(rng, style) for _ in range(3)], kind, plans[0], patient, ids, date)
        extras += 1
  return [rows, extras]


def plan_corpus(n: int, seed: int, full_size: bool = False) -> list:
  """Splits n image series into patients (1-2 studies each): list of study tuples."""
  rng = np.random.default_rng([seed, 0xC0])
  patients, total = [], 0
  while total < n:
    studies = [protocols.plan_study(rng, full_size) for _ in range(1 if rng.random() < 0.75 else 2)]
    kept = []
    for plans in studies:
      plans = plans[: n - total]
      if plans:
        kept.append(plans)
        total += len(plans)
    patients.append(tuple(kept))
  return patients


def _summary(rows: list, extras: int, seconds: float, out_dir: str) -> dict:
  counts = {k: dict(collections.Counter(r[k] for r in rows)) for k in ("modality", "sequence", "plane", "contrast", "region")}
  counts["coverage"] = dict(collections.Counter(b for r in rows for b in r["coverage"].split("|") if b))
  counts["header_noise"] = dict(collections.Counter(b for r in rows for b in r["header_noise"].split("|") if b))
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(out_dir, "dicom")) for f in fs)
  return {"n_series": len(rows), "n_patients": len({r["patient_id"] for r in rows}), "extra_objects": extras,
          "n_files": sum(r["n_slices"] for r in rows), "bytes": size, "seconds": round(seconds, 2), "counts": counts}


def make_corpus(out_dir: str, n: int = 200, seed: int = 0, *, workers: int | None = None,
                noise: HeaderNoise | None = None, full_size: bool = False, progress: bool = True,
                small: bool = False, randomise: bool = False) -> dict:
  """Writes ``n`` synthetic image series (+ localizers, SR/PR objects) and truth.csv.

  Args:
    out_dir: output folder; ``out_dir/dicom/...`` and ``out_dir/truth.csv``.
    n: number of image series (localizers and non-image objects not counted).
    seed: everything derives from it (same seed -> byte-identical files).
    workers: processes (default: CPU count); patients are the unit of work.
    noise: header-noise rates (default ``HeaderNoise()``; ``HeaderNoise.off()``).
    full_size: clinical matrices/slice counts (512 CT, up to 400 slices).
    progress: tqdm progress bar.
    small: tiny matrices (<= 40) and <= 24 slices, for tests.
    randomise: domain randomisation of MR intensities, bias, blur and noise
      on top of the physics (``physics.mr_image(randomise=True)``).
  Returns:
    summary dict: n_series, n_patients, n_files, bytes, seconds, counts per class.
  Re-running into a complete out_dir with the same parameters reuses it.
  """
  noise = HeaderNoise() if noise is None else noise
  params = {"n": n, "seed": seed, "noise": dataclasses.asdict(noise), "full_size": full_size, "small": small,
            "randomise": bool(randomise), "version": VERSION}
  marker = os.path.join(out_dir, MARKER)
  if os.path.exists(marker):
    with open(marker) as f:
      done = json.load(f)
    if done.get("params") == params:
      return done["summary"]
  t0 = time.time()
  dicom_dir = os.path.join(out_dir, "dicom")
  if os.path.exists(dicom_dir):
    shutil.rmtree(dicom_dir)   # stale or different parameters: rebuild from scratch
  os.makedirs(dicom_dir)
  max_slices = 24 if small else (400 if full_size else 120)
  jobs = [_Job(seed, pid, studies, dicom_dir, noise, max_slices, small, bool(randomise))
          for pid, studies in enumerate(plan_corpus(n, seed, full_size))]
  workers = min(workers or os.cpu_count() or 1, len(jobs))
  results = []
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=n, desc="phantom series", unit="series")
  for res in parallel.imap_unordered(_patient_job, jobs, workers):
    results.append(res)
    if bar:
      bar.update(len(res[0]))
  if bar:
    bar.close()
  rows = [r for res in results for r in res[0]]
  truth.write_truth(os.path.join(out_dir, "truth.csv"), rows)
  summary = _summary(rows, sum(res[1] for res in results), time.time() - t0, out_dir)
  with open(marker, "w") as f:
    json.dump({"params": params, "summary": summary}, f, indent=1, sort_keys=True)
  return summary
