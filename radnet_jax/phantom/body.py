"""The phantom body below the neck: trunk envelope, thorax, abdomen, pelvis, spine.

Same conventions as ``anatomy`` (LPS mm: +X patient left, +Y posterior, +Z
superior; depths are mm below the vertex of a 1750 mm adult, scaled by the
patient's height). Organs are built from their real shapes rather than single
ellipsoids:

* liver: a smooth union of its Couinaud segments (right posterior and anterior,
  dome, left medial and lateral, caudate, an optional Riedel lobe) with portal
  and hepatic vein trees inside and, in some patients, hypo- or hyper-dense
  lesions of several sizes (large ones with a necrotic core and enhancing rim);
* gallbladder in its fossa, crescent spleen, pancreas (head in the duodenal C,
  neck, body, tail at the splenic hilum), kidneys with cortex, medullary
  pyramids, sinus fat, pelvis and ureter, adrenals;
* stomach (fundus, body, antrum) and duodenum, colon frame with haustra and
  small-bowel loops, with gas above fluid or stool (the patient is supine);
* aorta with its branches, IVC, portal, splenic and mesenteric veins, renal and
  iliac vessels; heart with four chambers, pulmonary arteries and veins;
* vertebrae (body, marrow, pedicles, lamina, spinous and transverse processes),
  discs, spinal canal and cord, ribs with costal cartilage, sternum, sacrum,
  iliac wings, pubic and ischial rami, femoral heads, necks and shafts;
* psoas, quadratus lumborum and paraspinal muscles, diaphragm; subcutaneous
  and visceral fat that vary with the patient's habitus;
* lungs with pulmonary vessel and bronchial trees.

Every shape has a bounding box, so ``anatomy.render_labels`` evaluates it only
on the grid voxels inside it. All randomness comes from the patient's
generator: the same seed gives the same body.

Size (~515 lines): the body is one painting sequence (``add_body``): shapes
are painted in order, each over the earlier ones, restricted to the tissues
its ``only`` list names. That order is what makes the anatomy, so it stays
in one module rather than in several that would have to share it.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from radnet_jax.phantom.shapes import Blob, Capsule, Clip, Ellipsoid, Profile, Trunk
from radnet_jax.phantom.shapes import _deform as deform
from radnet_jax.phantom.shapes import _rot as rot
from radnet_jax.phantom.shapes import _rotx as rotx
from radnet_jax.phantom.shapes import _roty as roty
from radnet_jax.phantom.shapes import _rotz as rotz

@dataclasses.dataclass
class Body:
  """What the body tells the rest of the phantom (bands, size, CT parameters)."""
  bands: dict
  half_width: float
  half_depth: float
  lesions: int
  ct: dict
  liver: Blob


def _tube(add, pts, radius, tissue, only=None, radius_end=None):
  """A polyline of capsules (radius tapering linearly to radius_end)."""
  pts = [np.asarray(p, np.float32) for p in pts]
  r1 = radius if radius_end is None else radius_end
  n = len(pts) - 1
  for i, (p0, p1) in enumerate(zip(pts[:-1], pts[1:])):
    add(Capsule(p0, p1, radius + (r1 - radius) * i / n, radius + (r1 - radius) * (i + 1) / n), tissue, only)


def _tree(rng, add, root, direction, radius, length, tissue, only, levels: int, spread: float = 0.7,
          bias=(0.0, 0.0, 0.0), children: int = 2):
  """A branching vessel / airway tree of capsules from ``root`` along ``direction``."""
  stack = [(np.asarray(root, np.float64), np.asarray(direction, np.float64), radius, length, 0)]
  while stack:
    p, d, rad, ln, lev = stack.pop()
    d = d / max(np.linalg.norm(d), 1e-6)
    q = p + d * ln
    add(Capsule(p, q, rad, rad * 0.8), tissue, only)
    if lev < levels:
      for _ in range(children):
        nd = d + rng.normal(0, spread, 3) + np.asarray(bias)
        stack.append((q, nd, rad * 0.7, ln * rng.uniform(0.65, 0.85), lev + 1))


def _hollow(add, rng, pts, radius, wall, content, only=None, gas_fraction=0.0, haustra=0.0,
            content_only=("bowel",)):
  """A hollow organ: wall tube, then lumen content, then gas above an air-fluid level.

  Gas fills the anterior (non-dependent, -Y) part of the lumen in a supine
  patient: the lumen is clipped at a coronal plane y <= level.
  """
  pts = [np.asarray(p, np.float32) for p in pts]
  if haustra:
    fine = []
    for p0, p1 in zip(pts[:-1], pts[1:]):
      n = max(int(np.linalg.norm(p1 - p0) / 18.0), 1)
      fine += [p0 + (p1 - p0) * t for t in np.arange(n) / n]
    pts = fine + [pts[-1]]
  rads = [radius * (1.0 + (haustra * (0.5 + 0.5 * np.cos(np.pi * i)) if haustra else 0.0)) for i in range(len(pts))]
  for i, (p0, p1) in enumerate(zip(pts[:-1], pts[1:])):
    add(Capsule(p0, p1, rads[i], rads[i + 1]), "bowel", only)
  if radius - wall < 1.5:
    return   # collapsed: wall only (soft-tissue density, like the liver)
  for i, (p0, p1) in enumerate(zip(pts[:-1], pts[1:])):
    lumen = Capsule(p0, p1, rads[i] - wall, rads[i + 1] - wall)
    add(lumen, content, content_only)
    if gas_fraction > 0:
      ymin = min(p0[1], p1[1]) - (rads[i] - wall)
      level = ymin + 2 * (rads[i] - wall) * gas_fraction
      add(Clip(lumen, [0, 1, 0], level), "gas", (content,))


def _patient_ct(rng, age: int) -> dict:
  """Per-patient CT parameters: HU offsets (steatosis, oral contrast, ...) and enhancement factors."""
  offsets = {"liver": float(rng.normal(0, 5)), "spleen": float(rng.normal(0, 4)),
             "muscle": float(rng.normal(0, 4)), "blood": float(-rng.uniform(0, 10)),
             "pancreas": float(-rng.uniform(0, 30) * (age > 55))}
  if rng.random() < 0.3:    # hepatic steatosis: liver darker than spleen, down to ~10 HU
    offsets["liver"] = float(-rng.uniform(12, 45))
  if rng.random() < 0.25:   # positive oral contrast in the bowel lumen
    offsets["lumen"] = float(rng.uniform(150, 350))
  if rng.random() < 0.2:    # sarcopenia / fatty infiltration of muscle
    offsets["muscle"] = float(-rng.uniform(10, 30))
  enhance = {"*": float(rng.uniform(0.7, 1.3)),          # injection rate, cardiac output
             "liver": float(rng.uniform(0.65, 1.25)),    # portal perfusion
             "lesion": float(rng.uniform(0.5, 1.5)), "lesion_hyper": float(rng.uniform(0.6, 1.4))}
  return {"offsets": offsets, "enhance": enhance}


def _spine_y(depth):
  """AP position (mm, +posterior) of the vertebral body centre at ``depth`` (s = 1)."""
  return np.interp(depth, [135, 200, 275, 350, 450, 585, 650, 735, 775, 830, 870],
                   [20, 12, 22, 50, 62, 55, 42, 48, 62, 78, 66])


def _vertebrae():
  """(name, depth of body centre, half-height) of C1..L5 for s = 1."""
  out = [(f"C{i + 1}", 140 + i * 20.0, 7.0) for i in range(7)]
  out += [(f"T{i + 1}", 290 + i * 25.5, 9.5 + 0.3 * i) for i in range(12)]
  out += [(f"L{i + 1}", 612 + i * 30.5, 12.5) for i in range(5)]
  return out


def add_envelope(rng, add, Z, s: float, sex: str, habitus: float):
  """Skin, subcutaneous fat and muscle wall of trunk and thighs -> (trunk, cavity, fat, wide)."""
  wide = float(np.clip(0.9 + 0.22 * habitus + rng.normal(0, 0.03), 0.86, 1.2))
  depths = np.array([190, 262, 300, 360, 420, 480, 540, 600, 660, 720, 780, 840, 915], float)
  hip = 1.08 if sex == "F" else 1.0
  a = np.array([52, 60, 150, 150, 148, 145, 142, 140, 142, 150, 162, 172, 172], float)
  ba = np.array([50, 55, 95, 100, 105, 108, 110, 112, 115, 112, 108, 105, 100], float)
  bp = np.array([55, 62, 100, 105, 105, 105, 100, 98, 95, 95, 100, 105, 100], float)
  belly = 55.0 * habitus ** 1.5 * rng.uniform(0.6, 1.2)   # anterior protrusion of the abdomen
  ba = ba + belly * np.exp(-((depths - 680) / 110.0) ** 2)
  a[-4:] *= hip
  cy = np.array([12, 15, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], float)
  trunk = Trunk(Z(depths), np.zeros(len(depths)), cy, a * s * wide, ba * s * wide, bp * s * wide)
  # subcutaneous fat: thin over the chest, thick over the belly and (women) hips
  f = 5.0 + 32.0 * habitus * rng.uniform(0.7, 1.3)
  prof = np.interp(depths, [190, 300, 480, 650, 780, 915], [0.25, 0.45, 0.6, 1.0, 1.0, 0.9])
  hips = np.where(depths > 700, 1.35 if sex == "F" else 1.0, 1.0)
  t_lat, t_ant, t_post = f * prof * hips, f * prof * np.interp(depths, [480, 650, 800], [1.0, 1.5, 1.2]), f * prof * 0.8
  legs = [Profile(Z(np.array([905, 1150])), [sx * 88 * s * hip] * 2, [0, 0],
                  np.array([82, 68]) * s * wide, np.array([84, 70]) * s * wide) for sx in (-1, 1)]
  for shape in [trunk] + legs:
    add(shape, "skin")
  add(trunk.inset(2, 2, 2), "fat")
  for lg in legs:
    add(lg.inset(2.0), "fat")
  wall = np.interp(depths, [190, 300, 500, 650, 800, 915], [8, 14, 12, 10, 14, 20])
  add(trunk.inset(2 + t_lat, 2 + t_ant, 2 + t_post), "muscle")
  for lg in legs:
    add(lg.inset(2.0 + f * 0.8), "muscle")
  # body cavity (thorax, abdomen, pelvis) inside the muscle wall: fat until organs fill it
  post = wall + np.interp(depths, [190, 300, 600, 800], [30, 18, 14, 30])
  cav = trunk.inset(2 + t_lat + wall, 2 + t_ant + wall, 2 + t_post + post)
  keep = (depths >= 290) & (depths <= 905)   # thoracic inlet to pelvic floor
  cavity = Trunk(Z(depths[keep]), *(v[::-1][keep] for v in cav.k), e=cav.e, e_post=cav.e_post)
  add(cavity, "fat", ["muscle"])
  return trunk, cavity, f, wide


def add_body(rng, add, Z, s: float, sex: str, age: int, trunk: Trunk, cavity: Trunk,
             wide: float, habitus: float, lesions: int | None, z_neck: float = np.inf) -> Body:
  """Thorax, abdomen, pelvis, spine, ribs and vessels painted inside the envelope.

  z_neck: lower end (mm) of the head model, which brings its own cervical
  spine: vertebrae and canal above it are not painted.
  """
  j = lambda sd: float(rng.normal(0, sd))
  sw = s * wide
  P = lambda x, y, depth: np.array([x * sw, y * s, Z(depth)], np.float64)   # depth-based point

  # --- thorax: mediastinum, lungs, airways, pulmonary vessels ----------------
  lungs = []
  for sx in (-1, 1):
    w = 1.0 if sx < 0 else 0.9
    lc = P(sx * 68, 14 + j(3), 412 + j(5))
    lung = Ellipsoid(lc, [60 * sw * w, 86 * s, 128 * s], rot(rng, 4), e=2.4, deform=deform(rng, 0.05))
    lungs.append(lung)
    add(lung, "lung", ["fat"])
  medi = Profile(Z(np.array([290, 330, 400, 470, 520])), [0, 0, 4 * sw, 12 * sw, 15 * sw],
                 np.array([0, -5, -10, -18, -15]) * s, np.array([22, 26, 32, 45, 40]) * sw,
                 np.array([30, 45, 70, 80, 60]) * s)
  add(medi, "fat", ["lung"])
  carina = P(0, 12, 382)
  add(Capsule(P(0, 8, 290), carina, 9 * s), "gas")     # lower trachea (neck part: anatomy)
  for sx, lung in zip((-1, 1), lungs):
    hil = P(sx * 42, 14, 398)
    add(Capsule(carina, hil, 6.5 * s, 5.5 * s), "soft", ["lung", "fat"])
    add(Capsule(carina, hil, 5 * s, 4 * s), "gas")
    _tree(rng, add, hil, [sx * 0.6, 0.1, -0.2], 3.2 * s, 34 * s, "soft", ("lung",), 2, 0.8)
    _tree(rng, add, hil, [sx * 0.6, 0.1, -0.2], 2.2 * s, 34 * s, "gas", ("soft",), 2, 0.0)
    _tree(rng, add, hil + [0, -4, 6], [sx * 0.8, -0.2, 0.3], 5.5 * s, 40 * s, "blood", ("lung", "soft"), 3, 0.75)
    _tree(rng, add, hil + [0, 6, -12], [sx * 0.7, 0.3, -0.4], 5 * s, 38 * s, "artery", ("lung", "soft"), 3, 0.75)
  # heart: pericardial fat, myocardium, four chambers (left heart oxygenated -> "artery")
  hc = P(16 + j(4), -22, 448 + j(6))
  hrot = rotz(np.deg2rad(-35 + j(6))) @ rotx(np.deg2rad(25 + j(5)))
  add(Ellipsoid(hc, [70 * s, 58 * s, 55 * s], hrot, deform=deform(rng, 0.03)), "fat", ["lung", "fat"])
  add(Ellipsoid(hc, [62 * s, 50 * s, 48 * s], hrot, deform=deform(rng, 0.03)), "myocardium", ["lung", "fat"])
  L = lambda v: hc + hrot @ (np.asarray(v, float) * s)
  add(Ellipsoid(L([-14, -10, -4]), [24 * s, 16 * s, 30 * s], hrot), "blood", ["myocardium"])   # RV
  add(Ellipsoid(L([18, 6, -6]), [20 * s, 18 * s, 32 * s], hrot), "artery", ["myocardium"])     # LV
  add(Ellipsoid(L([-30, 8, 18]), [20 * s, 22 * s, 22 * s], hrot), "blood")                     # RA
  add(Ellipsoid(hc + np.array([4, 34, 26]) * s, [28 * s, 16 * s, 17 * s]), "artery")           # LA
  # great vessels: aorta (root, arch, descending), pulmonary trunk, SVC
  sy = lambda d: float(_spine_y(d))
  ao_arch = [hc + np.array([-4, 0, 34]) * s, P(-2, -25, 345), P(2, -8, 318), P(12, 22, 325),
             P(17, sy(400) - 20, 360), P(16, sy(450) - 22, 450), P(10, sy(560) - 26, 560)]
  _tube(add, ao_arch, 14 * s, "artery", None, 11.5 * s)
  add(Capsule(L([-6, -28, 10]), P(6, -12, 382), 13 * s, 12 * s), "blood")        # pulmonary trunk
  for sx in (-1, 1):
    add(Capsule(P(6, -12, 382), P(sx * 40, 12, 396), 10 * s, 8 * s), "blood")
  add(Capsule(P(-28, -10, 300), L([-30, 8, 30]), 10 * s), "vein")                 # SVC
  add(Capsule(P(6, sy(300) - 22, 290), P(28, sy(535) - 28, 535), 7 * s), "bowel", ["fat", "lung"])  # oesophagus
  if rng.random() < 0.3:
    add(Capsule(P(6, sy(340) - 22, 340), P(20, sy(480) - 26, 480), 3 * s), "gas", ["bowel"])
  if sex == "F":  # breasts on the anterior chest wall
    for sx in (-1, 1):
      _, cy0, a0, ba0, _ = trunk.at(Z(425))
      rr = rng.uniform(48, 75) * s * (0.8 + 0.4 * habitus)
      bc = np.array([sx * 78 * sw, cy0 - ba0 + 0.25 * rr, Z(428) + j(8)])
      add(Ellipsoid(bc, [rr, rr * 0.8, rr * 0.9], deform=deform(rng, 0.04)), "fat", ["air", "skin", "fat"])
      add(Ellipsoid(bc + [0, -5, 0], [rr * 0.6, rr * 0.5, rr * 0.55], deform=deform(rng, 0.25, 4, 6.0)), "breast", ["fat"])
      add(Ellipsoid(bc, [rr + 2, rr * 0.8 + 2, rr * 0.9 + 2]), "skin", ["air"])

  # --- liver: Couinaud segments as a smooth union, vessels, lesions ----------
  lsz = float(rng.uniform(0.86, 1.16)) * 0.78 * s   # x0.78: overlapping balls swell the union
  lc = P(-58 + j(5), -2 + j(4), 548 + j(8))
  left = float(rng.uniform(0.6, 1.4))          # left lateral segment size varies most
  riedel = float(rng.uniform(0.0, 1.0) ** 2) * (1.6 if sex == "F" else 1.0)
  seg = [  # (offset, radii, weight) in mm for s = 1, liver frame
      ((-22, 22, -2), (56, 48, 68), 1.0),          # right posterior (VI/VII)
      ((-8, -26, 4), (52, 44, 58), 1.0),           # right anterior (V/VIII)
      ((-12, 6, 42), (58, 56, 34), 1.0),           # dome (VII/VIII)
      ((30, -34, 14), (36, 34, 44), 1.0),          # left medial (IV)
      ((58 + 14 * left, -36, 24), (44 * left, 28, 30 * min(left, 1.1)), 0.95),  # left lateral (II/III)
      ((18, 28, 8), (22, 20, 32), 0.9),            # caudate (I)
      ((-40, 6, -66), (28, 32, 42 * (0.6 + riedel)), 0.6 + 0.4 * riedel),  # inferior right tip / Riedel lobe
  ]
  lrot = rot(rng, 8)
  cen = [lc + lrot @ (np.asarray(o, float) * lsz + rng.normal(0, 4, 3)) for o, _, _ in seg]
  rad = [np.asarray(r, float) * lsz * rng.uniform(0.9, 1.1, 3) for _, r, _ in seg]
  liver = Blob(cen, rad, [lrot @ rot(rng, 10) for _ in seg], [w for _, _, w in seg],
               deform=deform(rng, 0.05, 4, 3.0))
  # sample the liver once on a coarse grid: extent (coverage band) and interior points (lesions)
  pts, fval = liver.lattice_points().reshape(-1, 3), liver.lattice().ravel()
  inner = pts[fval > 0.8][::8]          # deep inside: lesion centres
  inl = pts[fval >= liver.level]
  liver_z = (float(inl[:, 2].min()), float(inl[:, 2].max())) if len(inl) else (float(lc[2] - 70), float(lc[2] + 70))
  add(liver.dilated(0.36), "muscle", ["lung"])   # diaphragm over the dome
  add(liver, "liver", ["fat", "lung", "muscle"])
  # IVC (retro-hepatic part runs in the liver's bare area), hepatic veins, portal tree
  ivc_pts = [P(-20, sy(735) - 12, 735), P(-22, sy(660) - 12, 660), P(-24, sy(600) - 4, 600),
             P(-20, 30, 520), P(-18, 26, 492), hc + np.array([-30, 12, 10]) * s]
  _tube(add, ivc_pts, 11 * s, "vein")
  hv_root = P(-18, 24, 494)
  for d in ([-0.9, -0.2, -0.35], [-0.15, -0.9, -0.4], [0.75, -0.55, -0.2]):
    _tree(rng, add, hv_root, d, 5.5 * s, 42 * s, "liver_vein", ("liver",), 2, 0.45)
  conf = P(4, sy(620) - 32, 618)                         # portal confluence behind the pancreas neck
  hilum = P(-26, 4, 575)
  _tube(add, [conf, hilum], 7 * s, "portal")
  for d in ([-1.0, 0.2, 0.15], [0.9, -0.6, 0.3]):
    _tree(rng, add, hilum, d, 5.5 * s, 32 * s, "liver_portal", ("liver",), 3, 0.55)
  add(Capsule(hilum, hilum + np.array([-6, 8, -18]) * s, 4 * s), "bile", ["liver", "fat"])   # common duct
  n_les = int(rng.choice([0, 0, 0, 1, 2, 3])) if lesions is None else int(lesions)
  hyper_patient = rng.random() < 0.35                 # HCC-like (arterial) vs metastases (hypo)
  liver_only = ("liver", "liver_portal", "liver_vein", "lesion", "lesion_hyper")
  for _ in range(n_les):
    if not len(inner):
      break
    c = inner[int(rng.integers(len(inner)))] + rng.normal(0, 2, 3)
    r = float(np.exp(rng.uniform(np.log(4.0), np.log(32.0))))
    radii = r * rng.uniform(0.8, 1.2, 3)
    hyper = hyper_patient if rng.random() < 0.85 else not hyper_patient
    shape = Ellipsoid(c, radii, rot(rng, 40), deform=deform(rng, 0.12, 3, 4.0))
    if hyper:
      add(shape, "lesion_hyper", liver_only)
      if r > 14:   # necrotic / washout core
        add(Ellipsoid(c, radii * 0.45, shape.rot, deform=deform(rng, 0.2, 3, 5.0)), "lesion", ("lesion_hyper",))
    else:
      add(shape, "lesion", liver_only)
      if r > 12:   # enhancing rim around a hypodense core
        add(shape, "lesion_hyper", ("lesion",))
        add(Ellipsoid(c, radii - 2.5, shape.rot, deform=shape.deform), "lesion", ("lesion_hyper",))
  # gallbladder in its fossa (under segments IV/V), size from contracted to distended
  gb = float(rng.uniform(0.5, 1.25))
  gbc = lc + lrot @ (np.array([12, -46, -38]) * lsz)
  add(Ellipsoid(gbc, [15 * s * gb, 14 * s * gb, 34 * s * gb], rotx(0.5) @ rot(rng, 15)), "bile",
      ["liver", "fat", "liver_portal", "liver_vein"])

  # --- upper abdomen: spleen, stomach, kidneys, pancreas, duodenum ----------
  spl = float(rng.uniform(0.8, 1.3)) * 0.75   # 0.1-0.35 l
  spc = P(82 + j(5), 48, 560 + j(8))
  sprot = rotx(np.deg2rad(-30)) @ rotz(np.deg2rad(30)) @ rot(rng, 10)
  add(Blob([spc + sprot @ (np.array(o) * s * spl) for o in ((0, 10, 28), (0, 0, 0), (-4, -14, -30))],
           [np.array(r) * s * spl for r in ((30, 22, 34), (34, 24, 36), (26, 20, 30))],
           [sprot] * 3, deform=deform(rng, 0.06, 3, 3.0)), "spleen", ["fat", "lung", "muscle"])
  # stomach: fundus under the left dome, body, antrum across the midline, pylorus
  dist = float(rng.uniform(0.55, 1.2))
  st_pts = [P(52, 18, 510), P(66, -10, 545), P(52, -45, 595), P(15, -55, 620), P(-18, -32, 618)]
  st_r = 32 * s * dist
  gas = float(rng.uniform(0.15, 0.6))
  content = "lumen" if rng.random() < 0.6 else "stool"
  _hollow(add, rng, st_pts, st_r, 5 * s, content, ["fat", "lung", "muscle", "liver", "spleen"], gas)
  # duodenum: D1-D4 around the pancreatic head
  duo = [P(-18, -32, 618), P(-38, -6, 612), P(-46, 8, 655), P(-20, 10, 690), P(18, 6, 688), P(35, 0, 655)]
  _hollow(add, rng, duo, 12 * s, 3 * s, "lumen", ["fat"], 0.2 if rng.random() < 0.4 else 0.0)
  for sx in (-1, 1):   # kidneys: cortex, pyramids, sinus fat, pelvis, ureter; adrenals
    kc = P(sx * 64, 58, 632 if sx < 0 else 615) + rng.normal(0, 4, 3)
    krot = rotz(np.deg2rad(sx * 30)) @ roty(np.deg2rad(sx * 12)) @ rotx(np.deg2rad(-12)) @ rot(rng, 6)
    kr = np.array([26, 21, 55]) * s * rng.uniform(0.9, 1.1)
    add(Ellipsoid(kc, kr, krot, deform=deform(rng, 0.04)), "kidney",
        ["fat", "liver", "spleen", "muscle", "liver_portal", "liver_vein"])
    for t in np.linspace(-0.75, 0.75, 6):      # medullary pyramids in a ring inside the cortex
      for side in (-1, 1):
        pc = kc + krot @ (np.array([side * 0.42, 0.15, t * 0.9]) * kr)
        add(Ellipsoid(pc, [6 * s, 6 * s, 9 * s], krot), "medulla", ["kidney"])
    sinus = kc + krot @ np.array([-sx * 0.55 * kr[0], -0.3 * kr[1], 0])
    add(Ellipsoid(sinus, [13 * s, 11 * s, 32 * s], krot), "fat", ["kidney", "medulla"])
    pel = kc + krot @ np.array([-sx * 0.6 * kr[0], -0.2 * kr[1], 0])
    add(Ellipsoid(pel, np.array([8, 6, 14]) * s * rng.uniform(0.7, 1.5), krot), "collecting", ["fat", "kidney", "medulla"])
    _tube(add, [pel, P(sx * 48, sy(720) - 15, 720), P(sx * 45, 40, 800), P(sx * 20, -5, 850)], 2.5 * s, "collecting", ["fat", "muscle"])
    add(Capsule(P(sx * 32, sy(620) - 10, 635 if sx < 0 else 618), pel, 3.5 * s), "artery", ["fat"])   # renal artery
    add(Capsule(pel + [0, -6, 0], P(-22 if sx < 0 else 0, sy(630) - 22, 630), 5 * s), "vein", ["fat"])  # renal vein
    add(Capsule(kc + krot @ np.array([sx * -6, 0, kr[2] * 1.05]), kc + krot @ np.array([sx * -10, -6, kr[2] * 1.5]),
                3 * s, 2 * s), "soft", ["fat"])   # adrenal limb
  # pancreas: head in the duodenal C, uncinate, neck, body over the aorta, tail to the splenic hilum
  pan = [P(-36, 12, 665), P(-26, 0, 645), P(-4, -6, 628), P(30, 6, 612), P(62, 24, 598), P(76, 36, 588)]
  pr = np.array([16, 15, 12, 12, 10, 8]) * s * rng.uniform(0.75, 1.15)
  for i in range(len(pan) - 1):
    add(Capsule(pan[i] + rng.normal(0, 1.5, 3), pan[i + 1], pr[i], pr[i + 1]), "pancreas", ["fat"])
  add(Capsule(P(76, 40, 580), P(4, sy(620) - 32, 618) + [0, 2, 0], 5 * s, 6 * s), "portal", ["fat", "pancreas"])  # splenic vein
  add(Capsule(P(6, -12, 740), conf, 6 * s), "portal", ["fat", "pancreas", "bowel"])       # SMV
  # abdominal aorta with celiac, SMA, bifurcation; iliac arteries and veins
  ao = [ao_arch[-1], P(8, sy(620) - 26, 620), P(6, sy(700) - 25, 700)]
  _tube(add, ao, 11.5 * s, "artery", None, 9.5 * s)
  plaque = age > 55 and rng.random() < 0.6
  add(Capsule(P(8, sy(598) - 36, 598), P(8, sy(598) - 54, 592), 3.5 * s), "artery", ["fat", "pancreas"])   # celiac
  add(Capsule(P(8, sy(598) - 54, 592), hilum + [0, 0, -10], 2.5 * s), "artery", ["fat", "pancreas"])      # hepatic a.
  add(Capsule(P(8, sy(598) - 54, 592), P(76, 40, 578), 2.5 * s), "artery", ["fat", "pancreas"])           # splenic a.
  _tube(add, [P(7, sy(612) - 36, 612), P(9, -20, 640), P(12, -20, 740)], 4 * s, "artery", ["fat", "pancreas", "bowel", "lumen"])
  for sx in (-1, 1):
    _tube(add, [P(6, sy(700) - 25, 700), P(sx * 40, sy(760) - 30, 760), P(sx * 62, 5, 820), P(sx * 84, -20, 880)],
          7 * s, "artery", None, 5.5 * s)
    _tube(add, [P(-14, sy(735) - 12, 735), P(sx * 40, sy(770) - 20, 770), P(sx * 62, 14, 828), P(sx * 80, -15, 885)],
          8 * s, "vein", None, 6.5 * s)
  if plaque:
    for _ in range(int(rng.integers(2, 8))):
      z = float(rng.uniform(Z(700), Z(600)))
      t = (Z(600) - z) / (Z(600) - Z(700))   # 0 at the celiac level, 1 at the bifurcation
      c = np.array([(8 - 2 * t) * sw, (sy(600 + 100 * t) - 25) * s, z]) + rng.normal(0, 1, 3)
      ang = rng.uniform(0, 2 * np.pi)
      add(Ellipsoid(c + 10 * s * np.array([np.cos(ang), np.sin(ang), 0]), [2.5, 2.5, 4]), "bone", ["artery", "fat"])

  # --- bowel: colon frame with haustra, small-bowel loops ---------------------
  colon = [P(-72, -10, 752), P(-80, 10, 690), P(-78, 18, 640), P(-45, -62, 655), P(15, -68, 680),
           P(78, 12, 602), P(86, 22, 670), P(84, 20, 740), P(55, -20, 790), P(5, 5, 805), P(2, 62, 835), P(0, 55, 885)]
  colon = [p + rng.normal(0, 5, 3) for p in colon]
  crad = [28, 24, 22, 22, 22, 22, 20, 18, 18, 18, 20, 18]
  for i in range(len(colon) - 1):
    gasf = float(rng.uniform(0.2, 0.8)) if rng.random() < 0.7 else 0.0
    _hollow(add, rng, colon[i:i + 2], crad[i] * s * rng.uniform(0.8, 1.15), 3 * s,
            "stool" if rng.random() < 0.6 else "lumen", ["fat", "muscle"], gasf, haustra=0.15)
  n_loops = int(np.clip(round(9 - 4 * habitus + rng.normal(0, 1)), 4, 11))
  for _ in range(n_loops):
    p = P(rng.uniform(-55, 55), rng.uniform(-60, 15), rng.uniform(650, 790))
    pts = [p]
    for _ in range(6):
      q = pts[-1] + rng.normal(0, 24, 3) * s
      q[2] = np.clip(q[2], Z(800), Z(640))
      q[1] = np.clip(q[1], -80 * s, 30 * s)
      pts.append(q)
    collapsed = rng.random() < 0.35
    _hollow(add, rng, pts, (7 if collapsed else 12) * s, (7 if collapsed else 2.5) * s, "lumen", ["fat"],
            0.0 if rng.random() < 0.8 else 0.3)

  # --- pelvis organs ------------------------------------------------------------
  bl = float(rng.uniform(0.45, 1.25))
  add(Ellipsoid(P(0, -22, 858), np.array([44, 36, 34]) * s * bl, deform=deform(rng, 0.05)), "bowel",
      ["fat", "lumen", "stool", "gas"])
  add(Ellipsoid(P(0, -22, 858), np.array([44, 36, 34]) * s * bl - 3, deform=deform(rng, 0.05)), "urine", ["bowel"])
  if sex == "F":
    add(Ellipsoid(P(0, 12, 820), [28 * s, 20 * s, 40 * s], rotx(0.6), deform=deform(rng, 0.05)), "soft", ["fat", "bowel", "lumen", "stool"])
  else:
    add(Ellipsoid(P(0, 8, 895), [20 * s, 16 * s, 18 * s]), "soft", ["fat", "muscle"])

  # --- muscles: psoas, quadratus lumborum, paraspinals, iliacus -----------------
  for sx in (-1, 1):
    psoas = [P(sx * 24, sy(600) + 5, 598), P(sx * 40, sy(680) + 2, 680), P(sx * 52, 25, 745), P(sx * 68, -8, 820),
             P(sx * 76, -12, 905)]
    for i, rr in enumerate((8, 18, 24, 21, 14)):
      if i < len(psoas) - 1:
        add(Capsule(psoas[i], psoas[i + 1], rr * s, (8, 18, 24, 21, 14)[i + 1] * s), "muscle", ["fat", "collecting"])
    add(Capsule(P(sx * 58, 78, 615), P(sx * 66, 80, 725), 11 * s, 15 * s), "muscle", ["fat"])   # quadratus
    for d0, d1, r0, r1 in ((300, 470, 16, 20), (470, 640, 20, 26), (640, 780, 26, 24)):   # erector spinae
      add(Capsule(P(sx * 32, sy(d0) + 45, d0), P(sx * 34, sy(d1) + 48, d1), r0 * s, r1 * s), "muscle", ["fat"])

  # --- spine: vertebrae, discs, canal, cord --------------------------------------
  scol = float(rng.normal(0, 3))
  xs = lambda d: scol * np.sin((d - 290) / 300 * np.pi) * s
  prev = None
  for name, depth, hh in _vertebrae():
    if Z(depth) > z_neck:
      continue
    y, z = sy(depth) * s, Z(depth)
    kind = name[0]
    rx, ry = {"C": (10, 8), "T": (13 + 0.5 * int(name[1:]), 11 + 0.4 * int(name[1:])), "L": (22, 17)}[kind]
    rx, ry, hz = rx * s, ry * s, hh * s
    c = np.array([xs(depth), y, z])
    add(Ellipsoid(c, [rx, ry, hz], e=3.0), "bone")
    add(Ellipsoid(c, [rx - 1.8, ry - 1.8, hz - 1.5], e=3.0), "marrow", ["bone"])
    if prev is not None:   # disc between this body and the one above
      mid = (prev + c) / 2
      add(Ellipsoid(mid, [rx * 0.95, ry * 0.95, max(abs(prev[2] - c[2]) / 2 - hz * 0.9, 1.5 * s)], e=2.6), "disc",
          ["muscle", "fat", "soft", "bone", "marrow", "gas", "lung", "artery", "vein", "bowel"])
    prev = c
    canal = 7.5 * s if kind != "L" else 9.5 * s
    back = c + [0, ry + canal + 3 * s, 0]
    for sxp in (-1, 1):   # pedicles, transverse processes
      add(Capsule(c + [sxp * rx * 0.55, ry * 0.6, 0], back + [sxp * (canal + 2 * s), -2 * s, 0], 3.5 * s), "bone")
      tlen = {"C": 14, "T": 26, "L": 30}[kind] * s
      add(Capsule(back + [sxp * (canal + 2 * s), -4 * s, 0], back + [sxp * (canal + tlen), 4 * s, 0], 3.5 * s), "bone")
    add(Capsule(back + [-canal, 2 * s, 0], back + [canal, 2 * s, 0], 3.5 * s), "bone")   # lamina
    sp_len = {"C": 16, "T": 30, "L": 28}[kind] * s
    add(Capsule(back + [0, 3 * s, 0], back + [0, 3 * s + sp_len, -sp_len * (0.8 if kind == "T" else 0.2)],
                3.5 * s, 3 * s), "bone")   # spinous process
  # sacrum and coccyx (wedge), canal and cord
  sac = P(0, 70, 800)
  add(Ellipsoid(sac, [44 * s, 16 * s, 52 * s], rotx(-0.55), e=2.4), "bone")
  add(Ellipsoid(sac, [40 * s, 12 * s, 48 * s], rotx(-0.55), e=2.4), "marrow", ["bone"])
  add(Capsule(P(0, 72, 852), P(0, 60, 878), 7 * s, 4 * s), "bone")
  canal_d = [d for d in range(140, 800, 40) if Z(d) <= z_neck + 40 * s]
  canal_pts = [np.array([xs(d), (sy(d) + (18 if d < 600 else 25)) * s, Z(d)]) for d in canal_d]
  _tube(add, canal_pts, 7.5 * s, "csf", ["bone", "marrow", "muscle", "fat", "disc", "soft"])
  cord_pts = [p for p, d in zip(canal_pts, canal_d) if d <= 620]
  _tube(add, cord_pts, 4.5 * s, "cord", ["csf"], 3.0 * s)

  # --- ribs, costal cartilage, sternum --------------------------------------------
  ba_st = cavity.at(Z(380))[3]
  st_y = -ba_st - 2 * s
  for d0, d1, r in ((300, 345, 11), (350, 455, 8), (455, 480, 5)):
    add(Capsule([0, st_y, Z(d0)], [0, st_y + (5 if d1 > 450 else 0) * s, Z(d1)], r * s * 1.1, r * s), "bone",
        ["muscle", "fat", "lung"])
    add(Capsule([0, st_y, Z(d0)], [0, st_y, Z(d1)], (r - 3) * s, (r - 3.5) * s), "marrow", ["bone"])
  for i, (name, depth, _) in enumerate(v for v in _vertebrae() if v[0][0] == "T"):
    z0 = Z(depth)
    _, cy0, a_c, ba_c, bp_c = cavity.at(z0)
    drop = (22 + 3 * i) * s                # ribs slope down anteriorly
    end = np.pi * (0.93 if i < 7 else 0.93 - 0.06 * (i - 6) if i < 10 else 0.5 - 0.08 * (i - 10))
    ts = np.linspace(0.05 * np.pi, end, 9)
    for sxr in (-1, 1):
      rr = 1.0 + 0.04 * np.sin(ts)
      pts = [np.array([sxr * (a_c + 4 * s) * np.sin(t) * rr[k], cy0 + (bp_c + 6 * s) * np.cos(t) if np.cos(t) > 0
                       else cy0 + (ba_c + 5 * s) * np.cos(t), z0 - drop * (1 - np.cos(t)) / 2])
             for k, t in enumerate(ts)]
      head = np.array([sxr * 14 * s, sy(depth) * s + 10 * s, z0])
      pts = [head] + pts
      _tube(add, pts, 4.8 * s, "bone", ["muscle", "fat", "lung"])
      _tube(add, pts[1:], 2.2 * s, "marrow", ["bone"])
      if i < 10:   # costal cartilage to the sternum (1-7) or to the costal margin (8-10)
        tgt = np.array([sxr * 16 * s, st_y, Z(300 + 22 * min(i, 6) + 18)]) if i < 7 else pts[-1] + [-sxr * 28 * s, -12 * s, 22 * s]
        add(Capsule(pts[-1], tgt, 4 * s), "cartilage", ["muscle", "fat", "lung", "liver"])

  # --- pelvic bones, hips, femora ----------------------------------------------------
  hip = 1.08 if sex == "F" else 1.0
  for sx in (-1, 1):
    il = Ellipsoid(P(sx * 88 * hip, 32, 770), [54 * s, 11 * s, 56 * s],
                   rotz(np.deg2rad(sx * -38)) @ roty(sx * 0.3) @ rot(rng, 4), e=2.3, deform=deform(rng, 0.04))
    add(il, "bone")
    add(Ellipsoid(il.c, il.radii - [3, 3.5, 3], il.rot, e=2.3, deform=il.deform), "marrow", ["bone"])
    add(Capsule(P(sx * 50, 60, 790), P(sx * 70, 45, 790), 14 * s), "bone")   # sacro-iliac joint
    fh = P(sx * 86 * hip, 0, 850)
    add(Ellipsoid(fh, [24 * s] * 3), "bone")
    add(Ellipsoid(fh, [20.5 * s] * 3), "marrow", ["bone"])
    gt = P(sx * 118 * hip, 12, 868)
    add(Capsule(fh, gt, 15 * s), "bone")
    add(Capsule(fh, gt, 11 * s), "marrow", ["bone"])
    add(Ellipsoid(gt, [16 * s, 18 * s, 22 * s]), "bone")
    add(Ellipsoid(gt, [12.5 * s, 14.5 * s, 18.5 * s]), "marrow", ["bone"])
    add(Capsule(gt, P(sx * 98, 5, 1150), 14 * s, 13 * s), "bone")
    add(Capsule(gt + [0, 0, -40 * s], P(sx * 98, 5, 1150), 8 * s), "marrow", ["bone"])
    add(Capsule(fh + [-sx * 10 * s, -10 * s, -6 * s], P(sx * 14, -56, 872), 9 * s), "bone")      # superior pubic ramus
    add(Capsule(fh + [-sx * 2 * s, 20 * s, -20 * s], P(sx * 55, 28, 908), 12 * s, 14 * s), "bone")  # ischium
    add(Capsule(P(sx * 55, 28, 908), P(sx * 14, -50, 896), 8 * s), "bone")                         # inferior ramus
    add(Ellipsoid(fh + [-sx * 6 * s, 0, 0], [30 * s, 30 * s, 30 * s]), "bone", ["muscle", "fat"])  # acetabular rim
    add(Ellipsoid(fh, [24.5 * s] * 3), "cartilage", ["bone"])                                      # joint space
    add(Ellipsoid(fh, [24 * s] * 3), "bone", ["cartilage"])
    add(Ellipsoid(fh, [20.5 * s] * 3), "marrow", ["bone"])

  bands = {
      "lung": (Z(492), Z(285)),
      "breast": (Z(480), Z(370)),
      "liver": liver_z,
      "kidney": (Z(632 + 58), Z(615 - 58)),
      "intestine": (Z(790), Z(605)),
      "pelvis": (Z(905), Z(725)),
  }
  hw = float(max(trunk.k[2].max(), 0))
  hd = float(max((trunk.k[3] + trunk.k[4]).max() / 2, 0))
  return Body(bands=bands, half_width=hw, half_depth=hd, lesions=n_les, ct=_patient_ct(rng, age), liver=liver)
