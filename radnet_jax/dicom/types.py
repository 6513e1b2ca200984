"""Plain data types passed between scan, volume assembly and conversion."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Stack:
  """One 3D stack of a series (a series may split into several stacks).

  key: PHI-free, stable id of the stack (salted hash of SeriesInstanceUID plus
    the split key: orientation, echo, b-value, temporal position, ...).
  files: DICOM file paths holding the stack's frames.
  frames: for enhanced multi-frame objects, (file_index, frame_index) pairs in
    acquisition order; None for classic one-frame-per-file series.
  record: the PHI-free metadata record (DICOM keyword -> python value) that the
    label rules read; see ``radnet_jax.dicom.metadata``.
  """
  key: str
  files: tuple[str, ...]
  record: dict[str, Any]
  frames: tuple[tuple[int, int], ...] | None = None


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A file or series that was not turned into a stack, and why."""
  path: str
  reason: str
  series: str = ""   # salted series hash when known


@dataclasses.dataclass
class ScanResult:
  stacks: list[Stack]
  skipped: list[Skipped]


@dataclasses.dataclass
class Volume:
  """An assembled stack in canonical orientation.

  voxels: float32 ``(D, H, W)`` = (slice, row, column) in physical units
    (HU for CT after RescaleSlope/Intercept; scanner units for MR; Bq/ml or
    scanner units for PET).
  affine: float64 ``(4, 4)`` mapping (d, h, w, 1) voxel indices to LPS mm.
  spacing: float64 ``(3,)`` voxel size in mm along (D, H, W); the D spacing is
    measured from slice positions, not SliceThickness.
  record: the stack's metadata record, with geometry fields filled in.
  """
  voxels: np.ndarray
  affine: np.ndarray
  spacing: np.ndarray
  record: dict[str, Any]
