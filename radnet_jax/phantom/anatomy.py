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
import functools

import numpy as np

from radnet_jax.phantom import body
from radnet_jax.phantom.head import TemplateHead
from radnet_jax.phantom.shapes import Capsule, Ellipsoid, _deform, _rot, _rotx, _roty  # noqa: F401 (re-exported)

# Tissue ids (index into the physics tables).
TISSUES = ("air", "skin", "fat", "muscle", "bone", "marrow", "gm", "wm", "csf",
           "gas", "lung", "blood", "myocardium", "liver", "spleen", "kidney",
           "medulla", "bowel", "urine", "thyroid", "lesion", "breast",
           "vitreous", "cord", "bile", "soft", "disc",
           # body (phantom.body): vessels by circulation (CT phases), organs, bowel content
           "artery", "vein", "portal", "liver_portal", "liver_vein", "pancreas",
           "collecting", "lesion_hyper", "lumen", "stool", "cartilage",
           # head (phantom.head): dura, falx, choroid plexus, pituitary (outside the blood-brain barrier)
           "dura")
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
    b0, b1 = self.boxes(np.asarray(lo, np.float64)[None], np.asarray(hi, np.float64)[None])
    if (b1[0] <= b0[0]).any():
      return None
    return [(int(b0[0, a]), int(b1[0, a])) for a in range(3)]

  def boxes(self, lo: np.ndarray, hi: np.ndarray):
    """Index boxes of N world AABBs [lo, hi] (N, 3) -> (start, stop) int (N, 3), clipped.

    A box is empty where stop <= start on any axis.
    """
    # The 8 corners of each box; the indices of the extreme corners bound the box.
    sel = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], bool)   # (8, 3)
    idx = self.index_of(np.where(sel[None], hi[:, None, :], lo[:, None, :]))          # (N, 8, 3)
    start = np.maximum(np.floor(idx.min(1)), 0).astype(np.int64)
    stop = np.minimum(np.ceil(idx.max(1)).astype(np.int64) + 1, np.asarray(self.shape, np.int64))
    return start, stop


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
  ct: dict = dataclasses.field(default_factory=dict)   # CT offsets / enhancement factors (body._patient_ct)
  head: TemplateHead | None = None


def make_patient(rng: np.random.Generator, pid: int = 0, lesions: int | None = None) -> Patient:
  """Samples one patient (sex, size, organ layout, lesions) -> Patient.

  lesions: number of liver lesions (default: random 0-3).
  """
  sex = "F" if rng.random() < 0.5 else "M"
  height = float(rng.normal(1640 if sex == "F" else 1770, 60))
  s = height / 1750.0
  habitus = float(rng.beta(2.0, 2.5))       # 0 lean .. 1 obese: fat, width, bowel packing
  age = int(rng.integers(18, 88))
  zv = float(rng.uniform(-40, 60)) + 100.0  # table position of the vertex
  Z = lambda depth: zv - depth * s                                   # depth -> z mm
  ops: list = []
  add = lambda shape, tissue, only=None: ops.append((shape, T[tissue], None if only is None else tuple(T[o] for o in only)))

  # --- body envelope: head, trunk and thighs -----------------------------------
  # The head (brain, skull, face, neck down to C5) is the deformed template
  # of radnet_jax.phantom.head; the body (phantom.body) joins it at the neck.
  head = TemplateHead(rng, T, scale=s, z_vertex=zv)
  trunk, cavity, _, wide = body.add_envelope(rng, add, Z, s, sex, habitus)

  # --- neck and airway ------------------------------------------------------
  carina = np.array([0, 10 * s, Z(380)])
  add(Capsule([0, -14 * s, head.z_bottom + 10], carina, 9 * s), "gas")
  for sx in (-1, 1):
    add(Ellipsoid([sx * 18 * s, -20 * s, Z(258)], [9 * s, 10 * s, 22 * s], deform=_deform(rng, 0.05)), "thyroid")

  # --- thorax, abdomen, pelvis, spine (phantom.body) -------------------------
  bd = body.add_body(rng, add, Z, s, sex, age, trunk, cavity, wide, habitus, lesions, z_neck=head.z_bottom)

  bands = {
      "brain": (head.brain_z[0], head.z_vertex),
      "head": (head.z_chin, head.brain_z[0]),
      "neck": (Z(285), head.z_chin),
      **bd.bands,
  }
  return Patient(pid=pid, sex=sex, height=height, age=age,
                 weight=float(height / 1000) ** 2 * (19 + 16 * habitus), z_vertex=zv, paint=ops,
                 bands={k: (float(v[0]), float(v[1])) for k, v in bands.items()},
                 half_width=bd.half_width, half_depth=bd.half_depth, lesions=bd.lesions, ct=bd.ct,
                 head=head)


@functools.lru_cache(maxsize=None)
def _allowed(only: tuple) -> np.ndarray:
  """Look-up table tissue id -> bool: is it one of ``only``."""
  t = np.zeros(len(TISSUES), bool)
  t[list(only)] = True
  return t


def render_labels(patient: Patient, grid: Grid) -> np.ndarray:
  """Tissue-label map int8 (K, I, J) of ``patient`` sampled at ``grid``'s voxels."""
  lab = np.zeros(grid.shape, np.int8)
  lo = np.array([s.lo for s, _, _ in patient.paint], np.float64).reshape(-1, 3)
  hi = np.array([s.hi for s, _, _ in patient.paint], np.float64).reshape(-1, 3)
  start, stop = grid.boxes(lo, hi)
  for n in np.flatnonzero((stop > start).all(1)):
    shape, tissue, only = patient.paint[n]
    box = tuple(zip(start[n].tolist(), stop[n].tolist()))
    sl = tuple(slice(a, b) for a, b in box)
    m = shape.inside(grid.points(box))
    if only is not None:
      m &= _allowed(only)[lab[sl]]
    if m.any():
      lab[sl][m] = tissue
  head = patient.head
  box = None if head is None else grid.box(head.lo, head.hi)
  if box is not None:   # the template head wins wherever it has tissue
    sl = tuple(slice(a, b) for a, b in box)
    h = head.render(grid, box)
    np.copyto(lab[sl], h, where=h > 0)
  return lab
