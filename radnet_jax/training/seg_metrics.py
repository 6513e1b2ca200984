"""Segmentation metrics: Dice (per volume and global), ASSD in mm, and
largest-connected-component post-processing.

All functions take integer label maps ``(D, H, W)`` (0 background, 1 liver,
2 tumour in the LiTS convention) as numpy arrays. Dice is computed from
accumulated counts (intersection, predicted and reference voxel sums), so a
global Dice over a whole test set is exact (the sum over volumes of the
counts), not a mean of per-volume means.

Liver in LiTS means "liver including tumour": ``class_masks`` maps the class
names used in reports to the sets of labels that form them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from radnet_jax.labels import lits

# Class name -> labels that make up the class (LiTS: the liver includes tumour).
LITS_CLASSES: Mapping[str, tuple[int, ...]] = lits.CLASSES


def binary(labels: np.ndarray, members: Sequence[int]) -> np.ndarray:
  """Boolean mask of the voxels whose label is in ``members``."""
  return np.isin(np.asarray(labels), np.asarray(members))


def dice_counts(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int]:
  """(intersection, pred voxels, ref voxels) of two boolean masks (same shape)."""
  pred = np.asarray(pred, bool)
  ref = np.asarray(ref, bool)
  if pred.shape != ref.shape:
    raise ValueError(f"shape mismatch: prediction {pred.shape} vs reference "
                     f"{ref.shape}")
  return (int(np.count_nonzero(pred & ref)), int(np.count_nonzero(pred)),
          int(np.count_nonzero(ref)))


def dice_from_counts(inter: float, pred_sum: float, ref_sum: float) -> float:
  """2|A∩B| / (|A|+|B|); 1.0 when both are empty (nothing to find, none found)."""
  denom = pred_sum + ref_sum
  if denom == 0:
    return 1.0
  return 2.0 * inter / denom


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
  """Dice of two boolean masks ``(D, H, W)``."""
  return dice_from_counts(*dice_counts(pred, ref))


def _surface(mask: np.ndarray) -> np.ndarray:
  """Boundary voxels of a boolean mask (voxels with a background 6-neighbour).

  Voxels on the array border count as surface (the outside is background).
  """
  if not mask.any():
    return mask
  eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(
      mask.ndim, 1), border_value=0)
  return mask & ~eroded


def surface_distances(pred: np.ndarray, ref: np.ndarray,
                      spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """Distances in mm from each surface voxel of one mask to the other's surface.

  Returns (pred->ref distances, ref->pred distances), 1-D float64 arrays.
  ``spacing``: voxel size (mm) along (D, H, W).
  """
  pred = np.asarray(pred, bool)
  ref = np.asarray(ref, bool)
  if pred.shape != ref.shape:
    raise ValueError(f"shape mismatch: prediction {pred.shape} vs reference "
                     f"{ref.shape}")
  spacing = tuple(float(s) for s in spacing)
  sp, sr = _surface(pred), _surface(ref)
  # EDT of the complement of a surface = distance to the nearest surface voxel.
  dt_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)
  dt_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
  return dt_ref[sp], dt_pred[sr]


def assd(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
  """Average symmetric surface distance in mm (LiTS definition).

  Mean over the union of both surfaces' distances to the other surface.
  0 when both masks are empty, +inf when exactly one is empty.
  """
  pred = np.asarray(pred, bool)
  ref = np.asarray(ref, bool)
  if not pred.any() and not ref.any():
    return 0.0
  if not pred.any() or not ref.any():
    return math.inf
  a, b = surface_distances(pred, ref, spacing)
  return float((a.sum() + b.sum()) / (a.size + b.size))


def largest_connected_component(mask: np.ndarray,
                                connectivity: int = 1) -> np.ndarray:
  """Keeps the largest connected component of a boolean mask ``(D, H, W)``.

  connectivity: 1 = faces (6-neighbourhood in 3D), 2 = +edges, 3 = +corners.
  """
  mask = np.asarray(mask, bool)
  if not mask.any():
    return mask.copy()
  structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
  lab, n = ndimage.label(mask, structure=structure)
  if n == 1:
    return mask.copy()
  sizes = np.bincount(lab.ravel())
  sizes[0] = 0
  return lab == int(np.argmax(sizes))


def keep_largest_organ(labels: np.ndarray, organ: Sequence[int] = (1, 2),
                       connectivity: int = 1) -> np.ndarray:
  """LCC post-processing of a label map: voxels of ``organ`` labels outside the
  largest connected organ component become background; labels are kept inside.

  For LiTS, ``organ=(1, 2)``: tumour inside the liver is kept, islands of
  "liver" or "tumour" elsewhere are removed.
  """
  labels = np.asarray(labels)
  keep = largest_connected_component(binary(labels, organ), connectivity)
  out = labels.copy()
  out[binary(labels, organ) & ~keep] = 0
  return out


@dataclasses.dataclass
class SegEvaluator:
  """Accumulates per-volume and global Dice and ASSD over a test set.

  ``add(case, pred, ref, spacing)`` with integer label maps ``(D, H, W)``;
  ``summary()`` -> {"<class>/dice_per_case": mean over volumes,
  "<class>/dice_global": from summed counts, "<class>/assd_mm": mean over
  volumes with a finite ASSD, "cases": {case: {...}}}.
  A class absent from the reference and the prediction of a volume scores
  Dice 1 and is left out of the ASSD mean (tumour-free LiTS volumes).
  """
  classes: Mapping[str, tuple[int, ...]] = dataclasses.field(
      default_factory=lambda: dict(LITS_CLASSES))
  compute_assd: bool = True

  def __post_init__(self):
    self.counts = {c: np.zeros(3, np.int64) for c in self.classes}
    self.cases: dict[str, dict[str, float]] = {}

  def add(self, case: str, pred: np.ndarray, ref: np.ndarray,
          spacing: Sequence[float]) -> dict[str, float]:
    row = {}
    for name, members in self.classes.items():
      p, r = binary(pred, members), binary(ref, members)
      c = dice_counts(p, r)
      self.counts[name] += np.asarray(c, np.int64)
      row[f"{name}/dice"] = dice_from_counts(*c)
      if self.compute_assd and (p.any() or r.any()):
        row[f"{name}/assd_mm"] = assd(p, r, spacing)
    self.cases[case] = row
    return row

  def summary(self) -> dict:
    out: dict = {}
    for name in self.classes:
      per = [r[f"{name}/dice"] for r in self.cases.values()]
      out[f"{name}/dice_per_case"] = float(np.mean(per)) if per else math.nan
      out[f"{name}/dice_global"] = dice_from_counts(*self.counts[name].tolist())
      if self.compute_assd:
        ds = [r[f"{name}/assd_mm"] for r in self.cases.values()
              if f"{name}/assd_mm" in r and math.isfinite(r[f"{name}/assd_mm"])]
        out[f"{name}/assd_mm"] = float(np.mean(ds)) if ds else math.nan
    out["num_cases"] = len(self.cases)
    out["cases"] = {k: dict(v) for k, v in self.cases.items()}
    return out


def mean_ignoring_nan(values: Iterable[float]) -> float:
  vals = [v for v in values if not math.isnan(v)]
  return float(np.mean(vals)) if vals else math.nan
