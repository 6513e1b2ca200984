"""Analytic shapes of the phantom anatomy, in physical mm (DICOM LPS).

Each shape has an axis-aligned bounding box (``lo``, ``hi``) and ``inside(p)``
for world points ``p`` (..., 3) float32; ``anatomy.render_labels`` evaluates a
shape only at the grid voxels inside its box.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


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
    d = [p[..., a] - self.c[a] for a in range(3)]
    q = [(d[0] * self.rot[0, k] + d[1] * self.rot[1, k] + d[2] * self.rot[2, k]) * (1 / self.radii[k])
         for k in range(3)]
    f = _pow(q[0], self.e) + _pow(q[1], self.e) + _pow(q[2], self.e)
    lim = 1.0
    for k, ph, amp in self.deform:
      k = np.asarray(k, np.float32)
      lim = lim + amp * np.sin(q[0] * k[0] + q[1] * k[1] + q[2] * k[2] + np.float32(ph))
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
    inv = np.float32(1.0 / max(float(ab @ ab), 1e-6))
    x, y, z = (p[..., a] - self.a[a] for a in range(3))
    t = np.clip((x * ab[0] + y * ab[1] + z * ab[2]) * inv, 0.0, 1.0)
    x -= t * ab[0]
    y -= t * ab[1]
    z -= t * ab[2]
    rad = np.float32(self.ra) + np.float32(self.rb - self.ra) * t
    return x * x + y * y + z * z <= rad * rad


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


LN2 = float(np.log(2.0))


BLOB_LATTICE_MM = 2.0


class Blob:
  """Smooth union of Gaussian balls: sum_i w_i 2^(-|R_i^T (p - c_i) / r_i|^2) >= 1/2.

  A single ball's surface is its ellipsoid (q = 1); overlapping balls merge
  with smooth saddles, which gives organ shapes with lobes and notches.
  ``level`` < 0.5 dilates the shape (used for a shell around it), deformation
  terms (k, phase, amplitude) modulate the threshold as for ``Ellipsoid``.
  """

  def __init__(self, centers, radii, rots=None, weights=None, level: float = 0.5, deform=()):
    self.c = np.asarray(centers, np.float32)
    self.r = np.asarray(radii, np.float32)
    n = len(self.c)
    self.rots = (np.repeat(np.eye(3, dtype=np.float32)[None], n, 0) if rots is None
                 else np.asarray(rots, np.float32))
    self.w = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
    self.level = float(level)
    self.deform = tuple(deform)
    ext = np.sqrt(((self.rots * self.r[:, None, :]) ** 2).sum(-1)) * 1.45 * np.sqrt(0.5 / self.level)
    self.lo, self.hi = (self.c - ext).min(0), (self.c + ext).max(0)
    self.centre = ((self.lo + self.hi) / 2).astype(np.float32)
    self.scale = np.float32(1.0 / max(float((self.hi - self.lo).max()), 1.0))
    self._lat = [None]

  def field(self, p: np.ndarray) -> np.ndarray:
    """The ball sum at points p (..., 3)."""
    f = np.zeros(p.shape[:-1], np.float32)
    for c, r, R, w in zip(self.c, self.r, self.rots, self.w):
      d = [p[..., a] - c[a] for a in range(3)]
      q2 = sum(((d[0] * R[0, k] + d[1] * R[1, k] + d[2] * R[2, k]) * (1 / r[k])) ** 2 for k in range(3))
      f += w * np.exp(np.float32(-LN2) * q2)
    return f

  def modulation(self, p: np.ndarray) -> np.ndarray:
    """1 - sum amp sin(k . u + phase): the threshold is level * modulation."""
    m = np.ones(p.shape[:-1], np.float32)
    u = (p - self.centre) * (self.scale * 2.0)
    for k, ph, amp in self.deform:
      m -= np.float32(amp) * np.sin(u @ np.asarray(k, np.float32) + np.float32(ph))
    return m

  def ratio(self, p: np.ndarray) -> np.ndarray:
    """field / modulation, evaluated exactly (inside: ratio >= level)."""
    return self.field(p) / np.maximum(self.modulation(p), np.float32(1e-3))

  def lattice_points(self) -> np.ndarray:
    """World points (nx, ny, nz, 3) of the 2 mm sampling lattice over the box."""
    g = [np.arange(self.lo[a], self.hi[a] + BLOB_LATTICE_MM, BLOB_LATTICE_MM, dtype=np.float32) for a in range(3)]
    return np.stack(np.meshgrid(*g, indexing="ij"), -1)

  def lattice(self) -> np.ndarray:
    """field / modulation on ``lattice_points`` (computed once, shared with dilated copies)."""
    # The field is smooth (ball radii >= ~15 mm): sampled once on a 2 mm
    # lattice and interpolated, a render costs one trilinear look-up per voxel
    # whatever the number of balls.
    if self._lat[0] is None:
      self._lat[0] = self.ratio(self.lattice_points())
    return self._lat[0]

  def inside(self, p: np.ndarray) -> np.ndarray:
    lat = self.lattice()
    idx = [(p[..., a] - np.float32(self.lo[a])) * np.float32(1.0 / BLOB_LATTICE_MM) for a in range(3)]
    v = ndimage.map_coordinates(lat, idx, order=1, mode="constant", cval=0.0, prefilter=False)
    return v >= np.float32(self.level)

  def dilated(self, level: float) -> "Blob":
    """The same blob at another level (< 0.5: larger), sharing box and lattice (level >= ~0.3)."""
    b = Blob(self.c, self.r, self.rots, self.w, self.level, self.deform)
    b.level, b._lat = float(level), self._lat
    return b


class Clip:
  """A shape cut by the half-space n . p <= d (e.g. gas above an air-fluid level)."""

  def __init__(self, shape, normal, offset: float):
    self.shape, self.n, self.d = shape, np.asarray(normal, np.float32), np.float32(offset)
    self.lo, self.hi = shape.lo, shape.hi

  def inside(self, p: np.ndarray) -> np.ndarray:
    return self.shape.inside(p) & ((p @ self.n) <= self.d)


class Trunk:
  """Cross-sections |x - cx|/a)^e + (|y - cy|/b)^e <= 1 along Z, b = anterior or posterior depth.

  Knots (z, cx, cy, a, b_ant, b_post) are interpolated on a 1 mm table; the
  back is flatter than the belly (``e_post`` > ``e``).
  """

  def __init__(self, z, cx, cy, a, ba, bp, e: float = 2.5, e_post: float = 3.0):
    order = np.argsort(z)
    self.z = np.asarray(z, np.float32)[order]
    self.k = [np.asarray(v, np.float32)[order] for v in (cx, cy, a, ba, bp)]
    self.e, self.e_post = e, e_post
    cx, cy, a, ba, bp = self.k
    self.lo = np.array([(cx - a).min(), (cy - ba).min(), self.z[0]], np.float32)
    self.hi = np.array([(cx + a).max(), (cy + bp).max(), self.z[-1]], np.float32)
    zz = np.arange(self.z[0], self.z[-1] + 1.0, 1.0, dtype=np.float32)
    cx_, cy_, a_, ba_, bp_ = (np.interp(zz, self.z, v) for v in self.k)
    self._tab = np.stack([cx_, cy_, 1 / a_, 1 / ba_, 1 / bp_]).astype(np.float32)

  def at(self, z: float):
    """(cx, cy, a, b_ant, b_post) at height z (interpolated)."""
    return tuple(float(np.interp(z, self.z, v)) for v in self.k)

  def inside(self, p: np.ndarray) -> np.ndarray:
    tab = self._tab
    z = p[..., 2]
    idx = np.clip((z - self.z[0] + 0.5).astype(np.int32), 0, tab.shape[1] - 1)
    at = lambda row: np.take(tab[row], idx)   # (np.take: the same values, faster than fancy indexing)
    u = np.abs((p[..., 0] - at(0)) * at(2))
    dy = p[..., 1] - at(1)
    post = dy > 0
    v = np.abs(dy * np.where(post, at(4), at(3)))
    f = np.where(post, _pow(u, self.e_post) + _pow(v, self.e_post), _pow(u, self.e) + _pow(v, self.e))
    return (f <= 1.0) & (z >= self.z[0]) & (z <= self.z[-1])

  def inset(self, ta, tba, tbp) -> "Trunk":
    """Inset by per-knot thicknesses (lateral, anterior, posterior) in mm."""
    cx, cy, a, ba, bp = self.k
    return Trunk(self.z, cx, cy, np.maximum(a - ta, 2.0), np.maximum(ba - tba, 2.0),
                 np.maximum(bp - tbp, 2.0), self.e, self.e_post)


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


def _rotx(a: float) -> np.ndarray:
  return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def _roty(a: float) -> np.ndarray:
  return np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])



def _rotz(a: float) -> np.ndarray:
  return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
