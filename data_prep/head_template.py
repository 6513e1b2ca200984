r"""Derives the phantom's head tissue map from the MNI ICBM152 2009 template.

  pip download --no-deps nilearn==0.14.1 -d /tmp/nl && cd /tmp/nl && unzip -q nilearn-*.whl
  python -m data_prep.head_template --nilearn /tmp/nl/nilearn \
      --out radnet_jax/phantom/data/head_labels.npz

Input: the three ICBM152 2009a symmetric 1 mm maps that nilearn ships in
``nilearn/datasets/data`` (``mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted``;
T1 average and grey / white matter probabilities, brain only: nilearn's
copies are skull-stripped). The template is the work of V. Fonov, A. Evans,
R. McKinstry, C. Almli and D. L. Collins (McConnell Brain Imaging Centre,
Montreal Neurological Institute): Fonov et al., NeuroImage 47:S102 (2009) and
NeuroImage 54:313 (2011); Collins et al., NeuroImage 1999. Its copyright
notice (Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre,
Montreal Neurological Institute, McGill University) permits use, copying and
distribution with the notice kept; nilearn itself lists the licence as
"unknown". The notice and these references travel inside the output file
(``attribution``).

Output: one compressed npz (uint8 tissue labels on a 1.5 mm RAS grid, a few
hundred KB), so the corpus never needs nilearn at run time:

* brain from the template: grey matter (cortex, deep nuclei, cerebellar
  cortex), white matter, CSF (ventricles, sulci) by the larger of the GM, WM
  and CSF (= 1 - GM - WM) probabilities inside the brain mask;
* built here around it (what the stripped template lacks), with the sizes of
  an adult head: subarachnoid CSF, skull (inner and outer table = cortical
  bone, diploe = marrow) by distance from the intracranial volume, scalp
  (fat, skin), temporalis and masseter; the face (orbits with globes, lens,
  optic nerves and extra-ocular muscles in orbital fat; nose with septum,
  turbinates and nostrils; frontal, ethmoid, sphenoid and maxillary sinuses;
  mastoid air; maxilla, hard palate, teeth, mandible, tongue, lips, ears);
  the neck down to C5 (pharynx and larynx airway, vertebrae C1-C5 with
  discs, spinal canal and cord continuing the medulla, carotids and jugular
  veins, paraspinal and neck muscles, subcutaneous fat);
* what enhances in a normal head (``_enhancing``): the dural venous sinuses
  (superior sagittal, straight, transverse, sigmoid, cavernous), the falx,
  the choroid plexus and the pituitary, and the arteries of the circle of
  Willis (internal carotid, middle, anterior and posterior cerebral, basilar).

Landmarks (vertex, lowest brain point, chin, bottom of the map) and a sample
of skin / brain surface points are stored for the band and scan-range logic.
"""
from __future__ import annotations

import os

import numpy as np
from scipy import ndimage

from radnet_jax.cli import flags

SPACING = 1.5
# RAS box (mm) of the map: the MNI brain spans x +-72, y -107..73, z -72..82.
BOX = ((-100.5, 100.5), (-130.5, 127.5), (-160.5, 108.0))
ATTRIBUTION = (
    "Head tissue map derived from the MNI ICBM152 2009a symmetric template (T1, GM, WM; as "
    "shipped by nilearn 0.14.1) by data_prep/head_template.py; face, skull, scalp, neck and the "
    "dural sinuses, falx, choroid plexus, pituitary and intracranial arteries are modelled, not "
    "from the template. Template: V. Fonov, A. C. Evans, R. C. McKinstry, C. R. "
    "Almli, D. L. Collins, NeuroImage 47:S102 (2009); V. Fonov et al., NeuroImage 54:313 (2011); "
    "D. L. Collins et al., NeuroImage (1999). Copyright (C) 1993-2009 Louis Collins, McConnell "
    "Brain Imaging Centre, Montreal Neurological Institute, McGill University. Permission to use, "
    "copy, modify, and distribute this software and its documentation for any purpose and "
    "without fee is hereby granted, provided that the above copyright notice appear in all "
    "copies. The authors and McGill University make no representations about the suitability "
    "of this software for any purpose. It is provided 'as is' without express or implied warranty.")
# Label names in map order (0 = air); the runtime maps them to anatomy.TISSUES.
NAMES = ("air", "skin", "fat", "muscle", "bone", "marrow", "gm", "wm", "csf", "gas", "blood",
         "vitreous", "cord", "soft", "disc", "vein", "dura", "artery")
L = {n: i for i, n in enumerate(NAMES)}


def _load(folder: str, name: str) -> tuple[np.ndarray, np.ndarray]:
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  img = nib.load(os.path.join(folder, "datasets", "data",
                              f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"))
  return np.asarray(img.dataobj, np.float32), np.asarray(img.affine, float)


def _grid() -> tuple[np.ndarray, tuple]:
  axes = [np.arange(lo, hi + 1e-6, SPACING) for lo, hi in BOX]
  return np.stack(np.meshgrid(*axes, indexing="ij"), -1).astype(np.float32), tuple(len(a) for a in axes)


def _resample(vol: np.ndarray, affine: np.ndarray, pts: np.ndarray) -> np.ndarray:
  inv = np.linalg.inv(affine)
  idx = pts @ inv[:3, :3].T + inv[:3, 3]
  return ndimage.map_coordinates(vol, np.moveaxis(idx, -1, 0), order=1, cval=0.0)


class _Painter:
  def __init__(self, pts: np.ndarray, lab: np.ndarray):
    self.p, self.lab = pts, lab

  def ell(self, c, r, tissue, only=None, e=2.0, rot=None):
    q = self.p - np.asarray(c, np.float32)
    if rot is not None:
      q = q @ np.asarray(rot, np.float32)
    m = (np.abs(q / np.asarray(r, np.float32)) ** e).sum(-1) <= 1.0
    return self.put(m, tissue, only)

  def cap(self, a, b, ra, rb, tissue, only=None):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    ab = b - a
    t = np.clip(((self.p - a) @ ab) / float(ab @ ab), 0, 1)
    d = self.p - (a + t[..., None] * ab)
    rad = ra + (rb - ra) * t
    return self.put((d * d).sum(-1) <= rad * rad, tissue, only)

  def path(self, pts, r, tissue, only=None):
    for a, b in zip(pts[:-1], pts[1:]):
      self.cap(a, b, r, r, tissue, only)

  def put(self, m, tissue, only=None):
    if only is not None:
      m = m & np.isin(self.lab, [L[o] for o in only])
    self.lab[m] = L[tissue]
    return m


def build(nilearn_dir: str) -> dict:
  """The label map and landmarks (see module docstring)."""
  pts, shape = _grid()
  t1, aff = _load(nilearn_dir, "t1")
  gm = _resample(_load(nilearn_dir, "gm")[0] / 255.0, aff, pts)
  wm = _resample(_load(nilearn_dir, "wm")[0] / 255.0, aff, pts)
  t1 = _resample(t1, aff, pts)
  x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
  brain = ndimage.binary_fill_holes(ndimage.binary_opening(t1 > 8.0))
  lab = np.zeros(shape, np.uint8)
  P = _Painter(pts, lab)
  sp = SPACING

  # --- soft-tissue envelope: cranium + face + neck ------------------------
  intracranial = ndimage.binary_closing(brain, iterations=3)
  intracranial = ndimage.binary_dilation(intracranial, iterations=1)   # + 1.5 mm subarachnoid
  intracranial = ndimage.binary_fill_holes(intracranial)
  d_out = ndimage.distance_transform_edt(~intracranial, sampling=sp)
  # Skull thickness grows towards the occiput and the frontal bone (6-9 mm).
  thick = 6.0 + 1.5 * np.clip(-y / 90.0, 0, 1) + 1.0 * np.clip((y - 40) / 40.0, 0, 1)
  cranium = d_out <= thick + 6.0 + 1.0 * np.clip(z / 80, 0, 1)        # scalp 6-7 mm
  face = ((x / 64.0) ** 2 + ((y - 28.0) / 70.0) ** 2 + ((z + 78.0) / 66.0) ** 2 <= 1.0) & (y > -30)
  jaw = ((x / (44.0 + 14.0 * np.clip((z + 140) / 40, 0, 1))) ** 2 + ((y - 40.0) / 58.0) ** 2 <= 1.0) & \
        (z > -140) & (z < -95)
  zn = np.clip((z + 160.0) / 100.0, 0, 1)        # 0 at the bottom, 1 at z = -60
  neck = (((x / (56.0 + 10.0 * zn)) ** 2 + ((y + 18.0) / (58.0 + 8.0 * zn)) ** 2) <= 1.0) & (z < -50)
  envelope = cranium | face | jaw | neck
  envelope = ndimage.binary_closing(envelope, iterations=3)
  lab[envelope] = L["skin"]
  inner = ndimage.binary_erosion(envelope, iterations=1)               # skin 1.5-2 mm
  lab[inner] = L["fat"]
  d_in = ndimage.distance_transform_edt(envelope, sampling=sp)
  fat_t = 4.0 + 5.0 * (z < -95) + 2.0 * (z < -120)                    # thicker neck fat
  lab[d_in > 1.5 + fat_t] = L["muscle"]
  # --- nose (outside the face ellipsoid) -----------------------------------
  nasion, tip, base = (0.0, 86.0, -36.0), (0.0, 114.0, -74.0), (0.0, 96.0, -83.0)
  P.cap(nasion, tip, 5.0, 9.0, "skin")
  P.cap(nasion, tip, 3.5, 7.5, "soft", ["skin"])
  P.cap((0, 84, -30), (0, 100, -60), 2.0, 2.0, "bone")               # nasal bones
  for sx in (-1, 1):
    P.ell((sx * 14.0, 98.0, -76.0), (9.0, 12.0, 8.0), "skin", ["air", "skin", "fat"])
    P.ell((sx * 14.0, 98.0, -76.0), (7.0, 10.0, 6.5), "soft", ["skin", "fat"])
    P.cap((sx * 8.0, 102.0, -82.0), (sx * 9.0, 86.0, -78.0), 3.0, 3.0, "gas")   # nostrils
  # --- skull (overrides the scalp muscle / fat inside it) ------------------
  skull = (d_out > 0) & (d_out <= thick)
  lab[skull] = L["bone"]
  lab[skull & (d_out > 1.8) & (d_out < thick - 1.8)] = L["marrow"]     # diploe
  # temporalis: between skull and scalp fat over the temporal fossa
  temporal = (np.abs(x) > 45) & (z > -45) & (z < 35) & (y > -40) & (y < 45) & \
             (d_out > thick) & (d_out <= thick + 5.0)
  lab[temporal] = L["muscle"]
  # --- intracranial: CSF, then brain tissue from the template --------------
  lab[intracranial] = L["csf"]
  csf_p = np.clip(1.0 - gm - wm, 0, 1)
  tissue = np.argmax(np.stack([csf_p, gm, wm]), 0)
  lab[brain & (tissue == 1)] = L["gm"]
  lab[brain & (tissue == 2)] = L["wm"]
  lab[brain & (tissue == 0) & (t1 < 120)] = L["csf"]
  lab[brain & (tissue == 0) & (t1 >= 120)] = L["gm"]                  # dura / partial voxels
  # --- orbits ----------------------------------------------------------------
  for sx in (-1, 1):
    ec = np.array([sx * 32.0, 62.0, -44.0])
    P.ell(ec + [0, -12, 0], (19.0, 30.0, 18.0), "fat", ["fat", "muscle", "bone", "marrow", "skin"])
    for dx, dz in ((0, 11), (0, -11), (9, 0), (-9, 0)):               # recti muscles
      P.cap(ec + [dx, -2, dz], (sx * 20.0 + dx * 0.3, 22.0, -44.0 + dz * 0.3), 3.0, 2.0, "muscle", ["fat"])
    P.ell(ec, (12.0, 12.0, 12.0), "soft")                              # sclera
    P.ell(ec, (10.8, 10.8, 10.8), "vitreous")
    P.ell(ec + [0, 9.5, 0], (4.5, 1.8, 4.5), "soft", ["vitreous"])      # lens
    P.cap(ec + [0, -11, 0], (sx * 12.0, 10.0, -46.0), 2.2, 2.2, "wm", ["fat", "muscle"])  # optic nerve
    P.ell(ec + [0, 2, 0], (16.0, 18.0, 16.0), "bone", ["muscle", "marrow", "csf"])  # orbital walls
  # --- paranasal sinuses, nasal cavity --------------------------------------
  P.ell((0.0, 58.0, -70.0), (13.0, 34.0, 26.0), "gas", ["fat", "muscle", "bone", "marrow", "soft"])  # nasal cavity
  P.cap((0.0, 30.0, -72.0), (0.0, 88.0, -66.0), 1.2, 1.2, "bone", ["gas"])   # septum
  for sx in (-1, 1):
    for zt, yt in ((-62.0, 60.0), (-75.0, 58.0), (-86.0, 55.0)):       # turbinates
      P.ell((sx * 10.0, yt, zt), (3.5, 22.0, 3.5), "soft", ["gas"])
    P.ell((sx * 29.0, 58.0, -80.0), (16.0, 19.0, 18.0), "bone", ["fat", "muscle", "marrow"])
    P.ell((sx * 29.0, 58.0, -80.0), (13.5, 16.5, 15.5), "gas")          # maxillary
    P.ell((sx * 13.0, 60.0, -48.0), (6.0, 16.0, 9.0), "gas", ["bone", "fat", "marrow", "muscle"])  # ethmoid
    P.ell((sx * 10.0, 86.0, -14.0), (9.0, 4.0, 10.0), "gas", ["bone", "marrow"])  # frontal
    mastoid = P.ell((sx * 52.0, -38.0, -52.0), (11.0, 13.0, 13.0), "bone", ["muscle", "fat", "marrow", "csf", "bone"])
    rng = np.random.default_rng(7 + sx)
    cells = mastoid & (ndimage.zoom(rng.random((40, 40, 40)), np.array(shape) / 40, order=1) > 0.55)
    lab[cells] = L["gas"]
  P.ell((0.0, 20.0, -52.0), (14.0, 12.0, 11.0), "bone", ["fat", "muscle", "marrow", "csf", "soft"])
  P.ell((0.0, 21.0, -53.0), (11.5, 10.0, 9.0), "gas")                   # sphenoid
  P.cap((0.0, -2.0, -44.0), (0.0, -30.0, -72.0), 6.0, 6.0, "bone", ["csf", "muscle", "fat", "marrow", "soft"])  # clivus
  for sx in (-1, 1):   # petrous ridges, zygomatic arches, ear canals, pinnae
    P.cap((sx * 22.0, -5.0, -42.0), (sx * 55.0, -28.0, -40.0), 6.0, 8.0, "bone", ["csf", "muscle", "fat", "marrow"])
    P.cap((sx * 50.0, 40.0, -52.0), (sx * 63.0, 0.0, -46.0), 4.0, 4.0, "bone", ["fat", "muscle", "skin"])
    P.cap((sx * 81.0, -18.0, -38.0), (sx * 58.0, -18.0, -38.0), 3.5, 3.0, "gas")
    P.ell((sx * 80.0, -18.0, -32.0), (5.0, 13.0, 29.0), "skin", ["air"], rot=_rx(0.25))
    P.ell((sx * 80.0, -18.0, -32.0), (3.0, 10.0, 25.0), "soft", ["skin"], rot=_rx(0.25))
  # --- maxilla, palate, teeth, tongue, mandible, lips -----------------------
  P.ell((0.0, 58.0, -97.0), (30.0, 34.0, 4.0), "bone", ["muscle", "fat", "gas", "soft"])  # hard palate
  P.ell((0.0, 58.0, -97.0), (27.0, 31.0, 2.0), "marrow", ["bone"])
  arch = [(np.sin(t) * 27.0, 58.0 + np.cos(t) * 32.0) for t in np.linspace(-1.6, 1.6, 13)]
  for zt in (-104.0, -114.0):                                          # upper and lower teeth
    P.path([(ax, ay, zt) for ax, ay in arch], 4.0, "bone", ["muscle", "fat", "soft", "gas"])
  P.ell((0.0, 48.0, -110.0), (23.0, 36.0, 11.0), "muscle", ["muscle", "fat", "gas", "soft"])  # tongue
  P.ell((0.0, 62.0, -109.0), (20.0, 28.0, 1.5), "gas", ["muscle"])    # oral cavity slit
  jaw_pts = [(-48.0, -6.0, -58.0), (-50.0, -2.0, -88.0), (-48.0, 4.0, -118.0), (-38.0, 48.0, -126.0),
             (-18.0, 80.0, -130.0), (0.0, 88.0, -131.0), (18.0, 80.0, -130.0), (38.0, 48.0, -126.0),
             (48.0, 4.0, -118.0), (50.0, -2.0, -88.0), (48.0, -6.0, -58.0)]
  P.path(jaw_pts, 6.5, "bone", ["muscle", "fat", "soft", "gas", "skin"])
  P.path(jaw_pts, 3.5, "marrow", ["bone"])
  for sx in (-1, 1):   # masseter, parotid
    P.cap((sx * 56.0, 8.0, -60.0), (sx * 52.0, 14.0, -118.0), 7.0, 8.0, "muscle", ["fat", "muscle"])
    P.ell((sx * 58.0, -22.0, -78.0), (10.0, 14.0, 20.0), "soft", ["fat", "muscle"])
  P.ell((0.0, 93.0, -104.0), (22.0, 6.0, 10.0), "muscle", ["fat", "muscle"])   # lips
  # --- neck: airway, spine, cord, vessels -----------------------------------
  airway = [(0.0, 18.0, -62.0), (0.0, 8.0, -80.0), (0.0, 4.0, -100.0), (0.0, 6.0, -120.0),
            (0.0, 14.0, -140.0), (0.0, 20.0, -162.0)]
  P.path(airway[:2], 9.0, "gas", ["muscle", "fat", "soft", "marrow", "bone"])
  P.path(airway[1:4], 8.0, "gas", ["muscle", "fat", "soft"])
  P.path(airway[3:], 7.5, "gas", ["muscle", "fat", "soft"])
  P.path(airway[4:], 11.0, "soft", ["muscle", "fat"])                # larynx wall / cartilage
  P.path(airway[4:], 7.0, "gas")
  spine_y = -22.0
  P.cap((0.0, -1.0, -68.0), (0.0, -6.0, -95.0), 6.0, 6.0, "bone", ["muscle", "fat", "soft"])  # dens / C2
  for k, zc in enumerate((-99.0, -115.0, -131.0, -147.0)):            # C2-C5 bodies + discs
    yb = spine_y + 4.0 + k * 1.5
    P.ell((0.0, yb, zc), (16.0, 12.0, 6.5), "bone", ["muscle", "fat", "soft"], e=3.0)
    P.ell((0.0, yb, zc), (13.5, 9.5, 5.0), "marrow", ["bone"], e=3.0)
    P.ell((0.0, yb, zc - 8.0), (15.0, 11.0, 1.8), "disc", ["muscle", "fat", "soft"])
    for sx in (-1, 1):   # pedicles, laminae, spinous process
      P.cap((sx * 10.0, yb - 8.0, zc), (sx * 9.0, yb - 26.0, zc), 3.5, 3.5, "bone", ["muscle", "fat", "soft"])
      P.cap((sx * 9.0, yb - 26.0, zc), (0.0, yb - 32.0, zc - 2), 3.0, 3.0, "bone", ["muscle", "fat", "soft"])
    P.cap((0.0, yb - 32.0, zc - 2), (0.0, yb - 48.0 - 4 * (k == 0), zc - 6), 3.5, 3.0, "bone", ["muscle", "fat"])
  P.ell((0.0, -3.0, -80.0), (9.0, 5.0, 6.0), "bone", ["muscle", "fat", "soft"])           # C1 anterior arch
  for sx in (-1, 1):
    P.ell((sx * 20.0, -22.0, -80.0), (9.0, 12.0, 8.0), "bone", ["muscle", "fat", "soft"])  # lateral masses
    P.ell((sx * 20.0, -22.0, -80.0), (6.0, 9.0, 5.0), "marrow", ["bone"])
  P.path([(-20.0, -30.0, -80.0), (-12.0, -55.0, -82.0), (0.0, -60.0, -82.0), (12.0, -55.0, -82.0),
          (20.0, -30.0, -80.0)], 3.5, "bone", ["muscle", "fat", "soft"])                  # C1 posterior arch
  canal = [(0.0, -40.0, -66.0), (0.0, -42.0, -90.0), (0.0, -40.0, -120.0), (0.0, -37.0, -162.0)]
  P.path(canal, 8.0, "csf", ["muscle", "fat", "soft", "bone", "marrow", "disc"])
  P.path(canal, 4.5, "cord", ["csf"])
  medulla = brain & (z < -58)
  lab[medulla & np.isin(lab, [L["gm"], L["wm"]])] = L["cord"]
  for sx in (-1, 1):
    P.path([(sx * 20.0, 12.0, -162.0), (sx * 19.0, 8.0, -110.0), (sx * 18.0, 0.0, -70.0)], 3.5, "blood",
           ["muscle", "fat", "soft"])                                  # carotid
    P.path([(sx * 27.0, 6.0, -162.0), (sx * 28.0, 0.0, -110.0), (sx * 30.0, -12.0, -66.0)], 5.0, "blood",
           ["muscle", "fat", "soft"])                                  # jugular
  _enhancing(P, lab, intracranial, x, y, z)
  lab[~envelope & (lab == L["muscle"])] = L["air"]   # nothing muscular outside the skin
  # --- landmarks and surface samples ---------------------------------------
  rng = np.random.default_rng(0)
  skin_pts = pts[lab == L["skin"]]
  brain_mask = np.isin(lab, [L["gm"], L["wm"]]) & (z > -62)
  brain_pts = pts[brain_mask]
  landmarks = {
      "vertex": float(z[lab > 0].max()),
      "brain_low": float(z[brain_mask].min()),
      "skull_base": float(np.percentile(z[brain_mask], 0.5)),
      "chin": float(z[(lab == L["bone"]) & (np.abs(x) < 5) & (y > 70)].min()),
  }
  return {"labels": lab, "names": np.array(NAMES), "origin": np.array([b[0] for b in BOX], np.float32),
          "spacing": np.float32(SPACING),
          "skin_points": skin_pts[rng.choice(len(skin_pts), 2000, replace=False)].astype(np.float32),
          "brain_points": brain_pts[rng.choice(len(brain_pts), 2000, replace=False)].astype(np.float32),
          "landmark_names": np.array(list(landmarks)), "landmark_z": np.array(list(landmarks.values()), np.float32),
          "attribution": np.array(ATTRIBUTION)}


def _enhancing(P: "_Painter", lab: np.ndarray, intracranial: np.ndarray, x, y, z) -> None:
  """What enhances inside a normal head: the brain itself sits behind the
  blood-brain barrier, so after gadolinium or iodine a real post-contrast
  head shows its dural venous sinuses, dura and falx, choroid plexus,
  pituitary and cavernous sinuses (``vein``; ``dura`` for the non-vascular
  tissue outside the barrier), and in arterial phases the circle of Willis
  (``artery``). Sinuses follow the inner table: each painted
  path is kept to the 4.5 mm shell inside the intracranial boundary, and
  its points are snapped to that boundary, so they hug the skull of the
  template whatever its exact shape."""
  sp = SPACING
  d_ic, near = ndimage.distance_transform_edt(intracranial, sampling=sp, return_indices=True)
  shell = intracranial & (d_ic <= 4.5)
  origin = np.array([b[0] for b in BOX], np.float32)

  def snap(pt):
    """The intracranial boundary point nearest to ``pt`` (RAS mm), 1.5 mm inside."""
    ijk = np.clip(np.round((np.asarray(pt, np.float32) - origin) / sp).astype(int), 0, np.array(lab.shape) - 1)
    if not intracranial[tuple(ijk)]:
      return np.asarray(pt, np.float32)
    b = np.array([near[k][tuple(ijk)] for k in range(3)])
    q = origin + b * sp
    v = np.asarray(pt, np.float32) - q
    return q + 1.5 * v / max(float(np.linalg.norm(v)), 1e-6)

  vein_into = ["csf", "gm", "wm", "bone", "marrow"]
  # Superior sagittal sinus: triangular, along the midline convexity from the
  # frontal pole over the vertex to the torcular, where the wall faces up or
  # back. The wall's direction is the outward normal of the smoothed
  # intracranial mask (a voxel's nearest wall would follow the staircase).
  wall = -np.stack(np.gradient(ndimage.gaussian_filter(intracranial.astype(np.float32), 2.0)), -1)
  up_or_back = (wall[..., 2] > 0.35 * np.linalg.norm(wall, axis=-1)) | ((wall[..., 1] < 0) & (z > -12))
  sss = shell & (np.abs(x) <= 5.0 - 0.55 * d_ic) & up_or_back & (y > -112) & (z > -14)
  lab[sss] = L["vein"]
  for sx in (-1, 1):   # transverse and sigmoid sinuses to the jugular bulb
    path = [snap(p) for p in ((0.0, -104.0, -8.0), (sx * 25.0, -100.0, -12.0), (sx * 45.0, -86.0, -20.0),
                              (sx * 55.0, -66.0, -28.0), (sx * 52.0, -48.0, -40.0), (sx * 42.0, -36.0, -50.0))]
    for a, b in zip(path[:-1], path[1:]):
      m = P.cap(a, b, 4.5, 4.5, "vein", vein_into)
      lab[m & ~shell & intracranial] = L["csf"]    # keep the sinus on the wall
    P.cap(path[-1], (sx * 30.0, -12.0, -66.0), 4.0, 4.5, "vein", ["bone", "marrow", "muscle", "fat", "soft", "csf"])
  # Straight sinus (vein of Galen to the torcular) and the falx above the corpus callosum.
  P.cap((0.0, -50.0, 4.0), snap((0.0, -104.0, -8.0)), 2.5, 3.0, "vein", ["csf", "gm", "wm"])
  lab[(np.abs(x) < 0.8) & (lab == L["csf"]) & intracranial & (d_ic < 30.0) & (z > 0)] = L["dura"]
  # Choroid plexus in the atria (glomus) and bodies of the lateral ventricles.
  for sx in (-1, 1):
    P.ell((sx * 27.0, -40.0, 14.0), (5.0, 9.0, 5.0), "dura", ["csf"])
    P.cap((sx * 27.0, -40.0, 14.0), (sx * 14.0, -5.0, 20.0), 2.5, 2.0, "dura", ["csf"])
  # Intracranial arteries (circle of Willis): internal carotids from the neck
  # through the cavernous sinus, middle cerebral arteries in the Sylvian
  # fissures, anterior cerebral arteries over the corpus callosum, the
  # basilar artery on the clivus and the posterior cerebral arteries.
  art_into = ["csf", "gm", "wm", "soft", "muscle", "fat", "bone", "marrow"]
  for sx in (-1, 1):
    P.path([(sx * 18.0, 0.0, -70.0), (sx * 16.0, 4.0, -52.0), (sx * 13.0, 14.0, -40.0), (sx * 11.0, 16.0, -28.0)],
           2.2, "artery", art_into)
    P.path([(sx * 11.0, 16.0, -28.0), (sx * 25.0, 14.0, -22.0), (sx * 38.0, 8.0, -14.0), (sx * 46.0, -4.0, 0.0)],
           1.6, "artery", ["csf", "gm", "wm"])
    P.path([(sx * 11.0, 16.0, -28.0), (sx * 2.5, 26.0, -18.0), (sx * 2.5, 34.0, 4.0), (sx * 2.5, 22.0, 28.0),
            (sx * 2.5, -10.0, 38.0)], 1.3, "artery", ["csf", "gm", "wm", "dura"])
    P.path([(0.0, -14.0, -34.0), (sx * 12.0, -22.0, -22.0), (sx * 24.0, -42.0, -12.0), (sx * 20.0, -70.0, -2.0)],
           1.4, "artery", ["csf", "gm", "wm"])
  P.path([(0.0, -20.0, -62.0), (0.0, -16.0, -48.0), (0.0, -14.0, -34.0)], 1.8, "artery", ["csf", "gm", "wm", "cord"])
  # Pituitary in the sella with the cavernous sinuses beside it.
  P.ell((0.0, 12.0, -38.0), (6.0, 4.5, 3.5), "dura", ["csf", "gm", "wm", "bone", "marrow", "soft"])
  for sx in (-1, 1):
    P.ell((sx * 11.0, 12.0, -38.0), (3.5, 8.0, 4.5), "vein", ["csf", "gm", "wm", "bone", "marrow", "soft"])


def _rx(a: float) -> np.ndarray:
  return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def main(argv=None) -> None:
  ap = flags.Parser(description=__doc__.split("\n")[0])
  ap.add_argument("--nilearn", required=True, help="an unpacked nilearn package folder")
  ap.add_argument("--out", default="radnet_jax/phantom/data/head_labels.npz")
  args = ap.parse_args(argv)
  res = build(args.nilearn)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  np.savez_compressed(args.out, **res)
  counts = np.bincount(res["labels"].ravel(), minlength=len(NAMES))
  print(f"{args.out}: {res['labels'].shape} at {SPACING} mm, {os.path.getsize(args.out) / 1024:.0f} KB; "
        + ", ".join(f"{n} {c * SPACING ** 3 / 1000:.0f} ml" for n, c in zip(NAMES, counts) if n != "air"))
  print(dict(zip(res["landmark_names"], res["landmark_z"])))


if __name__ == "__main__":
  main()
