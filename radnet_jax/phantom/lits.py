"""Liver segmentation set in the LiTS layout (``volume-N.nii.gz``, ``segmentation-N.nii.gz``).

Abdominal CT of phantom patients (``phantom.body``: lobulated livers with
vessels, steatosis in some, lesions in most), int16 HU like LiTS, with masks
0 background, 1 liver (parenchyma and intrahepatic vessels), 2 tumour. Cases
differ as real LiTS scans do: contrast phase (none, arterial, portal venous,
delayed) with per-patient enhancement, tube load and kVp (noise), kernel,
slice thickness, FOV 350-450 mm and the scan range. The neighbours of the liver
overlap its HU (spleen, kidney cortex, collapsed bowel, muscle, heart), so the
liver is not a threshold away. NIfTI is RAS, so the affine is the LPS
voxel->mm matrix with X and Y negated. The data array is indexed (x=column,
y=row, z=slice) like the LiTS files read with nibabel.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from radnet_jax import parallel
from radnet_jax.phantom import acquisition, ct, physics
from radnet_jax.phantom.anatomy import T, Grid, make_patient, render_labels
from radnet_jax.phantom.protocols import SeriesPlan

MARKER = "lits.json"
VERSION = 2   # 2: phantom.body anatomy, phases, kernels, dose (1: ellipsoid abdomen)
LIVER = ("liver", "liver_portal", "liver_vein")
TUMOUR = ("lesion", "lesion_hyper")
# (phase or None for plain CT, probability): LiTS is mostly portal venous
PHASE_MIX = ((None, 0.15), ("arterial", 0.15), ("portal", 0.6), ("delayed", 0.1))
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def grid_affine(grid: Grid) -> np.ndarray:
  """4x4 LPS affine mapping (column j, row i, slice k, 1) -> mm."""
  a = np.eye(4)
  a[:3, 0] = grid.r * grid.spacing[2]
  a[:3, 1] = grid.c * grid.spacing[1]
  a[:3, 2] = grid.n * grid.spacing[0]
  a[:3, 3] = grid.origin
  return a


def masks(labels: np.ndarray) -> np.ndarray:
  """LiTS mask (uint8: 0 background, 1 liver incl. intrahepatic vessels, 2 tumour) of a tissue-label map."""
  seg = np.zeros(labels.shape, np.uint8)
  seg[np.isin(labels, [T[t] for t in LIVER])] = 1
  seg[np.isin(labels, [T[t] for t in TUMOUR])] = 2
  return seg


def lits_case(seed: int, case: int, full_size: bool = False, small: bool = False):
  """One case -> (hu int16 (X, Y, Z), seg uint8 (X, Y, Z), RAS affine, info dict)."""
  rng = np.random.default_rng([seed, case, 0x11])
  n_les = int(rng.choice([0, 1, 1, 2, 3, 4, 6]))
  patient = make_patient(np.random.default_rng([seed, case, 0x12]), case, lesions=n_les)
  phase = PHASE_MIX[int(rng.choice(len(PHASE_MIX), p=[p for _, p in PHASE_MIX]))][0]
  contrast = phase is not None
  thick = float(rng.choice([0.7, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0]))
  kernel = str(rng.choice(ct.KERNELS, p=[0.3, 0.6, 0.1]))
  kvp = float(rng.choice([100.0, 120.0, 120.0, 140.0]))
  mas = float(rng.uniform(80, 350))
  if full_size:
    matrix, lo, hi = 512, 75, 987
  elif small:
    matrix, lo, hi = 48, 16, 24
  else:
    matrix, lo, hi = int(rng.choice([128, 144, 160])), 40, 100
  plan = SeriesPlan("CT", "CT", "AX", "yes" if contrast else "no", "abdomen", "SIEMENS", thick, thick, matrix, 0.0)
  b = patient.bands
  z_low = b["kidney"][0] - rng.uniform(10, 60) if rng.random() < 0.7 else b["pelvis"][0] - rng.uniform(0, 30)
  z_high = b["liver"][1] + rng.uniform(10, 40) if rng.random() < 0.8 else b["lung"][1] - rng.uniform(0, 60)
  fov = ct.abdominal_fov(rng, patient.half_width, patient.half_depth)
  ps = fov / matrix
  k = int(np.clip(np.floor((z_high - z_low) / thick) + 1, lo, hi))
  sp = (z_high - z_low) / (k - 1)
  r, c, n = np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0])
  origin = np.array([-(matrix - 1) / 2 * ps + rng.normal(0, 3), -(matrix - 1) / 2 * ps + 8, z_low])
  grid = Grid(origin=origin, r=r, c=c, n=n, spacing=(sp, ps, ps), shape=(k, matrix, matrix))
  lab = render_labels(patient, grid)
  diameter = 2.0 * float(np.sqrt(patient.half_width * patient.half_depth))
  hu = physics.ct_image(lab, contrast, rng, spacing=grid.spacing, thickness=max(thick, sp), noise_hu=None,
                        phase=phase or "portal", kernel=kernel, mas=mas, kvp=kvp,
                        diameter_mm=diameter, patient_ct=patient.ct)
  # Whole HU once, for the NIfTI and the DICOM writer alike (float32 img + 1024 would
  # round a few x.5-ish values differently than the NIfTI's np.round(img)).
  hu = np.round(hu).astype(np.float32)
  seg = masks(lab)
  to_xyz = lambda a: np.ascontiguousarray(a.transpose(2, 1, 0))
  info = {"case": case, "contrast": "yes" if contrast else "no", "phase": phase or "none", "kernel": kernel,
          "kvp": kvp, "mas": round(mas, 1), "steatosis": patient.ct["offsets"]["liver"] < -10,
          "spacing": [ps, ps, round(sp, 4)],
          "shape": [matrix, matrix, k], "lesions": n_les, "liver_voxels": int((seg == 1).sum()),
          "tumour_voxels": int((seg == 2).sum())}
  return (to_xyz(np.round(hu).astype(np.int16)), to_xyz(seg), LPS_TO_RAS @ grid_affine(grid), info,
          (patient, plan, grid, hu))


def _job(args) -> dict:
  out_dir, seed, case, full_size, small, dicom = args
  import nibabel as nib
  hu, seg, affine, info, (patient, plan, grid, hu_kij) = lits_case(seed, case, full_size, small)
  if dicom:
    # CT DICOM stores HU in [-1024, 3071] (12-bit, intercept -1024): give the
    # NIfTI the same values, so both inputs describe the same case exactly.
    hu = np.clip(hu, -1024, 3071)
  for name, arr in ((f"volume-{case}.nii.gz", hu), (f"segmentation-{case}.nii.gz", seg)):
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    nib.save(img, os.path.join(out_dir, name))
  if dicom:
    folder = os.path.join(out_dir, "dicom", f"case-{case}")
    os.makedirs(folder, exist_ok=True)
    plan.description = {"arterial": "Abdomen arterial 1.0 B30f", "portal": "Abdomen PV 1.0 B30f",
                        "delayed": "Abdomen delayed 1.0 B30f"}.get(info["phase"], "Abdomen 5.0 B30f")
    plan.body_part, plan.study_description = "ABDOMEN", "CT ABDOMEN"
    ids = {"patient_id": f"LITS{case:04d}", "study_no": case, "study_uid": acquisition.uid(seed, "lits", case),
           "for_uid": acquisition.uid(seed, "lits", case, "for"), "series_uid": acquisition.uid(seed, "lits", case, 1),
           "series_no": 2}
    tags = {"SeriesDescription": plan.description, "BodyPartExamined": "ABDOMEN",
            "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}
    if plan.contrast == "yes":
      tags.update(ContrastBolusAgent="OMNIPAQUE 350", ContrastBolusRoute="IV")
    k = grid.shape[0]
    paths = acquisition.write_series(folder, [f"IM{i:04d}.dcm" for i in range(k)], plan, patient, grid,
                                     hu_kij, tags, ids, "20200101", np.arange(k))
    from radnet_jax.dicom import seg_write  # pylint: disable=import-outside-toplevel
    kij = grid_affine(grid)[:, [2, 1, 0, 3]]   # (slice k, row i, column j) -> LPS mm
    seg_write.write_seg(seg.transpose(2, 1, 0), kij, paths, os.path.join(folder, "SEG.dcm"),
                        series_description="Liver reference (phantom truth)")
  return info


def make_lits(out_dir: str, n: int = 20, seed: int = 0, *, workers: int | None = None,
              progress: bool = True, dicom: bool = False, full_size: bool = False,
              small: bool = False) -> dict:
  """Writes n LiTS-layout cases (NIfTI volume + segmentation) into out_dir.

  Default sizes are scaled down for CPU demos (128-160 in-plane, 40-100
  slices); ``full_size`` gives 512 in-plane and LiTS slice counts; ``small``
  tiny cases for tests. ``dicom=True`` also writes each case as a CT DICOM
  series ``out_dir/dicom/case-N/IM*.dcm`` plus its reference mask as a DICOM
  SEG ``out_dir/dicom/case-N/SEG.dcm`` (segments Liver and Tumour); the
  NIfTI volumes then hold the same HU as the DICOM (clipped to [-1024, 3071]).
  Returns {"cases": [info...], "seconds": s}; idempotent via ``lits.json``.
  """
  params = {"n": n, "seed": seed, "dicom": dicom, "full_size": full_size, "small": small, "version": VERSION}
  if dicom:
    params["dicom_seg"] = True   # dicom=True folders from before the SEG are redone
  marker = os.path.join(out_dir, MARKER)
  if os.path.exists(marker):
    with open(marker) as f:
      done = json.load(f)
    if done.get("params") == params:
      return done["summary"]
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  args = [(out_dir, seed, i, full_size, small, dicom) for i in range(n)]
  workers = min(workers or os.cpu_count() or 1, max(n, 1))
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=n, desc="lits cases", unit="case")
  infos = []
  for info in parallel.imap_unordered(_job, args, workers):
    infos.append(info)
    if bar:
      bar.update()
  if bar:
    bar.close()
  summary = {"cases": sorted(infos, key=lambda d: d["case"]), "seconds": round(time.time() - t0, 2)}
  with open(marker, "w") as f:
    json.dump({"params": params, "summary": summary}, f, indent=1)
  return summary
