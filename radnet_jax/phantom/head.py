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
    skin = self._forward(tpl["skin_points"], np.zeros(3))
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
    brain = self._forward(tpl["brain_points"], t)
    self.brain_z = (float(brain[:, 2].min()), float(brain[:, 2].max()))
    lm = tpl["landmarks"]
    self.z_chin = float(self._forward(np.array([[0.0, 88.0, lm["chin"]]]), t)[0, 2])
    self.z_vertex = float(skin[:, 2].max())
    self.z_bottom = float(corners[:, 2].min())

  def _forward(self, u: np.ndarray, t: np.ndarray) -> np.ndarray:
    return (u @ _RAS_TO_LPS.T) @ self.A.T + t

  def _warp(self, field: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Displacement (N, 3) of the control-point ``field`` at template points u (N, 3)."""
    n = np.array(field.shape[1:], np.float32)
    idx = ((u - self.origin) / self.extent).astype(np.float32) * (n - 1)
    return np.stack([ndimage.map_coordinates(field[a], idx.T, order=1, mode="nearest", prefilter=False)
                     for a in range(3)], -1)

  def sample(self, p: np.ndarray) -> np.ndarray:
    """Tissue ids (anatomy.T, int8) at patient LPS points p (..., 3); 0 = air."""
    shp = p.shape[:-1]
    q = p.reshape(-1, 3).astype(np.float32)
    m = (self.A_inv @ _RAS_TO_LPS).T.astype(np.float32)   # LPS world -> template RAS
    u = (q - self.t.astype(np.float32)) @ m
    u = u + self._warp(self.coarse, u) + self._warp(self.fine, u)
    idx = (u - self.origin.astype(np.float32)) / np.float32(self.spacing)
    lab = ndimage.map_coordinates(template()["labels"], idx.T, order=0, mode="constant", cval=0,
                                  prefilter=False)
    return self.lut[lab].reshape(shp)
