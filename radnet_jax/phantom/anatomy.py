"""Parametric human body (head to upper thighs) in physical mm, DICOM LPS.

The patient lies supine, head first: +X = patient left, +Y = posterior,
+Z = superior. A body is a list of analytic shapes (superquadric ellipsoids
with smooth random deformations, capsules, elliptic profiles along Z) painted
in order into a tissue-label map; shapes are evaluated only at the voxel
centres of the sampling grid that fall in their bounding box, so rendering a
series costs little more than its own voxel count.

Landmark depths are mm below the skull vertex for a 1750 mm adult and are
scaled by the patient's height; organ sizes, positions and shapes are jittered
per patient, so no two patients are alike.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from radnet_jax.phantom.head import TemplateHead

# Tissue ids (index into the physics tables).
TISSUES = ("air", "skin", "fat", "muscle", "bone", "marrow", "gm", "wm", "csf",
           "gas", "lung", "blood", "myocardium", "liver", "spleen", "kidney",
           "medulla", "bowel", "urine", "thyroid", "lesion", "breast",
           "vitreous", "cord", "bile", "soft", "disc")
T = {name: i for i, name in enumerate(TISSUES)}


@dataclasses.dataclass
class Grid:
  """A sampling grid: voxel (k, i, j) -> origin + k dz n + i di c + j dj r (mm).

  r: unit vector of increasing column index j (IOP first triplet); c: unit
  vector of increasing row index i (IOP second triplet); n: slice direction.
  spacing = (dz, di, dj) mm; shape = (K, I, J) = (slices, rows, columns).
  """
  origin: np.ndarray
  r: np.ndarray
  c: np.ndarray
  n: np.ndarray
  spacing: tuple
  shape: tuple

  def index_of(self, p: np.ndarray) -> np.ndarray:
    """World points (..., 3) -> fractional (k, i, j) indices (..., 3)."""
    d = np.asarray(p, np.float64) - self.origin
    return np.stack([d @ self.n / self.spacing[0], d @ self.c / self.spacing[1],
                     d @ self.r / self.spacing[2]], -1)

  def points(self, box) -> np.ndarray:
    """World coordinates (nk, ni, nj, 3) float32 of the voxels in an index box."""
    (k0, k1), (i0, i1), (j0, j1) = box
    cache = getattr(self, "_cache", None)
    if cache is None and int(np.prod(self.shape)) <= 8_000_000:
      cache = self._cache = self._points(((0, self.shape[0]), (0, self.shape[1]), (0, self.shape[2])))
    if cache is not None:
      return cache[k0:k1, i0:i1, j0:j1]
    return self._points(box)

  def _points(self, box) -> np.ndarray:
    (k0, k1), (i0, i1), (j0, j1) = box
    dz, di, dj = self.spacing
    f = np.float32
    k = (np.arange(k0, k1, dtype=f) * f(dz))[:, None] * self.n.astype(f)
    i = (np.arange(i0, i1, dtype=f) * f(di))[:, None] * self.c.astype(f)
    j = (np.arange(j0, j1, dtype=f) * f(dj))[:, None] * self.r.astype(f) + self.origin.astype(f)
    return k[:, None, None, :] + (i[:, None, :] + j[None, :, :])[None]

  def box(self, lo: np.ndarray, hi: np.ndarray):
    """Index box (clipped) holding the world AABB [lo, hi], or None if empty."""
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                        for z in (lo[2], hi[2])])
    idx = self.index_of(corners)
    out = []
    for a in range(3):
      b0 = max(int(np.floor(idx[:, a].min())), 0)
      b1 = min(int(np.ceil(idx[:, a].max())) + 1, self.shape[a])
      if b1 <= b0:
        return None
      out.append((b0, b1))
    return out


def _pow(q: np.ndarray, e: float) -> np.ndarray:
  """|q|^e with cheap special cases (2, 2.5, 3)."""
  if e == 2.0:
    return q * q
  a = np.abs(q)
  if e == 2.5:
    return q * q * np.sqrt(a)
  if e == 3.0:
    return a * a * a
  return a ** e


class Ellipsoid:
  """Superquadric |x/a|^e + |y/b|^e + |z/c|^e <= 1 + smooth deformation."""

  def __init__(self, center, radii, rot=None, e=2.0, deform=()):
    self.c = np.asarray(center, np.float32)
    self.radii = np.asarray(radii, np.float32)
    self.rot = np.eye(3, dtype=np.float32) if rot is None else np.asarray(rot, np.float32)
    self.e = e
    self.deform = tuple(deform)  # (k (3,), phase, amplitude) in unit coordinates
    amp = 1.0 + sum(abs(d[2]) for d in self.deform)
    half = np.sqrt(((self.rot * self.radii[None, :]) ** 2).sum(1)) * amp ** (1 / e) * 1.1
    self.lo, self.hi = self.c - half, self.c + half

  def inside(self, p: np.ndarray) -> np.ndarray:
    q = ((p - self.c) @ self.rot) / self.radii
    f = _pow(q, self.e).sum(-1)
    lim = 1.0
    for k, ph, amp in self.deform:
      lim = lim + amp * np.sin(q @ np.asarray(k, np.float32) + ph)
    return f <= lim


class Capsule:
  """Segment a-b with radius ra at a, rb at b (a tube piece)."""

  def __init__(self, a, b, ra, rb=None):
    self.a, self.b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    self.ra, self.rb = float(ra), float(ra if rb is None else rb)
    r = max(self.ra, self.rb)
    self.lo = np.minimum(self.a, self.b) - r
    self.hi = np.maximum(self.a, self.b) + r

  def inside(self, p: np.ndarray) -> np.ndarray:
    ab = self.b - self.a
    t = np.clip(((p - self.a) @ ab) / max(float(ab @ ab), 1e-6), 0.0, 1.0)
    d = p - (self.a + t[..., None] * ab)
    rad = self.ra + (self.rb - self.ra) * t
    return (d * d).sum(-1) <= rad * rad


class Profile:
  """Elliptic cylinder along Z with knot-interpolated centre and half-axes."""

  def __init__(self, z, cx, cy, a, b, e=2.0):
    order = np.argsort(z)
    self.z = np.asarray(z, np.float32)[order]
    self.cx, self.cy = (np.asarray(v, np.float32)[order] for v in (cx, cy))
    self.a, self.b = (np.asarray(v, np.float32)[order] for v in (a, b))
    self.e = e
    self.lo = np.array([(self.cx - self.a).min(), (self.cy - self.b).min(), self.z[0]])
    self.hi = np.array([(self.cx + self.a).max(), (self.cy + self.b).max(), self.z[-1]])

  def _lut(self):
    if not hasattr(self, "_tab"):
      zz = np.arange(self.z[0], self.z[-1] + 1.0, 1.0, dtype=np.float32)
      self._tab = np.stack([np.interp(zz, self.z, v) for v in (self.cx, self.cy, 1 / self.a, 1 / self.b)]
                           ).astype(np.float32)
    return self._tab

  def inside(self, p: np.ndarray) -> np.ndarray:
    tab = self._lut()   # 1 mm look-up table of centre and half-axes along Z
    z = p[..., 2]
    idx = np.clip((z - self.z[0] + 0.5).astype(np.int32), 0, tab.shape[1] - 1)
    u = (p[..., 0] - tab[0][idx]) * tab[2][idx]
    v = (p[..., 1] - tab[1][idx]) * tab[3][idx]
    return ((_pow(u, self.e) + _pow(v, self.e)) <= 1.0) & (z >= self.z[0]) & (z <= self.z[-1])

  def inset(self, t: float) -> "Profile":
    return Profile(self.z, self.cx, self.cy, np.maximum(self.a - t, 1.0),
                   np.maximum(self.b - t, 1.0), self.e)


@dataclasses.dataclass
class Patient:
  """One simulated patient.

  paint: ordered (shape, tissue id, allowed tissue ids or None) operations.
  bands: coverage band -> (z_low, z_high) mm extent in this patient.
  fov: region -> (z_low, z_high) of the usual scan range for that region.
  """
  pid: int
  sex: str
  height: float
  age: int
  weight: float
  z_vertex: float
  paint: list
  bands: dict
  half_width: float
  half_depth: float
  lesions: int
  head: TemplateHead | None = None


def _rot(rng, deg: float) -> np.ndarray:
  """Random rotation of up to ``deg`` degrees about a random axis."""
  axis = rng.normal(size=3)
  axis /= np.linalg.norm(axis)
  ang = np.deg2rad(rng.uniform(-deg, deg))
  k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
  return np.eye(3) + np.sin(ang) * k + (1 - np.cos(ang)) * k @ k


def _deform(rng, amp: float, n: int = 3, freq: float = 2.5):
  return tuple((rng.normal(size=3) * freq, rng.uniform(0, 2 * np.pi), amp * rng.uniform(0.3, 1.0))
               for _ in range(n))


def make_patient(rng: np.random.Generator, pid: int = 0, lesions: int | None = None) -> Patient:
  """Samples one patient (sex, size, organ layout, lesions) -> Patient.

  lesions: number of liver lesions (default: random 0-3).
  """
  sex = "F" if rng.random() < 0.5 else "M"
  height = float(rng.normal(1640 if sex == "F" else 1770, 60))
  s = height / 1750.0
  fat = float(rng.uniform(6, 30))          # subcutaneous fat thickness, mm
  wide = float(rng.uniform(0.9, 1.12))      # body habitus
  zv = float(rng.uniform(-40, 60)) + 100.0  # table position of the vertex
  j = lambda sd: float(rng.normal(0, sd))
  Z = lambda depth: zv - depth * s                                   # depth -> z mm
  ops: list = []
  add = lambda shape, tissue, only=None: ops.append((shape, T[tissue], None if only is None else tuple(T[o] for o in only)))

  # --- body envelope: head, neck, trunk, thighs -----------------------------
  # The head (brain, skull, face, neck down to C5) is the deformed template
  # of radnet_jax.phantom.head; the parametric body below joins it at the neck.
  head = TemplateHead(rng, T, scale=s, z_vertex=zv)
  depths = np.array([190, 262, 300, 400, 500, 600, 700, 800, 915])
  a = np.array([52, 58, 160, 158, 150, 148, 152, 170, 172]) * s * wide
  b = np.array([56, 60, 100, 108, 112, 112, 108, 106, 100]) * s * wide
  hip_f = 1.08 if sex == "F" else 1.0
  a[-2:] *= hip_f
  cy = np.array([12, 15, 0, 0, 0, 0, 0, 0, 0], float)
  trunk = Profile(Z(depths), np.zeros(9), cy, a, b, e=2.5)
  legs = [Profile(Z(np.array([905, 1150])), [sx * 88 * s * hip_f] * 2, [0, 0],
                  np.array([82, 68]) * s * wide, np.array([84, 70]) * s * wide)
          for sx in (-1, 1)]
  for shape in [trunk] + legs:
    add(shape, "skin")
  for shape in [trunk] + legs:
    add(shape.inset(2.0), "fat")
  add(trunk.inset(2.0 + fat), "muscle")
  for lg in legs:
    add(lg.inset(2.0 + fat * 0.8), "muscle")

  # --- neck and airway ------------------------------------------------------
  carina = np.array([0, 10 * s, Z(380)])
  add(Capsule([0, -14 * s, head.z_bottom + 10], carina, 9 * s), "gas")
  for sx in (-1, 1):
    add(Ellipsoid([sx * 18 * s, -20 * s, Z(258)], [9 * s, 10 * s, 22 * s], deform=_deform(rng, 0.05)), "thyroid")

  # --- thorax ---------------------------------------------------------------
  add(Profile(Z(np.array([285, 320, 420, 540])), np.zeros(4), [8, 5, 5, 8],
              np.array([60, 125, 135, 135]) * s * wide, np.array([55, 85, 95, 95]) * s * wide), "fat")
  lungs = []
  for sx in (-1, 1):
    w = 1.0 if sx < 0 else 0.92
    lung = Ellipsoid([sx * 65 * s * wide, 12 * s + j(3), Z(410) + j(5)], [58 * s * w * wide, 82 * s * wide, 135 * s],
                     e=2.3, deform=_deform(rng, 0.05))
    lungs.append(lung)
    add(lung, "lung", ["fat", "muscle"])
  heart_c = np.array([18 * s + j(4), -25 * s, Z(445) + j(6)])
  add(Ellipsoid(heart_c, [62 * s, 52 * s, 48 * s], _rot(rng, 15) @ _rot(rng, 0) , deform=_deform(rng, 0.04)), "myocardium")
  add(Ellipsoid(heart_c + [-12 * s, -2, 6], [25 * s, 22 * s, 22 * s]), "blood", ["myocardium"])
  add(Ellipsoid(heart_c + [16 * s, 6, -6], [24 * s, 20 * s, 22 * s]), "blood", ["myocardium"])
  # aorta: ascending, arch, descending, bifurcation; IVC; pulmonary trunk
  ao = [heart_c + [0, 0, 30 * s], [5 * s, -15 * s, Z(345)], [0, 0, Z(325)], [-18 * s, 35 * s, Z(345)],
        [-14 * s, 45 * s, Z(480)], [-10 * s, 25 * s, Z(620)], [-5 * s, 15 * s, Z(740)]]
  for p0, p1 in zip(ao[:-1], ao[1:]):
    add(Capsule(p0, p1, 14 * s, 12 * s), "blood")
  for sx in (-1, 1):
    add(Capsule(ao[-1], [sx * 45 * s, 20 * s, Z(830)], 8 * s, 7 * s), "blood")
    add(Capsule([sx * 45 * s, 20 * s, Z(830)], [sx * 85 * s, -10 * s, Z(930)], 7 * s, 6 * s), "blood")
  ivc = [[25 * s, 25 * s, Z(760)], [25 * s, 25 * s, Z(600)], [28 * s, 15 * s, Z(500)], heart_c + [25 * s, 0, 0]]
  for p0, p1 in zip(ivc[:-1], ivc[1:]):
    add(Capsule(p0, p1, 12 * s), "blood")
  add(Capsule(heart_c + [-5, -10, 20], [-15 * s, 5 * s, Z(390)], 13 * s, 11 * s), "blood")
  for lung, sx in zip(lungs, (-1, 1)):  # pulmonary vessel trees, only inside lung
    hil = np.array([sx * 45 * s, 12 * s, Z(395)])
    stack = [(hil, 6.0 * s, 0)]
    while stack:
      p, rad, lev = stack.pop()
      for _ in range(2):
        d = rng.normal(size=3) + [sx * 1.2, 0, 0]
        d /= np.linalg.norm(d)
        q = p + d * rng.uniform(28, 45) * s * (0.8 ** lev)
        add(Capsule(p, q, rad, rad * 0.7), "blood", ["lung"])
        if lev < 3:
          stack.append((q, rad * 0.7, lev + 1))
    add(Capsule(carina, hil + [0, 0, 5], 7 * s, 5 * s), "gas")
  for r_i in range(10):  # ribs: elliptic arcs hugging the thoracic cavity
    zr = Z(300 + r_i * 24)
    ra, rb = 140 * s * wide * min(1.0, 0.8 + r_i * 0.06), 100 * s * wide
    angs = np.linspace(-0.1, np.pi + 0.1, 12)
    for sx in (-1, 1):
      pts = [[sx * ra * np.sin(t), -rb * np.cos(t) * 0.95, zr - 30 * s * np.cos(t / 2)] for t in angs[1:]]
      for p0, p1 in zip(pts[:-1], pts[1:]):
        add(Capsule(p0, p1, 5 * s), "bone", ["muscle", "fat"])
  add(Capsule([0, -100 * s, Z(305)], [0, -105 * s, Z(470)], 9 * s), "bone", ["muscle", "fat"])
  if sex == "F":
    for sx in (-1, 1):
      bc = np.array([sx * 85 * s, -110 * s * wide - 20, Z(425) + j(8)])
      rr = rng.uniform(50, 75) * s
      add(Ellipsoid(bc, [rr, rr * 0.8, rr * 0.9], deform=_deform(rng, 0.04)), "fat", ["air", "skin", "fat"])
      add(Ellipsoid(bc + [0, -5, 0], [rr * 0.6, rr * 0.5, rr * 0.55], deform=_deform(rng, 0.25, 4, 6.0)), "breast", ["fat"])
      add(Ellipsoid(bc, [rr + 2, rr * 0.8 + 2, rr * 0.9 + 2]), "skin", ["air"])

  # --- abdomen --------------------------------------------------------------
  add(Ellipsoid([0, 8 * s, Z(690)], [138 * s * wide, 92 * s * wide, 205 * s], e=2.6), "fat", ["muscle", "lung", "fat", "myocardium", "blood"])
  liver_c = np.array([-55 * s + j(6), -5 * s + j(5), Z(560) + j(8)])
  liver = Ellipsoid(liver_c, [95 * s, 80 * s, 72 * s] * rng.uniform(0.92, 1.08, 3), _rot(rng, 12), e=2.2,
                    deform=_deform(rng, 0.08))
  add(liver, "liver")
  add(Ellipsoid(liver_c + [70 * s, -25 * s, 25 * s], [60 * s, 40 * s, 30 * s], _rot(rng, 10), deform=_deform(rng, 0.08)), "liver")
  for _ in range(int(rng.integers(0, 4))):  # portal / hepatic vessels
    add(Capsule(liver_c + rng.normal(0, 15, 3), liver_c + rng.normal(0, 45, 3), 4 * s, 2 * s), "blood", ["liver"])
  n_les = int(rng.choice([0, 0, 1, 2, 3]))
  n_les = n_les if lesions is None else lesions
  for _ in range(n_les):
    add(Ellipsoid(liver_c + rng.normal(0, 30, 3) * s, [rng.uniform(6, 22)] * 3, deform=_deform(rng, 0.1)), "lesion", ["liver"])
  add(Ellipsoid(liver_c + [25 * s, -20 * s, -60 * s], [16 * s, 14 * s, 30 * s], _rot(rng, 20)), "bile")
  add(Ellipsoid([75 * s + j(5), 55 * s, Z(560) + j(8)], [35 * s, 25 * s, 55 * s], _rot(rng, 20), deform=_deform(rng, 0.06)), "spleen")
  st = np.array([55 * s, -30 * s, Z(545) + j(8)])
  add(Ellipsoid(st, [45 * s, 35 * s, 55 * s], _rot(rng, 20), deform=_deform(rng, 0.08)), "bowel")
  add(Ellipsoid(st + [0, -5, 0], [38 * s, 28 * s, 48 * s], _rot(rng, 20)), "urine" if rng.random() < 0.5 else "soft", ["bowel"])
  add(Ellipsoid(st + [0, -30 * s, 10], [40 * s, 20 * s, 45 * s]), "gas", ["bowel", "urine", "soft"])
  kid_depth = {}
  for sx in (-1, 1):
    kc = np.array([sx * 62 * s, 45 * s, Z(620 if sx > 0 else 635) + j(8)])
    rot = _rot(rng, 15)
    add(Ellipsoid(kc, [27 * s, 24 * s, 55 * s], rot, deform=_deform(rng, 0.05)), "kidney")
    add(Ellipsoid(kc - [sx * 4, 0, 0], [15 * s, 13 * s, 42 * s], rot), "medulla", ["kidney"])
    add(Ellipsoid(kc - [sx * 14 * s, 0, 0], [9 * s, 9 * s, 25 * s], rot), "fat", ["kidney", "medulla"])
    kid_depth[sx] = (kc[2] - 56 * s, kc[2] + 56 * s)
    add(Capsule([sx * 35 * s, 40 * s, Z(590)], [sx * 60 * s, 5 * s, Z(880)], 12 * s, 24 * s), "muscle", ["fat"])  # psoas
  add(Capsule([-40 * s, 0, Z(590)], [45 * s, -10 * s, Z(600)], 11 * s), "soft", ["fat"])  # pancreas
  # colon frame with gas and content, then small bowel loops
  colon = [[-85 * s, 0, Z(790)], [-90 * s, -10 * s, Z(640)], [-60 * s, -60 * s, Z(615)], [40 * s, -60 * s, Z(620)],
           [90 * s, 10 * s, Z(600)], [90 * s, 10 * s, Z(760)], [40 * s, -10 * s, Z(800)], [0, 45 * s, Z(840)],
           [0, 60 * s, Z(900)]]
  colon = [np.asarray(p) + rng.normal(0, 6, 3) for p in colon]
  for p0, p1 in zip(colon[:-1], colon[1:]):
    add(Capsule(p0, p1, 21 * s), "bowel", ["fat", "muscle"])
    add(Capsule(p0 + [0, -6, 0], p1 + [0, -6, 0], 14 * s), "gas" if rng.random() < 0.6 else "soft", ["bowel"])
  for _ in range(5):
    p = np.array([rng.uniform(-50, 50) * s, rng.uniform(-50, 10) * s, Z(rng.uniform(640, 760))])
    for _ in range(6):
      q = p + rng.normal(0, 25, 3) * s
      q[2] = np.clip(q[2], Z(780), Z(630))
      add(Capsule(p, q, 11 * s), "bowel", ["fat"])
      p = q
  # --- pelvis ---------------------------------------------------------------
  for sx in (-1, 1):
    il = Ellipsoid([sx * 95 * s, 30 * s, Z(780)], [50 * s, 12 * s, 60 * s], _rot(rng, 5) @ _roty(sx * 0.45), deform=_deform(rng, 0.04))
    add(il, "bone")
    add(Ellipsoid(il.c, il.radii - 4, il.rot), "marrow", ["bone"])
    fh = np.array([sx * 88 * s, 0, Z(850)])
    add(Ellipsoid(fh, [24 * s] * 3), "bone")
    add(Ellipsoid(fh, [19 * s] * 3), "marrow", ["bone"])
    add(Capsule(fh, [sx * 90 * s, 5 * s, Z(1150)], 14 * s), "bone")
    add(Capsule(fh + [0, 0, -30 * s], [sx * 90 * s, 5 * s, Z(1150)], 9 * s), "marrow", ["bone"])
    add(Capsule([sx * 60 * s, 30 * s, Z(880)], [sx * 15 * s, -55 * s, Z(885)], 9 * s), "bone")
    add(Capsule([sx * 60 * s, 30 * s, Z(880)], [sx * 55 * s, 30 * s, Z(905)], 11 * s), "bone")
  add(Ellipsoid([0, 55 * s, Z(795)], [40 * s, 18 * s, 55 * s], _rotx(-0.5)), "bone")
  add(Ellipsoid([0, 55 * s, Z(795)], [34 * s, 13 * s, 49 * s], _rotx(-0.5)), "marrow", ["bone"])
  bl = rng.uniform(0.6, 1.2)
  add(Ellipsoid([0, -20 * s, Z(860)], np.array([42, 35, 32]) * s * bl, deform=_deform(rng, 0.05)), "urine", ["fat", "bowel", "gas", "soft"])
  add(Ellipsoid([0, 10 * s, Z(895 if sex == "M" else 830)], [20 * s, 16 * s, 20 * s]), "soft", ["fat"])
  # --- spine ----------------------------------------------------------------
  for v in range(27):
    depth = 135 + v * 28.5
    zc = Z(depth)
    yv = (25 if depth < 290 else 60 if depth < 600 else 55) * s
    rv = (10 if depth < 290 else 15 if depth < 500 else 20) * s
    add(Ellipsoid([0, yv, zc], [rv * 1.3, rv, 10 * s], e=3.0), "bone")
    add(Ellipsoid([0, yv, zc], [rv * 1.3 - 2, rv - 2, 10 * s - 2], e=3.0), "marrow", ["bone"])
    add(Ellipsoid([0, yv, zc - 14 * s], [rv * 1.2, rv * 0.9, 3.5 * s]), "disc")
    add(Capsule([0, yv + rv + 8 * s, zc + 6], [0, yv + rv + 40 * s, zc - 12 * s], 5 * s), "bone")
  cord_top, cord_bot = Z(130), Z(700)
  add(Capsule([0, 42 * s, cord_top], [0, 90 * s, cord_bot], 8 * s), "csf", ["muscle", "fat", "bone", "marrow", "disc", "soft"])
  add(Capsule([0, 42 * s, cord_top], [0, 90 * s, Z(650)], 4.5 * s), "cord", ["csf"])

  breast_z = (Z(480), Z(370))
  bands = {
      "brain": (head.brain_z[0], head.z_vertex),
      "head": (head.z_chin, head.brain_z[0]),
      "neck": (Z(285), head.z_chin),
      "lung": (Z(490), Z(285)),
      "breast": breast_z,
      "liver": (float(liver_c[2] - 75 * s), float(liver_c[2] + 75 * s)),
      "kidney": (min(v[0] for v in kid_depth.values()), max(v[1] for v in kid_depth.values())),
      "intestine": (Z(790), Z(605)),
      "pelvis": (Z(905), Z(725)),
  }
  return Patient(pid=pid, sex=sex, height=height, age=int(rng.integers(18, 88)),
                 weight=float(height / 1000) ** 2 * rng.uniform(19, 33), z_vertex=zv, paint=ops,
                 bands={k: (float(v[0]), float(v[1])) for k, v in bands.items()},
                 half_width=float(172 * s * wide * hip_f + fat), half_depth=float(112 * s * wide + fat), lesions=n_les,
                 head=head)


def _rotx(a: float) -> np.ndarray:
  return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def _roty(a: float) -> np.ndarray:
  return np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])


def render_labels(patient: Patient, grid: Grid) -> np.ndarray:
  """Tissue-label map int8 (K, I, J) of ``patient`` sampled at ``grid``'s voxels."""
  lab = np.zeros(grid.shape, np.int8)
  for shape, tissue, only in patient.paint:
    box = grid.box(shape.lo, shape.hi)
    if box is None:
      continue
    sl = tuple(slice(a, b) for a, b in box)
    m = shape.inside(grid.points(box))
    if only is not None:
      m &= np.isin(lab[sl], only)
    if m.any():
      lab[sl][m] = tissue
  head = patient.head
  box = None if head is None else grid.box(head.lo, head.hi)
  if box is not None:   # the template head wins wherever it has tissue
    sl = tuple(slice(a, b) for a, b in box)
    h = head.sample(grid.points(box))
    np.copyto(lab[sl], h, where=h > 0)
  return lab
