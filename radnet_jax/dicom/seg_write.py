"""DICOM SEG writing: a label map -> a highdicom ``Segmentation`` on the CT.

``write_seg(labels, affine, ct_files, out_path)`` samples a label map given
on any grid (normally the ``load_volume`` grid) at the pixel centres of every
CT image (``labels_on_images``) and writes a highdicom ``Segmentation``
(BINARY, one segment per label with SNOMED CT coded concepts,
``segment_descriptions``, algorithm "RadNet-JAX"), which viewers (OHIF,
3D Slicer) overlay on the CT. The SEG carries the CT's patient/study modules,
as the standard requires for it to be displayed with that study (anonymised
headers are repaired in memory where the standard allows, ``_repair_source``);
it is an output for the user's archive, not a training record. Reading SEGs
(and the frame geometry shared with this writer) is in ``seg``.

Coordinates are DICOM LPS mm; volumes ``(D, H, W)`` voxels.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset

from radnet_jax.dicom import geometry as dicom_geometry
from radnet_jax.dicom.metadata import is_uid, sop_class_uid
from radnet_jax.dicom.reader import read_dataset
from radnet_jax.dicom.seg import _axis_step, _frame_geometry
from radnet_jax.labels.lits import LIVER, TUMOUR  # the one LiTS vocabulary


def _image_planes(datasets: Sequence[Dataset]) -> list[tuple[np.ndarray, np.ndarray,
                                                            np.ndarray, np.ndarray,
                                                            int, int]]:
  """(position, r, c, spacing, rows, cols) of every frame of ``datasets``:
  one per classic image, one per frame of a multi-frame image."""
  out = []
  for ds in datasets:
    where = str(getattr(ds, "filename", None) or "CT image")
    rows, cols = int(ds.Rows), int(ds.Columns)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
      for f in range(n):
        p, r, c, s = _frame_geometry(ds, f, where)
        out.append((p, r, c, s, rows, cols))
    else:
      try:
        p = np.array([float(v) for v in ds.ImagePositionPatient])
        o = np.array([float(v) for v in ds.ImageOrientationPatient])
        s = np.array([float(v) for v in ds.PixelSpacing])
      except (AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: CT image without valid geometry") from e
      out.append((p, o[:3], o[3:], s, rows, cols))
  return out


def labels_on_images(labels: np.ndarray, affine: np.ndarray,
                     datasets: Sequence[Dataset]) -> np.ndarray:
  """Nearest-neighbour samples of ``labels`` at each CT pixel centre.

  Args:
    labels: ``(D, H, W)`` label map on the grid of ``affine`` (index -> LPS mm).
    datasets: CT images (headers suffice), in the order the SEG frames will
      take; a single multi-frame image contributes all its frames.

  Returns:
    uint8 ``(n_frames, Rows, Columns)``; pixels outside the grid are 0.
  """
  labels = np.asarray(labels)
  inv = np.linalg.inv(np.asarray(affine, np.float64))
  planes = _image_planes(datasets)
  rows, cols = planes[0][4], planes[0][5]
  out = np.zeros((len(planes), rows, cols), np.uint8)
  ii, jj = np.mgrid[:rows, :cols]
  for f, (p, r, c, (dr, dc), nr, nc) in enumerate(planes):
    if (nr, nc) != (rows, cols):
      raise ValueError(f"CT images differ in size ({nr}x{nc} vs {rows}x{cols})")
    base = inv[:3, :3] @ p + inv[:3, 3]
    du, dv = inv[:3, :3] @ (c * dr), inv[:3, :3] @ (r * dc)
    down, right = _axis_step(du), _axis_step(dv)
    if down is not None and right is not None and down[0] != right[0]:
      # The image lies on a grid slice (the usual case): gather rows and
      # columns by index instead of per-pixel coordinates.
      ax_s = 3 - down[0] - right[0]
      ks = int(np.rint(base[ax_s]))
      if not 0 <= ks < labels.shape[ax_s]:
        continue
      ri = int(np.rint(base[down[0]])) + down[1] * np.arange(rows)
      ci = int(np.rint(base[right[0]])) + right[1] * np.arange(cols)
      ok_r = (ri >= 0) & (ri < labels.shape[down[0]])
      ok_c = (ci >= 0) & (ci < labels.shape[right[0]])
      plane = np.moveaxis(labels, ax_s, 0)[ks]      # remaining axes, ascending
      if down[0] > right[0]:
        plane = plane.T
      out[f][np.ix_(ok_r, ok_c)] = plane[np.ix_(ri[ok_r], ci[ok_c])]
      continue
    idx = np.rint(base[:, None, None] + du[:, None, None] * ii + dv[:, None, None] * jj
                  ).astype(np.int64)
    ok = np.all((idx >= 0) & (idx < np.array(labels.shape)[:, None, None]), axis=0)
    out[f][ok] = labels[idx[0][ok], idx[1][ok], idx[2][ok]]
  return out


def segment_descriptions(label_values: Sequence[int], version: str = ""):
  """highdicom SegmentDescriptions for LiTS labels (1 liver, 2 tumour), coded
  with SNOMED CT (CID 7150 / 7151) and algorithm identification RadNet-JAX."""
  import highdicom as hd  # pylint: disable=import-outside-toplevel
  from pydicom.sr.codedict import codes  # pylint: disable=import-outside-toplevel
  algo = hd.AlgorithmIdentificationSequence(
      name="RadNet-JAX", version=version or _version(),
      family=codes.DCM.ArtificialIntelligence)
  anatomical = hd.sr.CodedConcept("123037004", "SCT", "Anatomical Structure")
  spec = {
      LIVER: ("Liver", anatomical, codes.SCT.Liver, (60.0, 30.0, 30.0)),
      TUMOUR: ("Tumour", codes.SCT.MorphologicallyAbnormalStructure,
               codes.SCT.Neoplasm, (80.0, 0.0, 80.0)),
  }
  out = []
  for number, value in enumerate(label_values, start=1):
    if value not in spec:
      raise ValueError(f"no segment description for label {value} (1 liver, 2 tumour)")
    name, cat, ptype, lab = spec[value]
    out.append(hd.seg.SegmentDescription(
        segment_number=number, segment_label=name, segmented_property_category=cat,
        segmented_property_type=ptype, algorithm_type="AUTOMATIC",
        algorithm_identification=algo,
        anatomic_regions=[codes.SCT.Liver] if value == TUMOUR else None,
        display_color=hd.color.CIELabColor(*lab)))
  return out


def _version() -> str:
  try:
    from radnet_jax import __version__  # pylint: disable=import-outside-toplevel
    return str(__version__)
  except ImportError:
    return "0"


# Type 2 attributes (present, may be empty) that highdicom copies from the
# source images into the SEG; anonymisers often delete them.
_TYPE2_SOURCE = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                 "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                 "ReferringPhysicianName")


def _repair_source(ds: Dataset, path: str) -> None:
  """Makes an anonymised CT header usable as a SEG source, in memory.

  SOPClassUID blank or missing -> the file meta's MediaStorageSOPClassUID
  (as readers do); deleted Type 2 patient / study attributes -> present and
  empty (what the standard allows for an unknown value). A SEG must
  reference its images (and their frame of reference) by UID, so a Study /
  Series / SOP Instance / Frame of Reference UID that is missing or that an
  anonymiser replaced by another string is a ValueError naming the file and
  the tag: the SEG cannot be written (the caller keeps the mask).
  """
  sop = sop_class_uid(ds)
  if not sop:
    raise ValueError(f"{path}: no SOP Class UID (SOPClassUID and the file "
                     "meta's MediaStorageSOPClassUID are both blank)")
  ds.SOPClassUID = sop
  for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
              "FrameOfReferenceUID"):
    if not is_uid(ds.get(key)):
      raise ValueError(f"{path}: {key} is missing or not a DICOM UID "
                       "(anonymised?), so a SEG cannot reference this image")
  for key in _TYPE2_SOURCE:
    if key not in ds:
      setattr(ds, key, "")


def _fill_slice_thickness(datasets: Sequence[Dataset], affine: np.ndarray) -> None:
  """SliceThickness (which highdicom copies into the SEG's pixel measures)
  for sources whose anonymiser dropped it: the slice spacing of the grid
  (the distance between positions, never guessed from another tag)."""
  if all(str(d.get("SliceThickness", "") or "").strip() for d in datasets):
    return
  spacing = float(np.linalg.norm(np.asarray(affine, float)[:3, 0]))
  for d in datasets:
    if not str(d.get("SliceThickness", "") or "").strip():
      d.SliceThickness = f"{spacing:.6g}"


def write_seg(labels: np.ndarray, affine: np.ndarray, ct_files: Sequence[str],
              out_path: str, *, label_values: Sequence[int] = (LIVER, TUMOUR),
              series_number: int = 901, series_description: str = "RadNet-JAX liver",
              ) -> str:
  """Writes a DICOM SEG of ``labels`` for the CT series ``ct_files``.

  Args:
    labels: uint8 ``(D, H, W)`` (0 background, 1 liver, 2 tumour) on the grid
      of ``affine`` (voxel index -> LPS mm), e.g. the ``load_volume`` grid of
      the series (``nifti.to_original_grid`` of a prediction).
    ct_files: the CT images of that series (any order).
    out_path: the ``.dcm`` file to write (folders are created).
    label_values: the labels that get a segment, in segment order (segment 1
      = ``label_values[0]``); a label present in ``labels`` but missing here
      raises ValueError.

  Returns ``out_path``. The SEG is BINARY, one frame per (CT image,
  segment) that holds labelled pixels, frames tied to the CT images.
  """
  import highdicom as hd  # pylint: disable=import-outside-toplevel
  labels = np.asarray(labels)
  present = set(np.unique(labels).tolist()) - {0}
  missing = present - set(label_values)
  if missing:
    raise ValueError(f"{out_path}: labels {sorted(missing)} have no segment "
                     f"(label_values={list(label_values)})")
  datasets = [read_dataset(f, stop_before_pixels=True) for f in ct_files]
  if not datasets:
    raise ValueError(f"{out_path}: no CT images given")
  for ds, f in zip(datasets, ct_files):
    ds.filename = f
    _repair_source(ds, f)
  # Frames follow the CT slice order along the normal (viewers do not care;
  # it keeps the file deterministic for the same input in any file order).
  if len(datasets) > 1 and all("ImagePositionPatient" in d for d in datasets):
    n = dicom_geometry.slice_normal(
        np.array([float(v) for v in datasets[0].ImageOrientationPatient]))
    datasets.sort(key=lambda d: float(np.array([float(v) for v in d.ImagePositionPatient])
                                      @ n))
  _fill_slice_thickness(datasets, affine)
  per_image = labels_on_images(labels, affine, datasets)
  # Label-map style input (segment numbers, not one channel per segment):
  # highdicom checks and casts it several times faster than stacked masks.
  lut = np.zeros(256, np.uint8)
  for number, value in enumerate(label_values, start=1):
    lut[value] = number
  seg = hd.seg.Segmentation(
      source_images=datasets, pixel_array=lut[per_image], segmentation_type="BINARY",
      segment_descriptions=segment_descriptions(label_values),
      series_instance_uid=hd.UID(), series_number=int(series_number),
      sop_instance_uid=hd.UID(), instance_number=1, manufacturer="RadNet-JAX",
      manufacturer_model_name="RadNet-JAX liver segmentation",
      software_versions=_version(), device_serial_number="0",
      series_description=series_description, content_label="RADNET_LIVER",
      content_description="Automatic liver / tumour segmentation")
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  seg.save_as(out_path)
  return out_path
