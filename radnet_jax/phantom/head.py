"""Phantom heads from a real anatomical template, deformed per patient.

The tissue map ``data/head_labels.npz`` (uint8 labels on a 1.5 mm RAS grid)
was derived once by ``data_prep/head_template.py`` from the MNI ICBM152 2009a
template (brain: grey / white matter and CSF of the real average brain;
skull, scalp, face, sinuses, orbits, neck and cervical spine modelled around
it; attribution and licence text inside the file, ``ATTRIBUTION``).

Each patient gets its own head (``TemplateHead``): a random affine (per-axis
size, pitch / roll / yaw of the head in the coil, position) and a smooth
random non-linear displacement (a coarse field for the overall shape and a
finer one for the brain's folding), all drawn from the patient's generator,
so no two patients share a brain and the same seed gives the same head.
A series samples the map at its own voxel centres (nearest label of the
deformed template), in the same LPS mm as ``anatomy.Grid``; partial volume
comes from the acquisition's point-spread and slice profile (``physics``).
"""
from __future__ import annotations

import functools
import os

import numpy as np
from scipy import ndimage

_PATH = os.path.join(os.path.dirname(__file__), "data", "head_labels.npz")
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@functools.lru_cache(maxsize=1)
def template() -> dict:
  """The stored map: labels (X, Y, Z) uint8, names, origin, spacing, landmarks."""
  if not os.path.exists(_PATH):
    raise FileNotFoundError(f"{_PATH}: head tissue map missing (python -m data_prep.head_template)")
  with np.load(_PATH) as z:
    out = {k: z[k] for k in z.files}
  out["landmarks"] = dict(zip((str(n) for n in out.pop("landmark_names")),
                              (float(v) for v in out.pop("landmark_z"))))
  return out


@functools.lru_cache(maxsize=1)
def _extreme_points() -> tuple[np.ndarray, np.ndarray]:
  """Template RAS points of the top of the scalp and of the lower brain
  (cerebrum and cerebellum, above the medulla), for the vertex and the brain
  band: all such voxel centres, every 2nd, computed once per process."""
  tpl = template()
  lab, names = tpl["labels"], [str(n) for n in tpl["names"]]
  z = tpl["origin"][2] + np.arange(lab.shape[2]) * float(tpl["spacing"])
  top = np.argwhere((lab == names.index("skin")) & (z > 70)[None, None, :])[::2]
  low = np.argwhere(np.isin(lab, [names.index("gm"), names.index("wm")]) & ((z > -62) & (z < -35))[None, None, :])[::2]
  to_mm = lambda ijk: (tpl["origin"] + ijk * float(tpl["spacing"])).astype(np.float32)
  return to_mm(top), to_mm(low)


def attribution() -> str:
  """Credit and licence notice of the template the head map derives from."""
  return str(template()["attribution"])


def _rot(axis: int, deg: float) -> np.ndarray:
  a = np.deg2rad(deg)
  c, s = np.cos(a), np.sin(a)
  i, j = [k for k in range(3) if k != axis]
  r = np.eye(3)
  r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
  return r


class TemplateHead:
  """One patient's head: template RAS -> patient LPS, plus a smooth warp.

  Forward: p = A (F u) + t with F the RAS->LPS flip and A = R S; sampling
  goes backwards: u = F A^-1 (p - t), then the template is read at
  u + w(u) (w: the random displacement, mm).

  tissue_ids: map label -> anatomy tissue id.
  """

  def __init__(self, rng: np.random.Generator, tissue_ids: dict, *, scale: float, z_vertex: float):
    tpl = template()
    self.lut = np.array([tissue_ids[str(n)] for n in tpl["names"]], np.int8)
    self.origin = tpl["origin"].astype(np.float64)
    self.spacing = float(tpl["spacing"])
    shape = np.array(tpl["labels"].shape)
    # The MNI brain is ~10 % larger than an average adult's.
    size = scale * 0.9 * rng.uniform(0.93, 1.07) * rng.uniform(0.96, 1.04, 3)
    rot = _rot(0, rng.normal(0, 7)) @ _rot(1, rng.normal(0, 2.5)) @ _rot(2, rng.normal(0, 3))
    self.A = rot @ np.diag(size)            # acts on LPS-flipped template coordinates
    self.A_inv = np.linalg.inv(self.A)
    # Smooth warps on control grids over the template box (mm, template RAS).
    self.extent = shape * self.spacing
    self.coarse = rng.normal(0, 3.0, (3, 5, 5, 5)).astype(np.float32)
    self.fine = rng.normal(0, 1.2, (3, 11, 11, 11)).astype(np.float32)
    # Translation: vertex at z_vertex, head centred left-right, lying on the
    # coil's posterior pad (random offsets of a few mm).
    skin_all, brain_low = _extreme_points()
    skin = self._forward_warped(np.concatenate([tpl["skin_points"], skin_all]), np.zeros(3))
    t = np.array([rng.normal(0, 3.0) - skin[:, 0].mean(), rng.normal(0, 4.0) - 0.5 * (skin[:, 1].max() + skin[:, 1].min()),
                  z_vertex - skin[:, 2].max()])
    self.t = t
    skin = skin + t
    self.lo, self.hi = skin.min(0) - 6.0, skin.max(0) + 6.0
    box_corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)]) * (shape - 1) * self.spacing + self.origin
    corners = self._forward(box_corners, t)
    self.lo = np.maximum(self.lo, corners.min(0))
    self.hi = np.minimum(self.hi, corners.max(0))
    self.lo[2] = corners[:, 2].min()        # the neck runs to the bottom of the map
    brain = self._forward_warped(np.concatenate([tpl["brain_points"], brain_low]), t)
    self.brain_z = (float(brain[:, 2].min()), float(brain[:, 2].max()))
    lm = tpl["landmarks"]
    self.z_chin = float(self._forward_warped(np.array([[0.0, 88.0, lm["chin"]]], np.float32), t)[0, 2])
    self.z_vertex = float(skin[:, 2].max())
    self.z_bottom = float(corners[:, 2].min())

  def _forward_warped(self, v: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Template points -> patient LPS including the warp (first order: a
    template point v is read from u with u + w(u) = v, u ~ v - w(v))."""
    v = np.asarray(v, np.float32)
    return self._forward(v - self._warp(self.coarse, v) - self._warp(self.fine, v), t)

  def to_patient(self, u) -> np.ndarray:
    """Template RAS points (..., 3) -> this patient's LPS mm (affine part only)."""
    return self._forward(np.asarray(u, float), self.t)

  def _forward(self, u: np.ndarray, t: np.ndarray) -> np.ndarray:
    return (u @ _RAS_TO_LPS.T) @ self.A.T + t

  def _warp(self, field: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Displacement (N, 3) of the control-point ``field`` at template points u (N, 3)."""
    n = np.array(field.shape[1:], np.float32)
    idx = ((u - self.origin) / self.extent).astype(np.float32) * (n - 1)
    return np.stack([ndimage.map_coordinates(field[a], idx.T, order=1, mode="nearest", prefilter=False)
                     for a in range(3)], -1)

  def _template_coords(self, p: np.ndarray) -> np.ndarray:
    """Patient LPS points (N, 3) -> deformed template RAS points (N, 3), float32."""
    m = (_RAS_TO_LPS @ self.A_inv).T.astype(np.float32)   # LPS world -> template RAS: F A^-1
    u = (p.astype(np.float32) - self.t.astype(np.float32)) @ m
    return u + self._warp(self.coarse, u) + self._warp(self.fine, u)

  def _lookup(self, u: np.ndarray) -> np.ndarray:
    """Nearest template label at template points u (..., 3) -> anatomy ids (0 = air outside the map)."""
    tissue = _tissue_map(self.lut.tobytes())      # (X + 2, Y + 2, Z + 2): anatomy ids, a border of air
    idx = np.rint((u - self.origin.astype(np.float32)) / np.float32(self.spacing)).astype(np.int32)
    # Outside the map -> the air border (index -1 or X, shifted by one).
    idx = np.clip(idx, -1, np.array(tissue.shape, np.int32) - 2) + 1
    s1, s2 = tissue.shape[1], tissue.shape[2]
    return tissue.ravel()[(idx[..., 0] * s1 + idx[..., 1]) * s2 + idx[..., 2]]

  def sample(self, p: np.ndarray) -> np.ndarray:
    """Tissue ids (anatomy.T, int8) at patient LPS points p (..., 3); 0 = air."""
    return self._lookup(self._template_coords(p.reshape(-1, 3))).reshape(p.shape[:-1])

  def render(self, grid, box, step_mm: float = 6.0) -> np.ndarray:
    """Tissue ids (int8) of the grid's voxels in index ``box``.

    The template coordinates of the voxel centres are computed exactly on a
    sub-grid of about ``step_mm`` and interpolated linearly in between
    (exact for the affine part; the warp varies over ~25 mm), then the
    nearest template label is read: ~10x fewer warp evaluations than
    ``sample`` on every voxel.
    """
    (k0, k1), (i0, i1), (j0, j1) = box
    counts = [k1 - k0, i1 - i0, j1 - j0]
    knots = [np.unique(np.round(np.linspace(a, b - 1, max(2, int(np.ceil((b - 1 - a) * sp / step_mm)) + 1))))
             if b - a > 1 else np.array([float(a)]) for (a, b), sp in zip(box, grid.spacing)]
    kk, ii, jj = np.meshgrid(*knots, indexing="ij")
    dz, di, dj = grid.spacing
    pts = (grid.origin + kk[..., None] * dz * grid.n + ii[..., None] * di * grid.c + jj[..., None] * dj * grid.r)
    u = self._template_coords(pts.reshape(-1, 3)).reshape(pts.shape)
    w = [_lerp_matrix(np.arange(a, b, dtype=np.float64), kn) for (a, b), kn in zip(box, knots)]
    out = np.empty(counts + [3], np.float32)
    for a in range(3):
      f = np.einsum("ka,abc->kbc", w[0], u[..., a])
      f = np.einsum("kbc,ib->kic", f, w[1])
      out[..., a] = f @ w[2].T
    return self._lookup(out)


@functools.lru_cache(maxsize=2)
def _tissue_map(lut: bytes) -> np.ndarray:
  """The template's labels as anatomy ids (``lut`` int8 bytes, label -> id), padded by one voxel of air."""
  ids = np.frombuffer(lut, np.int8)[template()["labels"]]
  return np.pad(ids, 1)


def _lerp_matrix(x: np.ndarray, knots: np.ndarray) -> np.ndarray:
  """(len(x), len(knots)) float32 linear-interpolation weights from knot values to x."""
  w = np.zeros((len(x), len(knots)), np.float32)
  if len(knots) == 1:
    w[:, 0] = 1.0
    return w
  seg = np.clip(np.searchsorted(knots, x, side="right") - 1, 0, len(knots) - 2)
  f = (x - knots[seg]) / (knots[seg + 1] - knots[seg])
  w[np.arange(len(x)), seg] = 1.0 - f
  w[np.arange(len(x)), seg + 1] = f
  return w
