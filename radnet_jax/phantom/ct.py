"""CT image formation beyond the tissue HU: contrast phases, texture, kernels, dose, beam hardening.

Used by ``physics.ct_image``; every function takes tissue-label maps or HU
arrays ``(K, I, J)`` with ``spacing = (dz, di, dj)`` mm.

* Contrast phases: iodine enhancement in HU added to the unenhanced value, per
  tissue and phase (late arterial ~35 s, portal venous ~70 s, delayed ~3-5 min),
  after the typical time-attenuation curves of abdominal CT at 120 kVp: the
  aorta peaks in the arterial phase, liver parenchyma and portal vein in the
  portal-venous phase (liver +50-60 HU), the renal cortex before the medulla
  (corticomedullary -> nephrographic), excreted contrast fills the collecting
  system only in the delayed phase; hypervascular (HCC-like) lesions enhance in
  the arterial phase and wash out, hypovascular (metastasis-like) ones stay
  below the liver. Per-patient factors (injection, cardiac output, portal
  perfusion) scale the enhancement; per-patient offsets model steatosis, fatty
  pancreas, muscle fat and positive oral contrast.
* Texture: smooth random fields per tissue at two scales (organ perfusion and
  parenchymal mottling), with amplitudes per tissue (stool and marrow coarse,
  blood homogeneous) and the heterogeneous arterial-phase spleen.
* Reconstruction kernels: in-plane resolution (PSF FWHM), edge enhancement of
  the sharp kernels, and the noise power spectrum: FBP noise is band-pass
  (ramp filter times apodisation), so soft kernels give coarse-grained noise
  and sharp kernels fine-grained, stronger noise.
* Dose: noise SD ~ 1 / sqrt(mAs * slice thickness), growing exponentially with
  the patient's water-equivalent diameter; kVp scales iodine contrast and noise.
* Beam hardening: residual cupping inside the body and dark streaks along the
  lines joining dense bones in a slice (between vertebra and iliac wings,
  between the femoral heads), with extra noise along them (photon starvation).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from radnet_jax.phantom.anatomy import TISSUES

PHASES = ("arterial", "portal", "delayed")
KERNELS = ("soft", "standard", "sharp")

# Iodine enhancement in HU at 120 kVp: (late arterial, portal venous, delayed).
ENHANCE = {
    "skin": (5, 10, 10), "fat": (3, 5, 5), "muscle": (5, 12, 10), "marrow": (15, 20, 15),
    "gm": (3, 3, 3), "wm": (2, 2, 2), "lung": (15, 20, 10), "blood": (220, 150, 80),
    "myocardium": (70, 60, 30), "liver": (15, 55, 35), "spleen": (70, 65, 40),
    "kidney": (150, 150, 90), "medulla": (30, 130, 110), "bowel": (50, 40, 25), "urine": (0, 0, 60),
    "thyroid": (60, 50, 30), "lesion": (10, 25, 25), "breast": (10, 15, 10), "cord": (2, 2, 2),
    "soft": (20, 35, 25), "disc": (0, 5, 10), "artery": (280, 150, 80), "vein": (60, 140, 85),
    "portal": (90, 170, 85), "liver_portal": (70, 170, 85), "liver_vein": (10, 150, 85),
    "pancreas": (80, 55, 30), "collecting": (0, 0, 450), "lesion_hyper": (95, 45, 25),
    "cartilage": (0, 5, 5), "dura": (40, 55, 45),
}
# Texture amplitude (HU SD) per tissue: (organ-scale field ~40 mm, parenchymal field ~8 mm).
TEXTURE = {
    "skin": (3, 3), "fat": (6, 4), "muscle": (3, 4), "bone": (60, 60), "marrow": (35, 45),
    "lung": (20, 30), "myocardium": (3, 3), "liver": (6, 6), "spleen": (4, 4), "kidney": (4, 4),
    "medulla": (4, 4), "bowel": (5, 6), "lesion": (8, 10), "breast": (10, 15), "soft": (5, 6),
    "disc": (5, 5), "pancreas": (6, 12), "lesion_hyper": (10, 12), "lumen": (2, 3),
    "stool": (30, 55), "cartilage": (10, 12), "thyroid": (5, 5), "gm": (2, 2), "wm": (2, 2),
}
assert set(ENHANCE) <= set(TISSUES) and set(TEXTURE) <= set(TISSUES)
_ENH = np.array([[ENHANCE.get(t, (0, 0, 0))[i] for i in range(3)] for t in TISSUES], np.float32)
_TEX = np.array([TEXTURE.get(t, (2, 2)) for t in TISSUES], np.float32)

# Kernel: (in-plane PSF FWHM mm, noise correlation mm, noise factor, edge enhancement).
KERNEL = {"soft": (1.6, 0.9, 0.8, 0.0), "standard": (1.2, 0.6, 1.0, 0.0), "sharp": (0.7, 0.3, 2.2, 0.6)}
MU_WATER = 0.019   # /mm, effective at 120 kVp


def enhancement(phase: str | None, factors: dict | None = None, kvp: float = 120.0) -> np.ndarray:
  """HU added per tissue id (float32 (n_tissues,)) for ``phase`` (None: no contrast).

  factors: {"*": global factor, tissue name: factor} (``Patient.ct["enhance"]``).
  Iodine attenuation rises at lower kVp (~ (120 / kVp)^1.3).
  """
  if phase is None:
    return np.zeros(len(TISSUES), np.float32)
  if phase not in PHASES:
    raise ValueError(f"unknown contrast phase {phase!r}: use one of {PHASES}")
  e = _ENH[:, PHASES.index(phase)].copy()
  factors = factors or {}
  scale = np.full(len(TISSUES), factors.get("*", 1.0), np.float32)
  for name, f in factors.items():
    if name != "*":
      scale[TISSUES.index(name)] *= f
  return e * scale * np.float32((120.0 / kvp) ** 1.3)


def offsets(values: dict | None) -> np.ndarray:
  """Per-patient HU offsets by tissue name -> float32 (n_tissues,)."""
  out = np.zeros(len(TISSUES), np.float32)
  for name, v in (values or {}).items():
    out[TISSUES.index(name)] = v
  return out


def _knots(n: int, extent_mm: float, scale_mm: float) -> int:
  return int(min(max(2, np.ceil(extent_mm / scale_mm) + 1), max(n, 2)))


def _interp(n: int, m: int) -> np.ndarray:
  x = np.linspace(0, m - 1, n)
  i0 = np.clip(np.floor(x).astype(int), 0, m - 2)
  w = np.zeros((n, m), np.float32)
  f = (x - i0).astype(np.float32)
  w[np.arange(n), i0] = 1 - f
  w[np.arange(n), i0 + 1] = f
  return w


def field(rng: np.random.Generator, shape: tuple, spacing: tuple, scale_mm: float) -> np.ndarray:
  """Smooth N(0, ~1) random field with features of ~``scale_mm`` (trilinear knots)."""
  m = [_knots(n, n * sp, scale_mm) for n, sp in zip(shape, spacing)]
  c = rng.standard_normal(m, dtype=np.float32)
  wk, wi, wj = (_interp(n, k) for n, k in zip(shape, m))
  out = (wk @ c.reshape(m[0], -1)).reshape(shape[0], m[1], m[2])   # BLAS matmuls, axis by axis
  out = np.matmul(wi, out)
  return np.matmul(out, wj.T * np.float32(1.6))   # x1.6: trilinear averaging shrinks the SD   # x1.6: trilinear averaging shrinks the SD


def texture(rng: np.random.Generator, labels: np.ndarray, spacing: tuple, phase: str | None) -> np.ndarray:
  """Additive HU texture (float32, labels' shape) from the per-tissue amplitudes."""
  tex = _TEX.copy()
  if phase == "arterial":   # arcuate enhancement of the spleen in the arterial phase
    tex[TISSUES.index("spleen")] = (22, 25)
  amp = tex[labels]
  return amp[..., 0] * field(rng, labels.shape, spacing, 40.0) + amp[..., 1] * field(rng, labels.shape, spacing, 8.0)


def noise_sd(mas: float, thickness: float, diameter_mm: float, kernel: str = "standard", kvp: float = 120.0) -> float:
  """Quantum-noise SD (HU) at the body centre for a tube load, slice and patient size.

  Anchored at 12 HU for 200 mAs, 5 mm, a 300 mm water-equivalent diameter and
  the standard kernel; SD ~ exp(mu D / 2) / sqrt(mAs t) (kVp^-1.5 at fixed mAs).
  """
  k = KERNEL[kernel][2]
  return float(12.0 * np.sqrt(200.0 / mas) * np.sqrt(5.0 / thickness) * np.exp(MU_WATER / 2 * (diameter_mm - 300.0))
               * (120.0 / kvp) ** 1.5 * k)


def noise(rng: np.random.Generator, shape: tuple, spacing: tuple, kernel: str) -> np.ndarray:
  """Unit-SD CT noise with the kernel's in-plane noise power spectrum.

  Band-pass (FBP: ramp times apodisation): a Gaussian at the kernel's
  correlation length minus a wider one; white when pixels are much coarser
  than the correlation length.
  """
  w = rng.standard_normal(shape, dtype=np.float32)
  corr = KERNEL[kernel][1]
  sig = (corr / spacing[1], corr / spacing[2])
  if min(sig) < 0.3:
    return w
  lo = ndimage.gaussian_filter(w, (0, sig[0], sig[1]), truncate=3.0)
  wide = ndimage.gaussian_filter(lo, (0, 2 * sig[0], 2 * sig[1]), truncate=3.0)
  n = lo - 0.7 * wide
  return n / np.float32(max(float(n[:, ::3, ::3].std()), 1e-6))


def psf(hu: np.ndarray, spacing: tuple, thickness: float, kernel: str) -> np.ndarray:
  """Slice profile (thickness) and in-plane PSF of the kernel, plus sharp-kernel overshoot."""
  fwhm, _, _, edge = KERNEL[kernel]
  f = 1.0 / 2.355
  sig = (max(thickness, fwhm) * f / spacing[0] * 0.8, fwhm * f / spacing[1], fwhm * f / spacing[2])
  out = ndimage.gaussian_filter(hu, sig, mode="nearest", truncate=2.5)
  if edge:
    s2 = (0, 1.0 / spacing[1], 1.0 / spacing[2])
    out = out + np.float32(edge) * (out - ndimage.gaussian_filter(out, s2, mode="nearest", truncate=2.5))
  return out


def beam_hardening(hu: np.ndarray, labels: np.ndarray, spacing: tuple, rng: np.random.Generator,
                   strength: float = 1.0) -> tuple:
  """(HU with cupping and bone streaks, per-voxel noise multiplier) for one series.

  Per slice, dense-bone components larger than 150 mm^2 (vertebral bodies,
  iliac wings, femoral heads, sacrum) are found on a ~4 mm grid; along each
  line joining two of the four largest, a dark band of up to ~60 HU (scaled by
  the smaller bone's area) is subtracted and the noise raised (photon
  starvation). Cupping: up to ~8 HU darker at the body centre.
  """
  K, I, J = hu.shape
  out = hu.copy()
  nmul = np.ones(hu.shape, np.float32)
  bone = labels == TISSUES.index("bone")
  body = labels > 0
  f_i, f_j = max(1, int(round(4.0 / spacing[1]))), max(1, int(round(4.0 / spacing[2])))
  px = spacing[1] * f_i * spacing[2] * f_j
  ii = (np.arange(I, dtype=np.float32) * spacing[1])[:, None]
  jj = (np.arange(J, dtype=np.float32) * spacing[2])[None, :]
  cup = float(rng.uniform(0, 8)) * strength
  width = float(rng.uniform(4, 9))
  for k in range(K):
    bk = bone[k, ::f_i, ::f_j]
    rows = np.flatnonzero(body[k].any(1))
    if rows.size:
      cols = np.flatnonzero(body[k].any(0))
      ci, cj = (rows[0] + rows[-1]) / 2 * spacing[1], (cols[0] + cols[-1]) / 2 * spacing[2]
      ri, rj = max((rows[-1] - rows[0]) / 2 * spacing[1], 1.0), max((cols[-1] - cols[0]) / 2 * spacing[2], 1.0)
      r2 = ((ii - ci) / ri) ** 2 + ((jj - cj) / rj) ** 2
      out[k] -= np.where(body[k], np.float32(cup) * np.clip(1 - r2, 0, 1), 0).astype(np.float32)
    if bk.sum() * px < 300:
      continue
    lab, n = ndimage.label(bk)
    if n < 2:
      continue
    area = np.bincount(lab.ravel(), minlength=n + 1)[1:] * px
    big = [int(x) for x in np.argsort(-area)[:4] if area[x] >= 150]
    if len(big) < 2:
      continue
    pos = ndimage.center_of_mass(bk, lab, [b + 1 for b in big])
    cen = [np.array([p[0] * f_i * spacing[1], p[1] * f_j * spacing[2]]) for p in pos]
    for a in range(len(big)):
      for b in range(a + 1, len(big)):
        p0, p1 = cen[a], cen[b]
        amp = 60.0 * strength * min(1.0, min(area[big[a]], area[big[b]]) / 1500.0)
        d = p1 - p0
        L2 = float(d @ d)
        if L2 < 1.0 or amp < 3:
          continue
        t = np.clip(((ii - p0[0]) * d[0] + (jj - p0[1]) * d[1]) / L2, 0, 1)
        dist2 = (ii - p0[0] - t * d[0]) ** 2 + (jj - p0[1] - t * d[1]) ** 2
        prof = np.exp(-dist2 / (2 * width ** 2)).astype(np.float32) * (t > 0) * (t < 1)
        out[k] -= np.float32(amp) * prof
        nmul[k] += np.float32(amp / 40.0) * prof
  return out, nmul


def abdominal_fov(rng: np.random.Generator, half_width: float, half_depth: float) -> float:
  """Display FOV (mm) of an abdominal CT: fits the patient, clinically 350-450 mm (500 if obese)."""
  need = max(2 * half_width * 1.04, 2 * half_depth * 1.1)
  return float(np.clip(need * rng.uniform(1.0, 1.08), 350.0, 500.0 if need > 450 else 450.0))
