"""LiTS-format NIfTI (or DICOM CT + SEG) -> segmentation ArrayRecord shards, and back.

A LiTS folder holds ``volume-N.nii[.gz]`` (CT in HU) and
``segmentation-N.nii[.gz]`` (0 background, 1 liver, 2 tumour), possibly in
sub-folders. A DICOM folder holds CT series and the DICOM SEG objects that
reference them (``radnet_jax.dicom.seg``; ``build_shards(fmt="dicom")`` or
auto-detected): the "file grid" of such a case is the ``dicom.load_volume``
grid of the series, its case id the salted series hash. Each case becomes one
record (``kind == "segmentation"``, see ``radnet_jax.shards.records``):

=============  ============================================================
volume         float16 ``(D, H, W)``: axial canonical orientation (D
               superior->inferior, H anterior->posterior, W right->left),
               resampled to ``spacing`` mm, HU window mapped to a range
mask           uint8 ``(D, H, W)`` on the same grid (nearest neighbour)
affine         float64 ``(4, 4)`` voxel index -> LPS mm of that grid
case, split    case id from the file name (``"7"``), "train"/"val"/"test"
geometry       what ``to_original_grid`` needs to map a prediction back onto
               the file's voxel grid: ``orig_shape`` (file array shape),
               ``orig_affine`` (file grid -> LPS mm), ``orig_spacing``,
               ``canonical_shape``, ``ornt`` (file axes -> canonical axes,
               nibabel orientation transform), ``spacing`` (mm of the record
               grid)
normalisation  e.g. ``"ct_window(-200,250)->[0,1]"``
=============  ============================================================

Resampling uses ``radnet_jax.resample`` (anti-aliased linear, extent
preserving: output voxel ``i`` sits at input index ``(i + .5) n / s - .5``);
masks use nearest neighbour on the same grid convention, and so does the
mapping of predictions back (``to_original_grid``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from radnet_jax.shards import records
from radnet_jax import resample as resample_lib
from radnet_jax.dicom import nifti
from radnet_jax.dicom import seg as segdicom
from radnet_jax.labels import lits
from radnet_jax.privacy import safe_name

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_VOLUME_RE = re.compile(r"^volume-(.+?)\.nii(\.gz)?$")


@dataclasses.dataclass(frozen=True)
class SegPrepConfig:
  """How LiTS volumes become records.

  spacing: target voxel size (D, H, W) in mm.
  window: HU window (lo, hi), clipped and mapped linearly to ``out_range``.
  out_range: (0, 1) or (-1, 1).
  val_fraction, test_fraction: share of *cases* per split (split by volume).
  seed: seed of the case shuffle that assigns splits.
  """
  spacing: tuple[float, float, float] = (2.5, 1.5, 1.5)
  window: tuple[float, float] = (-200.0, 250.0)
  out_range: tuple[float, float] = (0.0, 1.0)
  val_fraction: float = 0.0
  test_fraction: float = 0.25
  seed: int = 0

  @property
  def normalisation(self) -> str:
    return (f"ct_window({self.window[0]:g},{self.window[1]:g})->"
            f"[{self.out_range[0]:g},{self.out_range[1]:g}]")


def normalise_hu(hu: np.ndarray, window: Sequence[float],
                 out_range: Sequence[float] = (0.0, 1.0)) -> np.ndarray:
  """HU ``(D, H, W)`` -> float32 clipped to ``window`` and mapped to ``out_range``.

  Non-finite voxels become the low end of the range.
  """
  lo, hi = float(window[0]), float(window[1])
  if not hi > lo:
    raise ValueError(f"HU window must have hi > lo, got {window}")
  a, b = float(out_range[0]), float(out_range[1])
  x = np.asarray(hu, np.float32)
  out = (np.clip(x, lo, hi) - np.float32(lo)) * np.float32((b - a) / (hi - lo)) + np.float32(a)
  out[~np.isfinite(x)] = a
  return out


# ------------------------------------------------------------------ geometry


def target_shape(shape: Sequence[int], spacing: Sequence[float],
                 target_spacing: Sequence[float]) -> tuple[int, int, int]:
  """Voxel counts covering the same extent at ``target_spacing`` (mm)."""
  return tuple(max(1, int(round(n * s / t)))
               for n, s, t in zip(shape, spacing, target_spacing))


def preprocess(voxels: np.ndarray, affine: np.ndarray, geometry: dict,
               cfg: SegPrepConfig) -> tuple[np.ndarray, np.ndarray, dict]:
  """Canonical HU ``(D, H, W)`` -> (normalised float32 on the record grid,
  LPS affine of that grid, geometry with ``spacing`` filled in)."""
  spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
  shape = target_shape(voxels.shape, spacing, cfg.spacing)
  res = resample_lib.resample(voxels, affine, spacing, shape)
  geometry = dict(geometry, spacing=[float(s) for s in res.spacing])
  return normalise_hu(res.voxels, cfg.window, cfg.out_range), res.affine, geometry


# ------------------------------------------------------------------ cases


def find_lits_cases(input_dir: str) -> list[tuple[str, str, str | None]]:
  """(case id, volume path, segmentation path or None), sorted by case id.

  Case ids come from the file name (``volume-7.nii.gz`` -> ``"7"``); numeric
  ids sort numerically.
  """
  if not os.path.isdir(input_dir):
    raise FileNotFoundError(f"{input_dir}: not a directory")
  vols, segs = {}, {}
  for root, _, files in os.walk(input_dir):
    for f in files:
      m = _VOLUME_RE.match(f)
      if m:
        vols[safe_name(m.group(1))] = os.path.join(root, f)
      m = re.match(r"^segmentation-(.+?)\.nii(\.gz)?$", f)
      if m:
        segs[safe_name(m.group(1))] = os.path.join(root, f)
  key = lambda c: (0, int(c), c) if c.isdigit() else (1, 0, c)
  return [(c, vols[c], segs.get(c)) for c in sorted(vols, key=key)]


def assign_splits(cases: Sequence[str], val_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, str]:
  """Case id -> split, by a seeded shuffle of the cases (split by volume).

  With 3+ cases a positive fraction gets at least one case; train keeps at
  least one case.
  """
  cases = sorted(cases)
  n = len(cases)
  order = np.random.default_rng(seed).permutation(n)

  def count(frac):
    if frac <= 0 or n < 3:
      return 0
    return max(1, int(round(n * frac)))
  n_test = count(test_fraction)
  n_val = min(count(val_fraction), max(n - n_test - 1, 0))
  out = {}
  for rank, i in enumerate(order):
    out[cases[i]] = ("test" if rank < n_test else
                     "val" if rank < n_test + n_val else "train")
  return out


def make_record(case: str, vol_path: str, seg_path: str | None,
                cfg: SegPrepConfig, split: str = "train") -> dict:
  """One LiTS case -> a segmentation record dict (see module docstring)."""
  hu, affine, geometry = nifti.load_nifti_canonical(vol_path)
  seg = None
  if seg_path is not None:
    seg, seg_affine, seg_geom = nifti.load_nifti_canonical(seg_path)
    if seg_geom["orig_shape"] != geometry["orig_shape"]:
      raise ValueError(f"{seg_path}: shape {seg_geom['orig_shape']} differs from "
                       f"its volume {geometry['orig_shape']}")
    if not np.allclose(seg_affine, affine, atol=1e-3):
      raise ValueError(f"{seg_path}: affine differs from its volume's")
  return record_from_canonical(case, hu, affine, geometry, seg, cfg, split,
                               where=seg_path or vol_path)


def record_from_canonical(case: str, hu: np.ndarray, affine: np.ndarray,
                          geometry: dict, seg: np.ndarray | None,
                          cfg: SegPrepConfig, split: str = "train",
                          where: str = "") -> dict:
  """Canonical HU ``(D, H, W)`` (+ label map on the same grid, or None) ->
  a segmentation record; the common tail of the NIfTI and DICOM inputs."""
  vol, grid_affine, geometry = preprocess(hu, affine, geometry, cfg)
  if seg is not None:
    seg = np.rint(seg)
    bad = np.setdiff1d(np.unique(seg), lits.LABELS)
    if bad.size:
      raise ValueError(f"{where}: unexpected labels {bad.tolist()} "
                       f"(expected 0 background, 1 liver, 2 tumour)")
    mask = nifti.resize_labels(seg.astype(np.uint8), vol.shape)
  else:
    mask = np.zeros(vol.shape, np.uint8)
  return {
      "kind": "segmentation",
      "volume": vol.astype(np.float16),
      "mask": np.ascontiguousarray(mask, np.uint8),
      "affine": np.asarray(grid_affine, np.float64),
      "case": case,
      "split": split,
      "has_mask": seg is not None,
      "geometry": geometry,
      "normalisation": cfg.normalisation,
  }


# ------------------------------------------------------------------ shards


def shard_path(out_dir: str, split: str) -> str:
  return os.path.join(out_dir, f"seg_{split}.array_record")


def detect_format(input_dir: str) -> str:
  """"nifti" when ``input_dir`` holds LiTS ``volume-*.nii[.gz]`` files, else
  "dicom" (CT series + DICOM SEG objects)."""
  return "nifti" if find_lits_cases(input_dir) else "dicom"


def _dicom_jobs(input_dir: str, out_dir: str, cfg: SegPrepConfig, salt: str | None,
                label_map: Mapping[str | int, int] | None, workers: int,
                unlabelled: bool):
  """(case jobs, splits, problems, CT series left out for lack of a SEG) for
  a folder of DICOM CT + SEG cases."""
  from radnet_jax import privacy  # pylint: disable=g-import-not-at-top
  salt = privacy.load_or_create_salt(out_dir, salt)
  cases, problems = segdicom.find_dicom_cases(input_dir, salt, workers=workers)
  n_all = len(cases)
  if not unlabelled:
    cases = [c for c in cases if c.seg_path is not None]
  # Split by patient (several series of one patient never straddle splits).
  by_patient = assign_splits(sorted({c.patient for c in cases}), cfg.val_fraction,
                             cfg.test_fraction, cfg.seed)
  splits = {c.case: by_patient[c.patient] for c in cases}

  def job(c):
    def load():
      hu, affine, geometry, mask = segdicom.load_case(c, label_map)
      return record_from_canonical(c.case, hu, affine, geometry, mask, cfg,
                                   splits[c.case], where=c.seg_path or c.case)
    where = os.path.relpath(c.seg_path or c.stack.files[0], input_dir)
    return c.case, where, load
  return [job(c) for c in cases], splits, problems, n_all - len(cases)


def build_shards(input_dir: str, out_dir: str, cfg: SegPrepConfig = SegPrepConfig(),
                 progress: bool = True, *, fmt: str = "auto", salt: str | None = None,
                 label_map: Mapping[str | int, int] | None = None,
                 workers: int = 1, unlabelled: bool = False) -> dict:
  """Converts a LiTS folder (or DICOM CT + SEG folder) to
  ``out_dir/seg_{split}.array_record`` shards.

  Writes ``out_dir/manifest.json`` (config, splits, per-case shapes, errors)
  and returns it. A case that fails is logged with its file and reason and
  left out; the others are converted.

  fmt: "nifti" (LiTS ``volume-N`` / ``segmentation-N``), "dicom" (every CT
    series under ``input_dir``, labelled by the DICOM SEG that references it,
    see ``radnet_jax.dicom.seg``; case ids are salted series hashes, splits
    by patient) or "auto" (NIfTI when ``volume-*.nii*`` files exist).
  salt, label_map, workers, unlabelled: DICOM only: the PHI hashing salt
    (default ``$RADNET_SALT`` or ``out_dir/.salt``), segment name -> label
    overrides, header-scan processes, and whether CT series without a SEG
    become records (``has_mask`` False; by default they are left out and
    counted in the manifest's ``unlabelled_series_left_out``).
  """
  from array_record.python.array_record_module import ArrayRecordWriter
  if fmt == "auto":
    fmt = detect_format(input_dir)
  problems: list[dict] = []
  failures: tuple = (ValueError, OSError)
  if fmt == "nifti":
    cases = find_lits_cases(input_dir)
    if not cases:
      raise FileNotFoundError(f"{input_dir}: no volume-*.nii[.gz] files")
    splits = assign_splits([c for c, _, _ in cases], cfg.val_fraction,
                           cfg.test_fraction, cfg.seed)
    jobs = [(case, os.path.basename(vp),
             (lambda case=case, vp=vp, sp=sp: make_record(case, vp, sp, cfg, splits[case])))
            for case, vp, sp in cases]
  elif fmt == "dicom":
    from radnet_jax.dicom.errors import DicomError  # pylint: disable=g-import-not-at-top
    failures += (DicomError,)
    jobs, splits, problems, left_out = _dicom_jobs(input_dir, out_dir, cfg, salt,
                                                   label_map, workers, unlabelled)
    if not jobs:
      raise FileNotFoundError(f"{input_dir}: no CT DICOM series"
                              + (" with a DICOM SEG" if left_out else "") + " found")
  else:
    raise ValueError(f"fmt must be 'auto', 'nifti' or 'dicom', got {fmt!r}")
  os.makedirs(out_dir, exist_ok=True)
  writers, counts = {}, {s: 0 for s in SPLITS}
  manifest = {"kind": "segmentation", "config": dataclasses.asdict(cfg),
              "normalisation": cfg.normalisation, "labels": lits.vocabulary(3),
              "splits": {s: [] for s in SPLITS}, "cases": {}, "errors": []}
  if fmt == "dicom":
    manifest["format"] = "dicom"
    manifest["unlabelled_series_left_out"] = left_out
    manifest["errors"].extend(problems)
    for p in problems:
      log.warning("%s: %s", p["file"], p["reason"])
  it: Iterable = jobs
  if progress:
    from tqdm import tqdm
    it = tqdm(jobs, desc=("LiTS" if fmt == "nifti" else "DICOM") + " -> shards",
              unit="case")
  try:
    for case, where, load in it:
      split = splits[case]
      try:
        rec = load()
      except failures as e:
        log.warning("skipping case %s: %s", case, e)
        manifest["errors"].append({"case": case, "file": where, "reason": str(e)})
        continue
      if split not in writers:
        writers[split] = ArrayRecordWriter(shard_path(out_dir, split), "group_size:1")
      writers[split].write(records.encode(rec))
      counts[split] += 1
      manifest["splits"][split].append(case)
      manifest["cases"][case] = {
          "split": split, "shape": list(rec["volume"].shape),
          "liver_voxels": int(np.count_nonzero(rec["mask"])),
          "tumour_voxels": int(np.count_nonzero(rec["mask"] == 2)),
          "has_mask": rec["has_mask"]}
  finally:
    for w in writers.values():
      w.close()
  manifest["files"] = {s: os.path.basename(shard_path(out_dir, s))
                       for s in SPLITS if counts[s]}
  manifest["counts"] = counts
  with open(os.path.join(out_dir, records.MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)
  if progress:
    print(f"{'split':<6} {'cases':>5}")
    for s in SPLITS:
      print(f"{s:<6} {counts[s]:>5}")
    if manifest["errors"]:
      print(f"{len(manifest['errors'])} case(s) skipped; see manifest.json errors")
  return manifest


def load_manifest(shards_dir: str) -> dict:
  """The segmentation shards' ``manifest.json`` (``records.read_manifest``)."""
  return records.read_manifest(shards_dir, "segmentation")


def load_records(shards_dir: str, split: str,
                 cases: Sequence[str] | None = None) -> list[dict]:
  """Decoded records of one split (all, or those whose case is in ``cases``).

  Arrays are read-only numpy views of the record bytes.
  """
  from array_record.python.array_record_module import ArrayRecordReader
  path = shard_path(shards_dir, split)
  if not os.path.exists(path):
    return []
  reader = ArrayRecordReader(path)
  try:
    out = []
    for i in range(reader.num_records()):
      rec = records.decode(reader.read([i])[0])
      if rec.get("kind") != "segmentation":
        raise ValueError(f"{path}: record {i} is {rec.get('kind')!r}, not a "
                         f"segmentation record")
      if cases is None or rec["case"] in cases:
        out.append(rec)
  finally:
    reader.close()
  return out
