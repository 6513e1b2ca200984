"""Study and series planning: realistic protocols, vendor-style descriptions.

A study (one modality, one region, one vendor) is a list of ``SeriesPlan``;
the plan holds the true labels (sequence, plane, contrast, region) and the
acquisition parameters that the physics and the DICOM writer use. Sampling
weights are tuned so that a 200-series corpus holds every paper sequence class
(>= 10 % each), every plane (>= 15 % each), both contrast states and every
coverage band; PET is rarer.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from radnet_jax.phantom import ct

VENDORS = ("SIEMENS", "GE MEDICAL SYSTEMS", "Philips", "TOSHIBA")
# (modality, region, weight)
STUDY_TYPES = (
    ("CT", "brain", 0.05), ("CT", "headneck", 0.04), ("CT", "chest", 0.06),
    ("CT", "abdomen", 0.03), ("CT", "abdpelvis", 0.06), ("CT", "pelvis", 0.03), ("CT", "cap", 0.07),
    ("CT", "wholebody", 0.02),
    ("MR", "brain", 0.40), ("MR", "headneck", 0.05), ("MR", "abdomen", 0.09),
    ("MR", "pelvis", 0.06), ("PT", "wholebody", 0.05), ("PT", "cap", 0.04),
)
BODY_PART = {"brain": ("HEAD", "BRAIN"), "headneck": ("HEADNECK", "NECK"), "chest": ("CHEST",),
             "abdomen": ("ABDOMEN",), "abdpelvis": ("ABDOMENPELVIS", "ABDPELVIS"), "pelvis": ("PELVIS",), "cap": ("CHESTABDPELVIS",),
             "wholebody": ("WHOLEBODY",)}
STUDY_DESC = {"brain": "BRAIN", "headneck": "NECK", "chest": "CHEST", "abdomen": "ABDOMEN",
              "abdpelvis": "ABDOMEN PELVIS",
              "pelvis": "PELVIS", "cap": "CHEST ABDOMEN PELVIS", "wholebody": "WHOLE BODY"}


@dataclasses.dataclass
class SeriesPlan:
  """One acquisition: true labels plus acquisition parameters.

  spacing: slice spacing mm; thickness: slice thickness mm; matrix: in-plane
  size (max of rows/cols); fov_margin: FOV scale around the target; tilt_deg:
  obliquity (rotation of the slice axes) in degrees.
  """
  modality: str
  sequence: str
  plane: str
  contrast: str
  region: str
  vendor: str
  spacing: float
  thickness: float
  matrix: int
  tilt_deg: float
  fat_sat: bool = False
  tr: float | None = None
  te: float | None = None
  ti: float | None = None
  flip: float | None = None
  gre: bool = False
  reformat: bool = False
  field_t: float = 1.5      # MR field strength (T)
  fov: float = 0.0          # in-plane field of view (mm); 0 = from the anatomy (body)
  phase_ratio: float = 1.0  # rows / columns of the FOV (rectangular FOV)
  slab: float = 0.0         # extent along the slice normal (mm); 0 = from the anatomy
  iso3d: bool = False       # 3D isotropic acquisition (MPRAGE / IR-FSPGR / 3D TFE)
  epi: bool = False         # echo-planar diffusion (DWI / DTI)
  bold: bool = False        # gradient-echo EPI (BOLD fMRI), T2*-weighted; sequence "other"
  b_value: float = 0.0      # diffusion weighting (s/mm2) of an EPI series
  phase: str = ""           # CT contrast phase: "arterial", "portal", "delayed" ("" = no contrast)
  kernel: str = "standard"  # CT reconstruction kernel: "soft", "standard", "sharp" (phantom.ct)
  kvp: float = 120.0        # CT tube voltage
  mas: float = 0.0          # CT tube current-time product; 0 = a fixed noise level
  description: str = ""
  alt_descriptions: tuple = ()
  body_part: str = ""
  study_description: str = ""


def _mr_params(seq: str, rng, gre: bool) -> dict:
  u = rng.uniform
  if seq == "T1":
    if gre:
      return dict(tr=u(4.0, 200.0), te=u(2.0, 4.6), ti=None, flip=u(10, 70))
    return dict(tr=u(400, 650), te=u(8, 15), ti=None, flip=90.0)
  if seq == "T2":
    return dict(tr=u(3000, 6000), te=u(85, 115), ti=None, flip=90.0)
  if seq == "T2-FLAIR":
    tr = u(8000, 10000)
    ti = 4000.0 * np.log(2.0 / (1.0 + np.exp(-tr / 4000.0))) * u(0.95, 1.05)
    return dict(tr=tr, te=u(100, 140), ti=float(ti), flip=90.0)
  if seq == "T1-FLAIR":
    return dict(tr=u(1800, 2500), te=u(8, 20), ti=u(750, 900), flip=90.0)
  raise ValueError(seq)


_SIEMENS = {"T1": "t1_se", "T2": "t2_tse", "T2-FLAIR": "t2_tirm", "T1-FLAIR": "t1_tirm"}
_GE = {"T1": "T1 SE", "T2": "T2 FRFSE", "T2-FLAIR": "T2 FLAIR", "T1-FLAIR": "T1 FLAIR"}
_PHILIPS = {"T1": "T1W_SE", "T2": "T2W_TSE", "T2-FLAIR": "T2W_FLAIR", "T1-FLAIR": "T1W_IR"}
_TOSHIBA = {"T1": "T1 SE", "T2": "T2 FSE", "T2-FLAIR": "FLAIR", "T1-FLAIR": "T1 FLAIR"}


def describe(p: SeriesPlan, rng) -> str:
  """A vendor-style SeriesDescription (several styles per vendor)."""
  post = p.contrast == "yes"
  if p.modality == "PT":
    return str(rng.choice(["PET WB AC", "WB 3D MAC", "PET AC 3D", "PET Body AC"]))
  if p.modality == "CT":
    region_word = {"brain": "Head", "headneck": "Neck", "chest": "Thorax", "abdomen": "Abdomen",
                   "abdpelvis": "AbdPelvis",
                   "pelvis": "Pelvis", "cap": "ThorAbdPel", "wholebody": "WB"}[p.region]
    pl = {"AX": "Ax", "COR": "Cor", "SAG": "Sag"}[p.plane]
    if p.vendor == "SIEMENS":
      d = f"{region_word} {p.thickness:.1f} {rng.choice(['B30f', 'B31f', 'I30f', 'Br40'])}"
      if p.reformat:
        d = f"{pl} MPR {d}"
      return d + (" CE" if post and rng.random() < 0.5 else "")
    word = STUDY_DESC[p.region]
    if post:
      cue = str(rng.choice(["W CONTRAST", "WITH CONTRAST", "C+", "+C",
                            {"arterial": "ARTERIAL", "delayed": "DELAYED"}.get(p.phase, "PORTAL VENOUS")]))
    else:
      cue = str(rng.choice(["W/O", "WO CONTRAST", "NON CONTRAST", "PLAIN"]))
    if p.reformat:
      return f"{pl} {p.thickness:.0f}mm {word} {cue}"
    return str(rng.choice([f"CT {word} {cue}", f"{p.thickness:.1f}mm {word} {cue}", f"{word} {cue}"]))
  # MR
  fs = p.fat_sat
  pl3 = {"AX": "tra", "COR": "cor", "SAG": "sag"}[p.plane]
  if p.epi:
    b = int(p.b_value)
    return str({"SIEMENS": rng.choice([f"ep2d_diff_{pl3}_b{b}", "ep2d_diff_mddw_20_p2", "DTI_30dir"]),
                "GE MEDICAL SYSTEMS": rng.choice(["DWI ASSET", f"{p.plane.title()} DWI b{b}", "DTI 25 dir"]),
                "Philips": rng.choice(["DWI_SENSE", f"DTI_high_{pl3.upper()}", "DwiSE"]),
                "TOSHIBA": rng.choice(["DWI b1000", "DTI 12 axis"])}[p.vendor])
  if p.bold:
    return str({"SIEMENS": rng.choice(["ep2d_bold_rest", "ep2d_bold_moco", "fMRI_resting_state", "BOLD_task"]),
                "GE MEDICAL SYSTEMS": rng.choice(["rsfMRI", "fMRI RestingState", "BOLD EPI"]),
                "Philips": rng.choice(["fMRI_FEEPI", "rs-fMRI", "FE_EPI_BOLD"]),
                "TOSHIBA": rng.choice(["EPI BOLD", "fMRI rest"])}[p.vendor])
  if p.iso3d:
    d = {"SIEMENS": rng.choice(["t1_mprage_sag_p2_iso", "T1_MPRAGE_SAG_1mm", "t1_mpr_sag_iso"]),
         "GE MEDICAL SYSTEMS": rng.choice(["Sag T1 3D BRAVO", "SAG 3D T1 FSPGR", "3D T1 IR-FSPGR SAG"]),
         "Philips": rng.choice(["T1W_3D_TFE", "sT1W_3D_TFE_SAG", "3D_T1_TFE"]),
         "TOSHIBA": rng.choice(["3D T1 MPRAGE SAG", "T1 3D FFE SAG"])}[p.vendor]
    return str(d) + (str(rng.choice([" post", "_+C", " GAD"])) if post else "")
  if p.vendor == "SIEMENS":
    seq = "t1_vibe" if p.gre else _SIEMENS[p.sequence]
    d = f"{seq}{'_fs' if fs else ''}_{ {'AX': 'tra', 'COR': 'cor', 'SAG': 'sag'}[p.plane]}"
    if p.sequence == "T2-FLAIR":
      d += "_dark-fluid"
    return d + (str(rng.choice(["_KM", " post", "_+C"])) if post else "")
  if p.vendor == "GE MEDICAL SYSTEMS":
    seq = "LAVA" if p.gre else _GE[p.sequence]
    pl = {"AX": "Ax", "COR": "Cor", "SAG": "Sag"}[p.plane]
    d = f"{pl} {seq}{' FS' if fs else ''}"
    if post:
      d += str(rng.choice([" +C", " POST GAD", " post"]))
    return d.upper() if rng.random() < 0.3 else d
  if p.vendor == "Philips":
    seq = "T1W_FFE" if p.gre else _PHILIPS[p.sequence]
    d = f"{seq}{'_SPIR' if fs else ''}{'' if rng.random() < 0.5 else '_' + {'AX': 'TRA', 'COR': 'COR', 'SAG': 'SAG'}[p.plane]}"
    return d + (str(rng.choice(["_GD", " +C", "_POST"])) if post else "")
  seq = "T1 FFE" if p.gre else _TOSHIBA[p.sequence]
  pl = {"AX": "AX", "COR": "COR", "SAG": "SAG"}[p.plane]
  return f"{seq}{' FS' if fs else ''} {pl}" + (" post" if post else "")


def _alt_descriptions(p: SeriesPlan, rng) -> tuple:
  """Misleading descriptions: another sequence, or the opposite contrast state."""
  out = []
  for seq in ("T1", "T2", "T2-FLAIR", "T1-FLAIR"):
    if p.modality == "MR" and seq != p.sequence:
      out.append(describe(dataclasses.replace(p, sequence=seq, gre=False, epi=False, bold=False,
                                                iso3d=False), rng))
  out.append(describe(dataclasses.replace(p, contrast="no" if p.contrast == "yes" else "yes"), rng))
  return tuple(out)


# CT contrast phases as clinical protocols use them (phantom.ct.enhancement):
# routine body CT is portal venous; arterial (multiphase liver, CTA) and
# delayed (urography, liver lesion work-up) are rarer. Head CT with contrast
# is mostly a venous-phase scan or an angiogram (arterial).
_CT_PHASE_P = {"brain": (0.35, 0.55, 0.10), "headneck": (0.30, 0.60, 0.10)}
_CT_PHASE_P_BODY = (0.20, 0.65, 0.15)


def _ct_acquisition(region: str, contrast: str, rng) -> dict:
  """Phase, kernel and dose of one CT acquisition (its reformats share them).

  Head CT: 120 kVp, 200-400 mAs; body CT: 100-140 kVp, 80-350 mAs (the
  noise follows from the dose and the patient's size, ``phantom.ct.noise_sd``).
  """
  phase = ""
  if contrast == "yes":
    p = _CT_PHASE_P.get(region, _CT_PHASE_P_BODY)
    phase = str(rng.choice(ct.PHASES, p=p))
  kernel = str(rng.choice(ct.KERNELS, p=(0.3, 0.6, 0.1)))
  head = region in ("brain", "headneck")
  kvp = 120.0 if head else float(rng.choice([100.0, 120.0, 120.0, 140.0]))
  mas = float(rng.uniform(200, 400) if head else rng.uniform(80, 350))
  return dict(phase=phase, kernel=kernel, kvp=kvp, mas=mas)


def _tilt(rng, most: float = 10.0) -> float:
  return 0.0 if rng.random() < 0.35 else float(rng.uniform(0.5, most))


def _head_mr_plan(seq: str, pl: str, st: str, region: str, vendor: str, rng, full_size: bool,
                  field_t: float) -> SeriesPlan:
  """One head MR series as head protocols acquire it.

  2D: 3-6 mm slices (thickness 80-100 % of the spacing) in any plane, often
  oblique (AC-PC angulation of axials up to 20 degrees), head-only FOV
  200-250 mm (coronal / sagittal 220-256 mm, square; axials with a 75-100 %
  rectangular FOV). 3D T1 (``iso3d``): sagittal 160-192 slices of ~1 mm,
  FOV 240-256 mm. Matrices 256-512 (``full_size``) or 96-192 (demo sizes).
  """
  u = rng.uniform
  mm = int(rng.choice([256, 320, 384, 512] if full_size else [96, 128, 160, 192]))
  if seq == "T1" and pl == "SAG" and region == "brain" and rng.random() < 0.6:
    n = int(rng.integers(160, 193))
    sp = float(np.round(u(0.9, 1.2), 2))
    m = int(rng.choice([256] if full_size else [96, 128]))
    tr, ti = (float(u(1800, 2400)), float(u(850, 1100))) if vendor != "Philips" else (float(u(6.5, 9.0)), None)
    return SeriesPlan("MR", "T1", "SAG", st, region, vendor, sp, sp, m, _tilt(rng, 6.0), gre=True, iso3d=True,
                      tr=tr, te=float(u(2.2, 4.6)), ti=ti, flip=float(u(7, 12)), field_t=field_t,
                      fov=float(u(240, 256)), slab=sp * (n - 1))
  sp = float(rng.choice([3.0, 4.0, 5.0, 6.0]))
  thick = sp if rng.random() < 0.5 else round(sp * u(0.8, 0.95), 1)
  fov = float(u(200, 250) if pl == "AX" else u(220, 256))
  ratio = float(u(0.75, 1.0)) if pl == "AX" and rng.random() < 0.6 else 1.0
  return SeriesPlan("MR", seq, pl, st, region, vendor, sp, thick, mm, _tilt(rng, 20.0 if pl == "AX" else 12.0),
                    field_t=field_t, fov=fov, phase_ratio=ratio, **_mr_params(seq, rng, False))


def _dwi_plan(st: str, region: str, vendor: str, rng, field_t: float) -> SeriesPlan:
  """EPI diffusion (DWI / DTI): 2-4 mm slices on a 64-128 matrix, mostly axial."""
  u = rng.uniform
  pl = str(rng.choice(["AX", "AX", "AX", "COR", "SAG"]))
  sp = float(rng.choice([2.0, 2.5, 3.0, 4.0]))
  return SeriesPlan("MR", "DWI", pl, st, region, vendor, sp, sp, int(rng.choice([64, 96, 128])),
                    _tilt(rng, 20.0), tr=float(u(3000, 9000)), te=float(u(60, 100)), flip=90.0, epi=True,
                    b_value=float(rng.choice([0.0, 1000.0, 1000.0])), field_t=field_t, fov=float(u(220, 250)))


def _bold_plan(region: str, vendor: str, rng, field_t: float) -> SeriesPlan:
  """Gradient-echo EPI (BOLD fMRI): 3-4 mm slices covering the brain on a 64-96
  matrix (FOV 192-240 mm), TR 2-3 s, TE ~30 ms at 3 T / ~45 ms at 1.5 T.

  Mostly oblique axial (AC-PC); coronal and sagittal as QA and research
  protocols acquire them. Its sequence is outside the taxonomy (``other``):
  the network learns its plane, contrast and coverage, not a weighting.
  """
  u = rng.uniform
  pl = str(rng.choice(["AX", "AX", "AX", "COR", "SAG"]))
  sp = float(rng.choice([3.0, 3.3, 3.5, 4.0]))
  te = float(u(25, 35) if field_t >= 2.0 else u(40, 50))
  return SeriesPlan("MR", "other", pl, "no", region, vendor, sp, round(sp * u(0.85, 1.0), 1),
                    int(rng.choice([64, 80, 96])), _tilt(rng, 25.0), tr=float(u(2000, 3000)), te=te,
                    flip=float(u(70, 90)), bold=True, field_t=field_t, fov=float(u(192, 240)))


def plan_study(rng: np.random.Generator, full_size: bool = False) -> list:
  """Samples one study -> list of SeriesPlan (2-6 series)."""
  w = np.array([t[2] for t in STUDY_TYPES])
  modality, region, _ = STUDY_TYPES[int(rng.choice(len(w), p=w / w.sum()))]
  vendor = str(rng.choice(VENDORS))
  body_part = str(rng.choice(BODY_PART[region]))
  plans = []
  u = rng.uniform
  if modality == "CT":
    pc = {"brain": 0.3, "headneck": 0.7, "chest": 0.5}.get(region, 0.75)
    states = ["yes"] if rng.random() < pc else ["no"]
    if rng.random() < 0.3:
      states = ["no", "yes"]
    for st in states:
      m = int(rng.choice([512] if full_size else [128, 160, 192]))
      acq = _ct_acquisition(region, st, rng)
      if region == "brain":
        # Head CT: head-only FOV 200-250 mm (0.4-0.5 mm pixels at 512), 0.6-5 mm
        # slices, often with the gantry tilted along the orbito-meatal line.
        thick = float(rng.choice([0.625, 1.0, 2.5, 3.0, 4.0, 5.0]))
        fov = float(u(205, 250))
        tilt = float(u(8, 25)) if rng.random() < 0.5 else 0.0
        plans.append(SeriesPlan("CT", "CT", "AX", st, region, vendor, thick, thick, m, tilt, fov=fov, **acq))
      else:
        thick = float(rng.choice([1.0, 1.25, 2.0, 2.5, 3.0, 5.0]))
        plans.append(SeriesPlan("CT", "CT", "AX", st, region, vendor, thick, thick, m, 0.0, **acq))
      for pl in ("COR", "SAG"):
        if rng.random() < (0.75 if pl == "COR" else 0.55):
          rt = float(rng.choice([2.0, 3.0, 4.0]))
          plans.append(SeriesPlan("CT", "CT", pl, st, region, vendor, rt, rt, m, 0.0, reformat=True,
                                  fov=plans[-1].fov if region == "brain" else 0.0, **acq))
  elif modality == "PT":
    m = int(rng.choice([144, 200] if full_size else [96, 128]))
    sp = float(rng.choice([2.0, 3.0, 4.0]) if full_size else rng.choice([3.0, 4.0, 5.0]))
    plans.append(SeriesPlan("PT", "PT", "AX", "no", region, vendor, sp, sp, m, 0.0))
    ct_m = 512 if full_size else 128
    # The PET/CT's low-dose attenuation-correction CT.
    plans.append(SeriesPlan("CT", "CT", "AX", "no", region, vendor, 5.0, 5.0, ct_m, 0.0,
                            kernel="soft", kvp=120.0, mas=float(rng.uniform(30, 80))))
    if rng.random() < 0.4:
      plans.append(SeriesPlan("PT", "PT", "COR", "no", region, vendor, sp, sp, m, 0.0, reformat=True))
  else:
    mm = lambda: int(rng.choice([256, 320, 384, 512] if full_size else [96, 128, 160, 192]))
    # Pre-contrast T1 in the planes the post-contrast T1 uses, and the pre /
    # post pairs of one study (below): otherwise "T1 AX of a head" alone would
    # mean contrast, a protocol prior that real archives do not share (real
    # brain work-ups acquire T1 AX / COR before gadolinium too).
    if region == "brain":
      pool = [("T1", "SAG", "no"), ("T1", "AX", "no"), ("T2", "AX", "no"), ("T2-FLAIR", "AX", "no"),
              ("T1-FLAIR", "AX", "no"), ("T2-FLAIR", "COR", "no"), ("T1-FLAIR", "SAG", "no"),
              ("T2-FLAIR", "SAG", "no"), ("T1-FLAIR", "COR", "no")]
      post = [("T1", "AX", "yes"), ("T1", "COR", "yes"), ("T1-FLAIR", "AX", "yes"), ("T1", "SAG", "yes")]
    elif region == "headneck":
      pool = [("T1", "AX", "no"), ("T2", "AX", "no"), ("T2", "COR", "no"), ("T1", "COR", "no")]
      post = [("T1", "AX", "yes"), ("T1", "COR", "yes")]
    else:
      pool = [("T2", "COR", "no"), ("T2", "AX", "no"), ("T1", "AX", "no"), ("T2", "SAG", "no"),
              ("T1", "COR", "no")]
      post = [("T1", "AX", "yes"), ("T1", "COR", "yes"), ("T1", "SAG", "yes")]
    k = int(rng.integers(2, 5))
    chosen = [pool[i] for i in rng.choice(len(pool), size=min(k, len(pool)), replace=False)]
    if rng.random() < 0.6:
      given = [post[i] for i in rng.choice(len(post), size=int(rng.integers(1, 3)), replace=False)]
      # Half of the post-contrast series get their pre-contrast twin (same
      # sequence and plane), as in a pre / post comparison.
      chosen += [(seq, pl, "no") for seq, pl, _ in given
                 if (seq, pl, "no") not in chosen and rng.random() < 0.5]
      chosen += given
    field_t = 3.0 if rng.random() < 0.45 else 1.5
    if region == "brain" and rng.random() < 0.35:
      chosen.append(("DWI", "AX", "no"))
    # Resting-state / task fMRI: common in research archives (a BOLD run
    # before gadolinium, so its contrast is "no").
    if region == "brain" and rng.random() < 0.2:
      chosen.insert(0, ("other", "AX", "no"))
    for seq, pl, st in chosen:
      if region == "brain":
        plans.append(_dwi_plan(st, region, vendor, rng, field_t) if seq == "DWI" else
                     _bold_plan(region, vendor, rng, field_t) if seq == "other" else
                     _head_mr_plan(seq, pl, st, region, vendor, rng, full_size, field_t))
        continue
      gre = seq == "T1" and region in ("abdomen", "pelvis") and rng.random() < 0.6
      if region == "brain":
        sp = float(rng.choice([3.0, 4.0, 5.0, 6.0]) if pl != "SAG" or seq != "T1" else rng.choice([1.0, 3.0, 5.0]))
      else:
        sp = float(rng.choice([4.0, 5.0, 6.0, 7.0]))
      thick = sp if rng.random() < 0.5 else round(sp * u(0.8, 0.95), 1)
      fs = seq == "T2" and region != "brain" and rng.random() < 0.5 or (st == "yes" and region != "brain" and rng.random() < 0.7)
      plan = SeriesPlan("MR", seq, pl, st, region, vendor, sp, thick, mm(), _tilt(rng), fat_sat=fs, gre=gre,
                        field_t=field_t, **_mr_params(seq, rng, gre))
      plans.append(plan)
  study_desc = f"{'MRI' if modality == 'MR' else 'PET/CT' if modality == 'PT' else 'CT'} {STUDY_DESC[region]}"
  cstates = {p.contrast for p in plans}
  study_desc += {frozenset(["no"]): str(rng.choice([" W/O", "", " WO"])), frozenset(["yes"]): " W CONTRAST",
                 frozenset(["no", "yes"]): " W/WO"}[frozenset(cstates)]
  for p in plans:
    p.body_part = body_part
    p.study_description = study_desc
    p.description = describe(p, rng)
    p.alt_descriptions = _alt_descriptions(p, rng)
  return plans
