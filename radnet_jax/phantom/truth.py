"""Ground truth of the phantom corpus: ``truth.csv``, one row per image series.

Truth comes from the simulator (what was scanned), never from the headers.
Coverage: a band is covered when the scan's Z range (voxel centres) covers at
least ``COVER_FRACTION`` of that band's extent in this patient, or when the
band fills at least that fraction of the scan's range (a slab through part of
the brain, a targeted liver slab, images the brain or the liver); the breast band
additionally needs a study that targets the breast (only whole-body studies
here), as in the taxonomy (``docs``: breast = study targets the breast).
"""
from __future__ import annotations

import csv

from radnet_jax.labels.taxonomy import COVERAGE_BANDS
from radnet_jax.privacy import hash_id

COLUMNS = ("series_uid", "patient_id", "modality", "sequence", "plane", "contrast",
           "coverage", "spacing", "region", "n_slices", "header_noise",
           # extra columns (not part of the fixed interface): for analysis
           "study_uid", "vendor", "thickness", "tilt_deg", "rows", "columns",
           "pixel_spacing", "fat_sat", "z_low", "z_high", "field_t")
COVER_FRACTION = 0.5


def coverage(bands: dict, z_low: float, z_high: float, region: str) -> tuple:
  """Bands (COVERAGE_BANDS order) covered by the scan range [z_low, z_high] mm."""
  out = []
  for band in COVERAGE_BANDS:
    lo, hi = bands[band]
    overlap = max(0.0, min(hi, z_high) - max(lo, z_low))
    if overlap > 0 and overlap >= COVER_FRACTION * min(hi - lo, z_high - z_low):
      if band == "breast" and region != "wholebody":
        continue
      out.append(band)
  return tuple(out)


def write_truth(path: str, rows: list) -> None:
  """Writes rows (dicts with COLUMNS keys) sorted by series_uid."""
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS)
    w.writeheader()
    for row in sorted(rows, key=lambda r: r["series_uid"]):
      w.writerow({k: row.get(k, "") for k in COLUMNS})


def read_truth(path: str) -> list:
  """truth.csv -> list of row dicts (numbers parsed: spacing, n_slices, ...)."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  for r in rows:
    for k in ("spacing", "thickness", "tilt_deg", "pixel_spacing", "z_low", "z_high"):
      if r.get(k, "") != "":
        r[k] = float(r[k])
    for k in ("n_slices", "rows", "columns"):
      if r.get(k, "") != "":
        r[k] = int(r[k])
  return rows


def load_truth(path: str, salt: str) -> dict:
  """truth.csv -> {hash_id(series_uid, salt): row}, keyed like ingestion's SeriesHash."""
  return {hash_id(r["series_uid"], salt): r for r in read_truth(path)}
