"""Imaging physics: tissue tables and CT / MR / PET image formation.

Inputs are tissue-label maps ``(K, I, J)`` from ``anatomy.render_labels``;
outputs are float32 images of the same shape: CT in HU, MR in scanner units
(signal x 1000, before storage as uint16), PET in SUV-like units (Bq/ml after
scaling in the writer).

MR relaxation times are 1.5 T literature values (ms): Stanisz et al. 2005
(MRM 54:507) for grey matter, muscle, myocardium, cord (white matter T1 790 ms,
the 1.5 T value of Wansapura et al. 1999 / Gelman et al. 2001); de Bazelaire et al. 2004
(Radiology 230:652) for liver, spleen, kidney, fat; Rakow-Penner et al. 2006
for breast fibroglandular tissue. Signals come from the sequence equations:

* spin echo:  S = PD (1 - exp(-TR/T1)) exp(-TE/T2)
* inversion recovery (FLAIR): S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)

Gadolinium shortens T1: 1/T1' = 1/T1 + r1 C with r1 = 4.5 /mM/s.

At 3 T (``field_t=3``) T1 is longer and T2 a little shorter: Stanisz et al.
2005 (3 T columns: white matter 1084 / 69 ms, grey matter 1820 / 99, blood
1932 / 275, cord 993 / 78, myocardium 1471 / 47), de Bazelaire et al. 2004
(3 T: liver 809 / 34, spleen 1328 / 61, kidney cortex 1142 / 76, medulla
1545 / 81, fat 382 / 68, muscle 898 / 29), Lu et al. 2005 for CSF (T1 ~4.2 s);
other tissues T1 x 1.25 and T2 x 0.92. Diffusion (EPI) multiplies by
exp(-b ADC) with literature apparent diffusion coefficients (CSF / vitreous
~3.0e-3 mm2/s, grey matter 0.85e-3, white matter 0.72e-3, ...).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from radnet_jax.phantom import ct
from radnet_jax.phantom.anatomy import TISSUES

# name: (HU pre, HU added by portal-venous iodine, PD, T1 ms, T2 ms, Gd mM, PET SUV)
TABLE = {
    "air":        (-1000, 0, 0.00, 1000, 1, 0.0, 0.0),
    "skin":       (40, 10, 0.70, 800, 40, 0.20, 0.6),
    "fat":        (-100, 5, 0.90, 260, 80, 0.05, 0.3),
    "muscle":     (45, 10, 0.70, 1008, 44, 0.15, 0.7),
    "bone":       (1000, 0, 0.05, 1000, 1, 0.0, 0.4),
    "marrow":     (300, 20, 0.80, 550, 60, 0.10, 1.4),
    "gm":         (40, 3, 0.80, 1124, 95, 0.0, 8.0),
    "wm":         (28, 2, 0.69, 790, 72, 0.0, 3.0),
    "csf":        (5, 0, 1.00, 4000, 2000, 0.0, 0.2),
    "gas":        (-1000, 0, 0.00, 1000, 1, 0.0, 0.0),
    "lung":       (-850, 20, 0.10, 1200, 30, 0.10, 0.4),
    "blood":      (45, 160, 0.85, 1441, 250, 1.20, 1.6),
    "myocardium": (45, 80, 0.75, 1030, 40, 0.50, 5.0),
    "liver":      (58, 55, 0.70, 586, 46, 0.35, 2.5),
    "spleen":     (48, 70, 0.80, 1057, 79, 0.50, 2.0),
    "kidney":     (33, 150, 0.80, 966, 87, 1.20, 6.0),
    "medulla":    (30, 110, 0.85, 1412, 85, 0.90, 6.0),
    "bowel":      (35, 40, 0.75, 900, 60, 0.30, 1.5),
    "urine":      (5, 0, 1.00, 3000, 1500, 0.0, 25.0),
    "thyroid":    (100, 50, 0.75, 1000, 80, 0.40, 1.2),
    "lesion":     (30, 25, 0.80, 1100, 90, 0.60, 9.0),
    "breast":     (40, 15, 0.75, 1266, 57, 0.20, 1.0),
    "vitreous":   (10, 0, 1.00, 3500, 1500, 0.0, 0.2),
    "cord":       (35, 2, 0.70, 745, 74, 0.0, 2.5),
    "bile":       (8, 0, 0.95, 2600, 1000, 0.0, 0.5),
    "soft":       (40, 40, 0.75, 1000, 70, 0.30, 1.2),
    "disc":       (80, 10, 0.80, 1100, 100, 0.05, 0.5),
    # body (phantom.body); CT enhancement per phase: phantom.ct.ENHANCE
    "artery":     (45, 150, 0.85, 1441, 250, 1.20, 1.6),
    "vein":       (45, 140, 0.85, 1441, 250, 1.20, 1.6),
    "portal":     (45, 170, 0.85, 1441, 250, 1.20, 1.6),
    "liver_portal": (45, 170, 0.85, 1441, 250, 1.20, 1.6),
    "liver_vein": (45, 150, 0.85, 1441, 250, 1.20, 1.6),
    "pancreas":   (40, 55, 0.75, 584, 46, 0.40, 1.5),
    "collecting": (5, 0, 1.00, 3000, 1500, 0.0, 25.0),
    "lesion_hyper": (38, 45, 0.80, 1000, 80, 0.80, 8.0),
    "lumen":      (8, 0, 1.00, 3000, 800, 0.0, 0.8),
    "stool":      (10, 0, 0.60, 1000, 60, 0.0, 1.5),
    "cartilage":  (120, 5, 0.70, 1000, 40, 0.10, 0.5),
    # dura / falx / choroid plexus / pituitary: no blood-brain barrier, so
    # they enhance while the brain does not (pituitary T1 ~ grey matter).
    "dura":       (50, 45, 0.75, 1100, 60, 0.60, 1.5),
}
assert tuple(TABLE) == TISSUES
_TAB = np.array(list(TABLE.values()), np.float32)
HU, HU_CE, PD, T1, T2, GD, SUV = (_TAB[:, i] for i in range(7))
R1_GD = 4.5e-3  # /mM/ms
# 3 T relaxation (T1 ms, T2 ms) where measured (module docstring); else scaled.
_T3 = {"gm": (1820, 99), "wm": (1084, 69), "csf": (4200, 1800), "blood": (1932, 275), "cord": (993, 78),
       "myocardium": (1471, 47), "liver": (809, 34), "spleen": (1328, 61), "kidney": (1142, 76),
       "medulla": (1545, 81), "fat": (382, 68), "muscle": (898, 29)}
T1_3T = np.array([_T3.get(n, (TABLE[n][3] * 1.25, 0))[0] for n in TISSUES], np.float32)
T2_3T = np.array([_T3[n][1] if n in _T3 else TABLE[n][4] * 0.92 for n in TISSUES], np.float32)
# Apparent diffusion coefficient, 1e-3 mm2/s.
_ADC = {"air": 0.0, "gas": 0.0, "bone": 0.1, "csf": 3.0, "vitreous": 2.9, "urine": 3.0, "bile": 2.8,
        "gm": 0.85, "wm": 0.72, "cord": 0.8, "marrow": 0.4, "fat": 0.02, "kidney": 2.0, "medulla": 1.8,
        "liver": 1.1, "spleen": 0.8, "lesion": 1.2, "blood": 1.6, "muscle": 1.4, "disc": 1.5}
ADC = np.array([_ADC.get(n, 1.2) for n in TISSUES], np.float32) * 1e-3
# Reversible dephasing R2' (1/s) of a gradient echo at 3 T: 1/T2* = 1/T2 + R2'
# (grey matter T2* ~47 ms, white matter ~50 ms at 3 T; Peters et al. 2007,
# MRI 25:748). Deoxygenated venous blood dephases fast (venous T2* ~20 ms at
# 3 T), trabecular marrow too. R2' grows about linearly with the field.
_R2P = {"air": 0.0, "gas": 0.0, "csf": 2.0, "vitreous": 2.0, "urine": 2.0, "bile": 2.0, "gm": 11.0,
        "wm": 8.0, "cord": 8.0, "artery": 8.0, "blood": 15.0, "vein": 45.0, "portal": 30.0,
        "liver_vein": 40.0, "marrow": 90.0, "bone": 200.0, "fat": 20.0, "lung": 300.0, "liver": 25.0}
R2_PRIME_3T = np.array([_R2P.get(n, 15.0) for n in TISSUES], np.float32) * 1e-3   # 1/ms


def tissue_values(name: str) -> dict:
  """The table row of one tissue as a dict (HU, PD, T1 ms, T2 ms, ...)."""
  keys = ("hu", "hu_ce", "pd", "t1", "t2", "gd_mM", "suv")
  return dict(zip(keys, TABLE[name]))


def _interp_matrix(n: int, m: int) -> np.ndarray:
  """(n, m) linear-interpolation weights from m coarse knots to n samples."""
  x = np.linspace(0, m - 1, n)
  i0 = np.clip(np.floor(x).astype(int), 0, m - 2) if m > 1 else np.zeros(n, int)
  w = np.zeros((n, m), np.float32)
  if m == 1:
    w[:, 0] = 1
    return w
  f = (x - i0).astype(np.float32)
  w[np.arange(n), i0] = 1 - f
  w[np.arange(n), i0 + 1] = f
  return w


def smooth_field(rng: np.random.Generator, shape: tuple, coarse: int = 6,
                 amp: float = 1.0) -> np.ndarray:
  """Smooth random field ~N(0, amp) of ``shape``: coarse noise, trilinear upsampled.

  Separable interpolation matrices (three tensor products) instead of
  ``ndimage.zoom``: same result for order 1, several times faster.
  """
  ck = max(2, min(coarse, shape[0]))
  c = rng.standard_normal((ck, coarse, coarse), dtype=np.float32) * np.float32(amp)
  wk, wi, wj = (_interp_matrix(n, m) for n, m in zip(shape, c.shape))
  out = np.einsum("ka,abc->kbc", wk, c)
  out = np.einsum("kbc,ib->kic", out, wi)
  return np.ascontiguousarray(out @ wj.T)


def _blur(img: np.ndarray, spacing: tuple, thickness: float, fwhm_mm: float) -> np.ndarray:
  """Partial volume: Gaussian PSF in-plane (fwhm_mm) and across the slab."""
  f = 1.0 / 2.355
  sig_z = max(thickness, fwhm_mm) * f / spacing[0] * 0.8
  sig = (sig_z, fwhm_mm * f / spacing[1], fwhm_mm * f / spacing[2])
  return ndimage.gaussian_filter(img, sig, mode="nearest", truncate=2.5)


def texture(rng: np.random.Generator, labels: np.ndarray, rel: float = 0.03) -> np.ndarray:
  """Multiplicative tissue texture 1 + rel * smooth noise (organ heterogeneity)."""
  return 1.0 + smooth_field(rng, labels.shape, coarse=12, amp=rel)


def ct_image(labels: np.ndarray, contrast: bool, rng: np.random.Generator, *,
             spacing: tuple, thickness: float, noise_hu: float | None = 10.0,
             phase: str = "portal", kernel: str = "standard", mas: float | None = None,
             kvp: float = 120.0, diameter_mm: float = 300.0, patient_ct: dict | None = None,
             beam_hardening: float = 1.0) -> np.ndarray:
  """CT image in HU (float32, same shape as labels); see ``phantom.ct``.

  contrast: iodine given; phase: "arterial", "portal" (venous) or "delayed".
  kernel: "soft", "standard" or "sharp" (PSF, edge overshoot, noise texture).
  noise_hu: quantum-noise SD of the standard kernel (scaled by the kernel);
  None: from the dose, ``mas`` at ``kvp`` for a patient of ``diameter_mm``.
  patient_ct: ``Patient.ct`` (HU offsets, enhancement factors).
  beam_hardening: strength of cupping and bone streaks (0 = off).
  """
  pc = patient_ct or {}
  enh = ct.enhancement(phase if contrast else None, pc.get("enhance"), kvp)
  hu = HU[labels] + ct.offsets(pc.get("offsets"))[labels] + enh[labels]
  hu = hu + ct.texture(rng, labels, spacing, phase if contrast else None)
  hu = ct.psf(hu, spacing, thickness, kernel)
  nmul = None
  if beam_hardening:
    hu, nmul = ct.beam_hardening(hu, labels, spacing, rng, beam_hardening)
  sd = (ct.noise_sd(mas, thickness, diameter_mm, kernel, kvp) if noise_hu is None
        else noise_hu * ct.KERNEL[kernel][2])
  n = ct.noise(rng, labels.shape, spacing, kernel) * np.float32(sd)
  hu += n if nmul is None else n * nmul
  return np.clip(hu, -1024, 3071).astype(np.float32)


# Flowing blood in spin-echo images (SE, FSE, FLAIR, SE-EPI): spins that
# leave the slice between the 90 and 180 degree pulses give no echo, so
# arteries are black ("flow void") and the slower venous sinuses dark grey.
# Gadolinium in slow venous flow restores part of the signal: dural sinuses
# and veins enhance on post-contrast spin-echo T1, arteries stay dark.
# Gradient echoes (spoiled GRE, MPRAGE) refocus moving spins: no void.
# Multipliers of the signal: (without, with gadolinium).
_FLOW = {"blood": (0.1, 0.3), "artery": (0.1, 0.3), "vein": (0.3, 0.85), "portal": (0.3, 0.85),
         "liver_portal": (0.3, 0.85), "liver_vein": (0.3, 0.85)}
FLOW_VOID = np.ones((2, len(TISSUES)), np.float32)
for _name, (_pre, _post) in _FLOW.items():
  FLOW_VOID[:, TISSUES.index(_name)] = (_pre, _post)


def mr_signal(labels: np.ndarray, *, tr: float, te: float, ti: float | None = None,
              gd: float = 0.0, fat_sat: bool = False, field_t: float = 1.5,
              b_value: float = 0.0, spin_echo: bool = False, t2star: bool = False,
              r2_extra: np.ndarray | None = None) -> np.ndarray:
  """Noise-free MR signal (PD units) from the sequence equation per voxel.

  tr, te, ti in ms; ti set -> inversion recovery (FLAIR, MPRAGE), else spin
  echo. gd: gadolinium dose factor (1 = standard 0.1 mmol/kg) scaling tissue
  C. field_t: 1.5 or 3 (T) relaxation tables. b_value: diffusion weighting
  (s/mm2), exp(-b ADC). spin_echo: the image is refocused by a 180 degree
  pulse, so flowing blood loses its signal (``FLOW_VOID``). t2star: a
  gradient echo without refocusing (GRE-EPI / BOLD): T2* decay, the tissue's
  ``R2_PRIME_3T`` scaled to the field plus ``r2_extra`` (1/ms, per voxel:
  the dephasing of field gradients near air, ``susceptibility_field``).
  """
  pd = PD[labels].copy()
  if spin_echo:
    pd = pd * FLOW_VOID[1 if gd else 0][labels]
  if fat_sat:
    pd[labels == TISSUES.index("fat")] *= 0.12
  hi = field_t >= 2.0
  t1 = (T1_3T if hi else T1)[labels]
  if gd:
    t1 = 1.0 / (1.0 / t1 + R1_GD * GD[labels] * gd)
  e2 = np.exp(-te / (T2_3T if hi else T2)[labels])
  if b_value:
    e2 = e2 * np.exp(-b_value * ADC[labels])
  if t2star:
    r2p = R2_PRIME_3T[labels] * np.float32(field_t / 3.0)
    if r2_extra is not None:
      r2p = r2p + r2_extra
    e2 = e2 * np.exp(-te * r2p)
  if ti is None:
    return pd * (1.0 - np.exp(-tr / t1)) * e2
  return pd * np.abs(1.0 - 2.0 * np.exp(-ti / t1) + np.exp(-tr / t1)) * e2


def susceptibility_field(labels: np.ndarray, spacing: tuple, scale_mm: float = 5.0) -> np.ndarray:
  """Fraction of air (or gas) around each voxel, Gaussian-weighted over ``scale_mm``.

  Air and tissue differ by ~9 ppm in magnetic susceptibility, so the field
  is bent wherever air is near: the frontal sinuses over the orbitofrontal
  cortex, the mastoid air cells beside the temporal lobes, bowel gas. A
  gradient echo loses signal there (dephasing) and an echo-planar image is
  displaced along its phase-encoding axis (``epi_distort``).
  """
  air = ((labels == 0) | (labels == TISSUES.index("gas"))).astype(np.float32)
  sig = tuple(scale_mm / max(float(s), 1e-3) for s in spacing)
  return ndimage.gaussian_filter(air, sig, mode="nearest", truncate=2.5)


def epi_distort(img: np.ndarray, field: np.ndarray, spacing: tuple, shift_mm: float) -> np.ndarray:
  """Echo-planar geometric distortion along the phase-encoding axis (axis 1, the columns).

  The off-resonance near air shifts each voxel by ``shift_mm * (field -
  mean field over the object)`` along the phase axis (the low bandwidth of
  the EPI readout in that direction; several pixels at 3 T), with the
  intensity pile-up and stretching of the Jacobian. The geometry in the
  header stays the nominal one, as on real scanners.
  """
  if not shift_mm:
    return img
  inside = field < 0.5
  f = field - (float(field[inside].mean()) if inside.any() else 0.0)
  d = np.float32(shift_mm / spacing[1]) * f.astype(np.float32)   # voxels
  grid = np.indices(img.shape, dtype=np.float32)
  grid[1] -= d
  out = ndimage.map_coordinates(img, grid, order=1, mode="nearest")
  jac = np.clip(1.0 - np.gradient(d, axis=1), 0.3, 3.0) if img.shape[1] > 1 else 1.0
  return (out * jac).astype(np.float32)


def mr_image(labels: np.ndarray, rng: np.random.Generator, *, spacing: tuple,
             thickness: float, tr: float, te: float, ti: float | None = None,
             gd: float = 0.0, fat_sat: bool = False, snr: float = 30.0,
             bias: float = 0.2, field_t: float = 1.5, b_value: float = 0.0,
             randomise: bool = False, spin_echo: bool = False, t2star: bool = False,
             epi_shift_mm: float = 0.0, coil: np.ndarray | None = None) -> np.ndarray:
  """MR magnitude image (float32, scanner units ~0..4000) with Rician noise.

  snr: signal of white matter-like tissue over the noise SD; bias: amplitude
  of the smooth multiplicative receive-coil bias field (stronger at 3 T).
  Partial volume: Gaussian in-plane PSF and the slice profile across
  ``thickness`` (``_blur``).

  randomise: domain randomisation (the SynthSeg idea) on top of the physics:
  each tissue's signal times exp(N(0, 0.35)), a bias field of random
  strength, a random PSF (0.6-3 mm), SNR 8-60 and a random gamma, so that
  the network cannot rely on the exact tissue contrasts of the tables.

  t2star: gradient-echo EPI (BOLD): T2* decay with the susceptibility
  dropout near air (``susceptibility_field``; 1/T2' up to 120 /s at 3 T).
  epi_shift_mm: echo-planar distortion (``epi_distort``), signed by the
  phase-encoding polarity; 0 = none.
  coil: receive sensitivity of the coil per voxel (``head_coil_profile``),
  a gain on the signal before the noise; None = uniform.
  """
  field = susceptibility_field(labels, spacing) if (t2star or epi_shift_mm) else None
  r2_extra = None
  if t2star:
    r2_extra = np.float32(0.12 * field_t / 3.0) * field   # 1/ms
  s = mr_signal(labels, tr=tr, te=te, ti=ti, gd=gd, fat_sat=fat_sat, field_t=field_t, b_value=b_value,
                spin_echo=spin_echo, t2star=t2star, r2_extra=r2_extra)
  fwhm = 1.0
  if randomise:
    s = s * np.exp(rng.normal(0, 0.35, len(TISSUES))).astype(np.float32)[labels]
    bias = float(rng.uniform(0.1, 0.5))
    fwhm = float(rng.uniform(0.6, 3.0))
    snr = float(rng.uniform(8, 60))
  elif field_t >= 2.0:
    bias = bias * 1.6
  s = s * texture(rng, labels, 0.04)
  s = _blur(s, spacing, thickness, fwhm_mm=fwhm)
  if epi_shift_mm:
    s = epi_distort(s, field, spacing, epi_shift_mm)
  s = s * np.exp(smooth_field(rng, labels.shape, coarse=3, amp=bias))
  if coil is not None:
    s = s * coil
  body = s[labels > 0][::7]
  ref = float(np.percentile(body, 90)) if body.size else 1.0
  if randomise:
    s = ref * (np.maximum(s, 0) / max(ref, 1e-6)) ** np.float32(np.exp(rng.normal(0, 0.25)))
  scale = 1000.0 / max(ref, 1e-3)
  s = s * scale
  sd = 1000.0 / snr * 0.3
  n1 = rng.standard_normal(s.shape, dtype=np.float32) * np.float32(sd)
  n2 = rng.standard_normal(s.shape, dtype=np.float32) * np.float32(sd)
  return np.sqrt((s + n1) ** 2 + n2 ** 2).astype(np.float32)


def head_coil_profile(z: np.ndarray, z_edge: float, width_mm: float, floor: float) -> np.ndarray:
  """Receive sensitivity of a head coil along the patient's axis, ``floor``..1.

  A head coil's elements end around C2: above ``z_edge`` (mm, patient z,
  superior positive) the brain, skull and face are received at full
  sensitivity; below it the signal of the neck falls off over ``width_mm``
  (a logistic) to ``floor`` of it, so sagittal and coronal head scans fade
  into a dim neck and the lowest axial slices are darker, as on real
  head-coil images.
  """
  z = np.asarray(z, np.float32)
  rise = 1.0 / (1.0 + np.exp(-(z - np.float32(z_edge)) / np.float32(width_mm)))
  return (np.float32(floor) + np.float32(1.0 - floor) * rise).astype(np.float32)


def pet_image(labels: np.ndarray, rng: np.random.Generator, *, spacing: tuple,
              fwhm_mm: float = 7.0, counts: float = 1.0) -> np.ndarray:
  """PET SUV map: blurred uptake (brain, heart, kidneys/bladder high, lesions hot)."""
  u = SUV[labels] * (1.0 + smooth_field(rng, labels.shape, 8, 0.1))
  sig = [fwhm_mm / 2.355 / sp for sp in spacing]
  u = ndimage.gaussian_filter(u, sig, mode="nearest", truncate=2.5)
  u = u * rng.gamma(20.0 * counts, 1.0 / (20.0 * counts), u.shape).astype(np.float32)
  return np.maximum(u, 0).astype(np.float32)
