"""Builds small synthetic DICOM series with known geometry for the tests.

Everything is generated with pydicom at test time (no binaries in the repo).
Geometry follows DICOM: ``iop`` = (r, c) where r is the direction of growing
column index and c of growing row index; slice ``k`` sits at
``origin + k * step`` (``step`` is a 3-vector, so a tilt or an irregular
spacing is just another ``positions`` list).
"""
from __future__ import annotations

import os
import random
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian,
                         MRImageStorage, generate_uid)

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "MRN-12345678"


def make_slice(pixels: np.ndarray, position: Sequence[float],
               iop: Sequence[float], pixel_spacing: Sequence[float], *,
               series_uid: str, study_uid: str, modality: str = "CT",
               slope: float = 1.0, intercept: float = 0.0,
               instance: int = 1, **tags) -> Dataset:
  """One classic single-frame image with the given stored pixels (H, W)."""
  pixels = np.asarray(pixels)
  meta = FileMetaDataset()
  sop_class = CTImageStorage if modality == "CT" else MRImageStorage
  meta.MediaStorageSOPClassUID = sop_class
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = sop_class
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = modality
  ds.PatientName = PATIENT_NAME
  ds.PatientID = PATIENT_ID
  ds.PatientBirthDate = "19600101"
  ds.AccessionNumber = "ACC998877"
  ds.StudyDate = "20200102"
  ds.InstitutionName = "General Hospital"
  ds.StudyInstanceUID = study_uid
  ds.SeriesInstanceUID = series_uid
  ds.SeriesNumber = 3
  ds.InstanceNumber = instance
  ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
  ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
  ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
  ds.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing]
  ds.SliceThickness = "5.0"  # deliberately wrong: spacing comes from positions
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.BitsAllocated = 16
  ds.BitsStored = 16
  ds.HighBit = 15
  signed = pixels.dtype.kind == "i"
  ds.PixelRepresentation = 1 if signed else 0
  ds.RescaleSlope = f"{slope:g}"
  ds.RescaleIntercept = f"{intercept:g}"
  ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
  for key, value in tags.items():
    setattr(ds, key, value)
  return ds


def write_series(folder: str, stored: np.ndarray, positions: Sequence,
                 iop: Sequence[float], pixel_spacing: Sequence[float] = (0.7, 0.8),
                 *, modality: str = "CT", slopes: Sequence[float] | None = None,
                 intercept: float = 0.0, series_uid: str | None = None,
                 study_uid: str | None = None, shuffle: bool = True,
                 seed: int = 0, per_slice_tags: Sequence[dict] | None = None,
                 **tags) -> list[str]:
  """Writes ``stored[k]`` at ``positions[k]`` as one file per slice.

  File names are random hex (no .dcm) and the instance numbers are shuffled
  when ``shuffle`` is set, so nothing but the positions gives the order.
  Returns the paths in slice order.
  """
  os.makedirs(folder, exist_ok=True)
  rng = random.Random(seed)
  series_uid = series_uid or generate_uid()
  study_uid = study_uid or generate_uid()
  order = list(range(len(stored)))
  if shuffle:
    rng.shuffle(order)
  paths = []
  for k in range(len(stored)):
    extra = dict(tags)
    if per_slice_tags is not None:
      extra.update(per_slice_tags[k])
    ds = make_slice(stored[k], positions[k], iop, pixel_spacing,
                    series_uid=series_uid, study_uid=study_uid,
                    modality=modality,
                    slope=slopes[k] if slopes is not None else 1.0,
                    intercept=intercept, instance=order[k] + 1, **extra)
    name = "%016x" % rng.getrandbits(64) if shuffle else f"IM{k:04d}.dcm"
    path = os.path.join(folder, name)
    ds.save_as(path, enforce_file_format=True)
    paths.append(path)
  return paths


def linear_positions(origin: Sequence[float], step: Sequence[float], n: int
                     ) -> list[np.ndarray]:
  return [np.asarray(origin, float) + k * np.asarray(step, float)
          for k in range(n)]


def world_grid(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """LPS coordinates (..., 3) of every voxel of a (D, H, W) grid."""
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
  return idx @ affine[:3, :3].T + affine[:3, 3]


def oblique_iop(plane: str, angle_deg: float) -> np.ndarray:
  """IOP of a plane rotated by ``angle_deg`` about the LPS x axis."""
  a = np.radians(angle_deg)
  rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
  base = {"AX": ([1, 0, 0], [0, 1, 0]), "COR": ([1, 0, 0], [0, 0, -1]),
          "SAG": ([0, 1, 0], [0, 0, -1])}[plane]
  r, c = rot @ np.array(base[0], float), rot @ np.array(base[1], float)
  return np.concatenate([r, c])


def in_plane_coords(world: np.ndarray, positions: Sequence, iop: Sequence[float],
                    pixel_spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """(row, column) coordinates (pixels) of LPS points ``world`` (..., 3) in
  the images of the two input slices whose planes bracket them along the
  normal: arrays (..., 2), [..., 0] for the slice below, [..., 1] above (the
  same slice twice on a slice or beyond the ends).

  A converter's output voxel is interpolated (not extrapolated) exactly when
  0 <= row <= rows - 1 and 0 <= column <= columns - 1 in both.
  """
  iop = np.asarray(iop, float)
  r, c = iop[:3], iop[3:]
  n = np.cross(r, c)
  pos = np.asarray(positions, float)
  order = np.argsort(pos @ n)
  pos, s = pos[order], (pos @ n)[order]
  t = world @ n
  hi = np.clip(np.searchsorted(s, t - 1e-6), 0, len(s) - 1)
  lo = np.clip(np.searchsorted(s, t + 1e-6, side="right") - 1, 0, len(s) - 1)
  rel = np.stack([world - pos[lo], world - pos[hi]], axis=-2)   # (..., 2, 3)
  return rel @ c / pixel_spacing[0], rel @ r / pixel_spacing[1]
