"""Variable slice spacing, missing slices and gantry tilt of both signs.

The series come from ``radnet_jax.phantom.geometry_layouts`` with the linear
field, so every output voxel can be checked against the field at its own LPS
position (linear interpolation of rounded stored values is exact to 0.5).
"""
import glob
import math
import warnings

import numpy as np
import pydicom
import pytest

from radnet_jax import dicom
from radnet_jax.dicom import geometry, reference
from radnet_jax.phantom import geometry_layouts as gl
from tests.data import synth_dicom as sd

SALT = "test-salt"
ROWS = COLS = 20
GEOMETRY_STYLES = ("ct_spacing_two", "ct_spacing_three", "ct_spacing_uneven",
                   "ct_missing_slice",
                   "ct_tilt_pos", "ct_tilt_neg", "ct_tilt_spacing")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
  root = tmp_path_factory.mktemp("geometry")
  rows = gl.make_geometry_layouts(str(root), styles=GEOMETRY_STYLES, rows=ROWS,
                                  cols=COLS, field="linear")
  return root, {r["style"]: r for r in rows}


def _load(folder):
  res = dicom.scan(str(folder), salt=SALT)
  assert not res.skipped, res.skipped
  (stack,) = res.stacks
  return dicom.load_volume(stack)


def _headers(folder):
  dss = [pydicom.dcmread(p, stop_before_pixels=True)
         for p in sorted(glob.glob(str(folder / "IM*")))]
  pos = [np.array([float(v) for v in d.ImagePositionPatient]) for d in dss]
  iop = [float(v) for v in dss[0].ImageOrientationPatient]
  return pos, iop, [float(v) for v in dss[0].PixelSpacing]


def _field_error(vol, folder):
  """|voxel - field| at voxels interpolated inside the slices' rows/columns."""
  pos, iop, ps = _headers(folder)
  world = sd.world_grid(vol.affine, vol.voxels.shape)
  rows, cols = sd.in_plane_coords(world, pos, iop, ps)
  inside = np.all((rows >= -1e-3) & (rows <= ROWS - 1 + 1e-3) &
                  (cols >= -1e-3) & (cols <= COLS - 1 + 1e-3), axis=-1)
  err = np.abs(vol.voxels - gl.field_value(world, "linear"))
  return err[inside], inside


@pytest.mark.parametrize("diffs,kind,spacings,gaps,cuts", [
    ([1, 1, 1, 1, 2, 2, 2, 2], "variable", (1.0, 2.0), (), ()),
    ([1.25] * 4 + [5] * 3 + [7] * 3, "variable", (1.25, 5.0, 7.0), (), ()),
    ([1, 1, 1, 1.5, 2, 2, 2], "variable", (1.0, 1.5, 2.0), (), ()),
    ([1, 1, 2, 1, 1], "gaps", (1.0,), (2,), ()),
    ([1, 1, 1, 2], "gaps", (1.0,), (3,), ()),
    ([2, 2, 2, 2, 20, 2, 2, 2], "uniform", (2.0,), (), (4,)),
    ([1.25, 1.25, 202.5], "uniform", (1.25,), (), (2,)),
    ([1, 1, 1.08, 0.92, 1, 1], "uniform", (0.92, 1.0, 1.08), (), ()),   # jitter
    ([5, 5, 5, 7, 5, 5, 1.1, 5, 5], "variable", (1.1, 5.0, 7.0), (), ()),  # dcm2niix: > 0.2 mm
    ([1.1] * 4 + [7, 5, 5, 5], "variable", (1.1, 5.0, 7.0), (), ()),
    ([1, 0, 1, 1, 0, 1], "uniform", (1.0,), (), ()),       # repeated positions
])
def test_classify_spacing(diffs, kind, spacings, gaps, cuts):
  plan = geometry.classify_spacing(np.array(diffs, float))
  assert (plan.kind, plan.spacings, plan.gaps, plan.cuts) == (kind, spacings, gaps, cuts)
  if kind == "variable":
    assert plan.step == min(d for d in diffs if d > 0)


@pytest.mark.parametrize("style", ["ct_spacing_two", "ct_spacing_three",
                                   "ct_spacing_uneven"])
def test_variable_spacing_is_resampled_equidistant(layouts, style):
  root, truth = layouts
  row = truth[style]
  vol = _load(root / style)
  want = [float(v) for v in row["spacings"].split(";")]
  assert vol.record["SliceSpacings"] == pytest.approx(want, abs=1e-3)
  assert vol.record["ResampledSliceSpacing"] is True
  span, step, n = float(row["span_mm"]), float(row["min_spacing"]), row["n_files"]
  # dcm2niix's _Eq_ rule: the smallest spacing, at most twice the slices.
  count = min(int(math.floor(span / step + 1e-3)) + 1, 2 * n)
  assert vol.voxels.shape == (count, ROWS, COLS)
  if count == 2 * n:                  # capped: the grid spans the stack
    assert vol.spacing[0] == pytest.approx(span / (count - 1), abs=1e-4)
  else:
    assert vol.spacing[0] == pytest.approx(step, abs=1e-4)
  assert vol.record["SliceSpacing"] == pytest.approx(vol.spacing[0])
  # The grid is laid from the inferior-most slice (dcm2niix's first).
  pos, _, _ = _headers(root / style)
  lowest = min(p[2] for p in pos)
  assert vol.affine[2, 3] + vol.affine[2, 0] * (count - 1) == pytest.approx(lowest, abs=1e-3)
  err, inside = _field_error(vol, root / style)
  assert inside.all()
  assert err.max() <= 0.5 + 1e-3


def test_missing_slice_keeps_the_gap_rule(layouts):
  root, _ = layouts
  vol = _load(root / "ct_missing_slice")
  assert vol.record["MissingSlicesInterpolated"] == 1
  assert "SliceSpacings" not in vol.record
  assert vol.voxels.shape == (16, ROWS, COLS)
  assert vol.spacing[0] == pytest.approx(2.0, abs=1e-4)
  err, _ = _field_error(vol, root / "ct_missing_slice")
  assert err.max() <= 0.5 + 1e-3


@pytest.mark.parametrize("style", ["ct_tilt_pos", "ct_tilt_neg", "ct_tilt_spacing"])
def test_gantry_tilt_of_either_sign_is_corrected(layouts, style):
  root, truth = layouts
  tilt = float(truth[style]["tilt_deg"])
  vol = _load(root / style)
  assert vol.record["GantryTiltCorrected"] == pytest.approx(abs(tilt), abs=0.01)
  m = vol.affine[:3, :3] / vol.spacing
  np.testing.assert_allclose(m.T @ m, np.eye(3), atol=1e-6)   # orthogonal grid
  # The plane grows by the drift of the slice corners along the rows.
  span = float(truth[style]["span_mm"]) / math.cos(math.radians(tilt))
  drift = span * math.sin(math.radians(abs(tilt))) / float(truth[style]["pixel_spacing"])
  assert vol.voxels.shape[1:] == (ROWS + math.ceil(drift - 1e-3), COLS)
  err, inside = _field_error(vol, root / style)
  assert inside.mean() > 0.8
  assert err.max() <= 0.5 + 1e-3


@pytest.mark.skipif(reference.dcm2niix_path() is None, reason="dcm2niix not installed")
@pytest.mark.parametrize("style", GEOMETRY_STYLES)
def test_geometry_layouts_match_dcm2niix(layouts, style, tmp_path):
  root, _ = layouts
  proc = reference.run_dcm2niix(str(root / style), str(tmp_path))
  refs = reference.reference_volumes(str(tmp_path))
  assert len(refs) == 1, proc.stdout
  ref = refs[0]
  assert ref.variant == ("Tilt" if style in ("ct_tilt_pos", "ct_tilt_neg") else
                         "Tilt_Eq" if style == "ct_tilt_spacing" else "Eq")
  vol = _load(root / style)
  match = reference.compare(vol.voxels, vol.affine, ref)
  if match.status == "origin":
    # dcm2niix 1.0.20220720 shifts the origin of negative-tilt outputs: the
    # voxels are ours, but its affine puts them off the field, ours on it.
    assert style == "ct_tilt_neg"
    world = sd.world_grid(ref.affine, ref.voxels.shape)
    assert np.median(np.abs(ref.voxels - gl.field_value(world, "linear"))) > 1.0
  else:
    assert match.reproduced, match.detail


def test_in_plane_coords_helper_is_consistent():
  # Sanity of the test helper: a slice's own pixels map to their indices.
  iop = gl._iop(16.0)  # pylint: disable=protected-access
  r, c = iop[:3], iop[3:]
  pos = [np.array([0.0, 0.0, 2.0 * k]) for k in range(3)]
  world = pos[1] + 3 * 0.5 * c + 4 * 0.7 * r
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    rows, cols = sd.in_plane_coords(world[None], pos, iop, (0.5, 0.7))
  np.testing.assert_allclose([rows[0], cols[0]], [[3, 3], [4, 4]], atol=1e-9)
