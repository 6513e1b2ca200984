"""load_volume(): ordering, HU, geometry, tilt, gaps, duplicates, codecs."""
import os
import shutil
import warnings

import numpy as np
import pydicom
import pytest

from radnet_jax import dicom
from radnet_jax.dicom import geometry
from tests.data import synth_dicom as sd

SALT = "test-salt"
PYDICOM_FILES = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
DATA_STORE = os.path.join(os.path.dirname(os.path.dirname(pydicom.__file__)),
                          "data_store", "data")
AXIAL = [1, 0, 0, 0, 1, 0]


def _need(path):
  if not os.path.exists(path):
    pytest.skip(f"test file not installed: {path}")
  return path


def _one_stack(root, **kw):
  res = dicom.scan(str(root), salt=SALT, **kw)
  assert len(res.stacks) == 1, res.skipped
  return res.stacks[0]


def _linear_field(world):
  """A smooth known function of LPS position (mm)."""
  return 0.5 * world[..., 0] - 0.25 * world[..., 1] + 2.0 * world[..., 2] + 100.0


def test_axial_ct_hu_order_and_affine(tmp_path):
  stored = (np.arange(5 * 4 * 3).reshape(5, 4, 3) * 11 - 200).astype(np.int16)
  pos = sd.linear_positions([-10.0, 20.0, 30.0], [0, 0, 1.25], 5)  # z ascending
  sd.write_series(str(tmp_path), stored, pos, AXIAL, pixel_spacing=(0.7, 0.8),
                  intercept=-1024)
  vol = dicom.load_volume(_one_stack(tmp_path))
  # Canonical AX: D runs superior -> inferior, i.e. z descending.
  assert vol.voxels.dtype == np.float32 and vol.voxels.shape == (5, 4, 3)
  np.testing.assert_array_equal(vol.voxels, stored[::-1].astype(np.float32) - 1024)
  np.testing.assert_allclose(vol.spacing, [1.25, 0.7, 0.8], atol=1e-6)
  expected = np.array([[0, 0, 0.8, -10.0], [0, 0.7, 0, 20.0],
                       [-1.25, 0, 0, 35.0], [0, 0, 0, 1]])
  np.testing.assert_allclose(vol.affine, expected, atol=1e-6)
  assert vol.record["SliceSpacing"] == pytest.approx(1.25)
  assert vol.record["ExtentMM"] == pytest.approx([6.25, 2.8, 2.4])
  assert vol.record["ExtentSI"] == pytest.approx(6.25)


def test_per_slice_rescale_signed(tmp_path):
  stored = np.stack([np.full((3, 3), v, np.int16) for v in (-5, 7, -300, 12)])
  slopes = [1.0, 2.0, 0.5, 4.0]
  pos = sd.linear_positions([0, 0, 0], [0, 0, -2.0], 4)  # written top-down
  sd.write_series(str(tmp_path), stored, pos, AXIAL, slopes=slopes, intercept=-10)
  vol = dicom.load_volume(_one_stack(tmp_path))
  expected = [v * s - 10 for v, s in zip((-5, 7, -300, 12), slopes)]
  np.testing.assert_allclose(vol.voxels[:, 1, 1], expected)


@pytest.mark.parametrize("plane,angle", [("SAG", 17.0), ("COR", -25.0),
                                         ("AX", 30.0), ("SAG", 0.0)])
def test_oblique_planes_canonical_and_world_consistent(tmp_path, plane, angle):
  iop = sd.oblique_iop(plane, angle)
  normal = geometry.slice_normal(iop)
  dr, dc = 0.9, 1.1
  origin = np.array([3.0, -7.0, 11.0])
  pos = sd.linear_positions(origin, 2.0 * normal, 6)
  # Stored values sample a known field at each voxel's world position.
  r, c = iop[:3], iop[3:]
  h, w = np.meshgrid(np.arange(7), np.arange(5), indexing="ij")
  stored = np.stack([np.round(_linear_field(
      p + h[..., None] * dr * c + w[..., None] * dc * r) * 10).astype(np.int16)
                     for p in pos])
  sd.write_series(str(tmp_path), stored, pos, iop, pixel_spacing=(dr, dc),
                  modality="MR")
  vol = dicom.load_volume(_one_stack(tmp_path))
  world = sd.world_grid(vol.affine, vol.voxels.shape)
  np.testing.assert_allclose(vol.voxels, np.round(_linear_field(world) * 10),
                             atol=1e-3)
  targets = geometry.CANONICAL[geometry.plane_of(normal)]
  for k in range(3):
    assert vol.affine[:3, k] @ targets[k] > 0
  assert sorted(np.round(vol.spacing, 6)) == sorted([2.0, dr, dc])
  assert vol.spacing[0] == pytest.approx(2.0, abs=1e-3)


def test_gantry_tilt_is_resampled(tmp_path):
  tilt = np.radians(15.0)
  iop = [1, 0, 0, 0, np.cos(tilt), -np.sin(tilt)]   # rows tilted about x
  dr = dc = 1.0
  n_slices = 8
  pos = sd.linear_positions([0, 0, 0], [0, 0, 2.0], n_slices)  # table moves in z
  r, c = np.array(iop[:3]), np.array(iop[3:])
  h, w = np.meshgrid(np.arange(12), np.arange(6), indexing="ij")
  stored = np.stack([np.round(_linear_field(
      p + h[..., None] * dr * c + w[..., None] * dc * r) * 10).astype(np.int16)
                     for p in pos])
  sd.write_series(str(tmp_path), stored, pos, iop, pixel_spacing=(dr, dc))
  vol = dicom.load_volume(_one_stack(tmp_path))
  assert vol.record["GantryTiltCorrected"] == pytest.approx(15.0, abs=0.01)
  m = vol.affine[:3, :3] / vol.spacing
  np.testing.assert_allclose(m.T @ m, np.eye(3), atol=1e-6)  # orthogonal grid
  assert vol.spacing[0] == pytest.approx(2.0 * np.cos(tilt), abs=1e-3)
  # The plane grows by the whole drift (ceil(7 * 2 mm * tan 15deg) = 4 rows,
  # as dcm2niix's _Tilt output), and every voxel interpolated inside the
  # slices' rows holds the field at its position.
  assert vol.voxels.shape == (8, 12 + 4, 6)
  world = sd.world_grid(vol.affine, vol.voxels.shape)
  truth = np.round(_linear_field(world) * 10)
  rows, _ = sd.in_plane_coords(world, pos, iop, (dr, dc))
  inside = np.all((rows >= 0) & (rows <= 11), axis=-1)
  assert inside.mean() > 0.6
  # Stored values are rounded, so interpolation is exact to 1 unit (0.05 mm).
  np.testing.assert_allclose(vol.voxels[inside], truth[inside], atol=1.0)


def test_one_missing_slice_is_interpolated(tmp_path):
  # Slices at z = 0..5 mm holding 10 * z HU, the file of z = 3 mm is lost.
  z = [0, 1, 2, 4, 5]
  stored = np.stack([np.full((3, 3), 10 * k, np.int16) for k in z])
  sd.write_series(str(tmp_path), stored,
                  [np.array([0, 0, k], float) for k in z], AXIAL)
  vol = dicom.load_volume(_one_stack(tmp_path))
  assert vol.voxels.shape == (6, 3, 3)
  assert vol.record["MissingSlicesInterpolated"] == 1
  np.testing.assert_allclose(vol.spacing[0], 1.0)
  # AX canonical order is superior first: z = 5 .. 0.
  np.testing.assert_allclose(vol.voxels[:, 1, 1], [50, 40, 30, 20, 10, 0])


def test_too_many_missing_slices_raise(tmp_path):
  # 3 single-slice holes in 20 slices (15% > 10%): no interpolation.
  z = [k for k in range(20) if k not in (4, 9, 14)]
  sd.write_series(str(tmp_path), np.zeros((len(z), 3, 3), np.int16),
                  [np.array([0, 0, k], float) for k in z], AXIAL)
  with pytest.raises(dicom.DicomError, match=r"missing slice.*3 slice\(s\) missing"):
    dicom.load_volume(_one_stack(tmp_path))


def test_wide_gap_splits_the_stack(tmp_path):
  # 5 + 4 slices 2 mm apart, 20 mm of missing files between them.
  z = [0, 2, 4, 6, 8, 28, 30, 32, 34]
  stored = np.stack([np.full((3, 3), k, np.int16) for k in z])
  sd.write_series(str(tmp_path), stored,
                  [np.array([0, 0, k], float) for k in z], AXIAL)
  res = dicom.scan(str(tmp_path), salt=SALT)
  assert not res.skipped
  lo, hi = sorted(res.stacks, key=lambda st: len(st.files))
  assert len(lo.files) == 4 and len(hi.files) == 5 and lo.key != hi.key
  for st, want in ((hi, [8, 6, 4, 2, 0]), (lo, [34, 32, 30, 28])):
    vol = dicom.load_volume(st)
    np.testing.assert_allclose(vol.voxels[:, 0, 0], want)
    np.testing.assert_allclose(vol.spacing[0], 2.0)
    assert vol.affine[2, 3] == want[0]          # superior-most slice first
  # Fragments below min_slices are skipped, naming the gap.
  res = dicom.scan(str(tmp_path), salt=SALT, min_slices=5)
  assert [len(st.files) for st in res.stacks] == [5]
  assert len(res.skipped) == 4
  assert all("gap of 20.0 mm" in k.reason for k in res.skipped)


def test_real_ct_with_gap_is_split():
  # A real GE head CT series: 3 slices, a 202.5 mm gap, 1 slice.
  root = _need(os.path.join(PYDICOM_FILES, "dicomdirtests", "77654033", "CT2"))
  res = dicom.scan(root, salt=SALT)
  (stack,) = res.stacks
  (frag,) = res.skipped
  assert "fragment of 1 slice(s)" in frag.reason
  assert "gap of 202.5 mm" in frag.reason
  vol = dicom.load_volume(stack)
  assert vol.voxels.shape[0] == 3
  np.testing.assert_allclose(vol.spacing[0], 1.25, atol=1e-3)
  parts = dicom.scan(root, salt=SALT, min_slices=1).stacks
  vols = sorted((dicom.load_volume(st) for st in parts),
                key=lambda v: v.voxels.shape[0])
  assert [v.voxels.shape[0] for v in vols] == [1, 3]
  np.testing.assert_array_equal(vols[1].voxels, vol.voxels)
  # The fragment lies 202.5 mm from the nearest slice of the 3-slice part.
  ends = [vols[1].affine[2, 3], vols[1].affine[2, 3] - 2 * 1.25]
  gap = min(abs(vols[0].affine[2, 3] - e) for e in ends)
  np.testing.assert_allclose(gap, 202.5, atol=1e-3)



def test_duplicates_identical_dropped_different_rejected(tmp_path):
  stored = (np.arange(4 * 9).reshape(4, 3, 3)).astype(np.int16)
  pos = sd.linear_positions([0, 0, 0], [0, 0, 1.0], 4)
  series = pydicom.uid.generate_uid()
  sd.write_series(str(tmp_path / "a"), stored, pos, AXIAL, series_uid=series)
  sd.write_series(str(tmp_path / "a"), stored[1:2], pos[1:2], AXIAL,
                  series_uid=series, seed=5)
  vol = dicom.load_volume(_one_stack(tmp_path / "a"))
  assert vol.voxels.shape == (4, 3, 3)
  assert vol.record["DuplicateSlicesDropped"] == 1
  series = pydicom.uid.generate_uid()
  sd.write_series(str(tmp_path / "b"), stored, pos, AXIAL, series_uid=series)
  sd.write_series(str(tmp_path / "b"), stored[1:2] + 1, pos[1:2], AXIAL,
                  series_uid=series, seed=5)
  with pytest.raises(dicom.DicomError, match="same position"):
    dicom.load_volume(_one_stack(tmp_path / "b"))


def test_non_uniform_spacing_resampled(tmp_path):
  z = np.array([0.0, 1.0, 2.0, 3.08, 4.0, 5.0, 6.0])
  pos = [np.array([0, 0, v]) for v in z]
  stored = np.stack([np.full((2, 2), 100 * v, np.int16) for v in z])
  sd.write_series(str(tmp_path), stored, pos, AXIAL)
  vol = dicom.load_volume(_one_stack(tmp_path))
  assert vol.record["ResampledSliceSpacing"] is True
  assert vol.voxels.shape[0] == 7 and vol.spacing[0] == pytest.approx(1.0)
  world_z = vol.affine[2, 3] + vol.affine[2, 0] * np.arange(7)
  np.testing.assert_allclose(vol.voxels[:, 0, 0], 100 * world_z, atol=1e-3)


def test_real_ct_series_matches_pydicom():
  root = _need(os.path.join(PYDICOM_FILES, "dicomdirtests", "98892001", "CT5N"))
  vol = dicom.load_volume(_one_stack(root))
  dss = [pydicom.dcmread(os.path.join(root, f)) for f in sorted(os.listdir(root))]
  dss.sort(key=lambda d: -float(d.ImagePositionPatient[2]))  # superior first
  ref = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
                  for d in dss])
  np.testing.assert_array_equal(vol.voxels, ref.astype(np.float32))
  np.testing.assert_allclose(vol.spacing, [2.5, 0.488281, 0.488281], atol=1e-6)
  np.testing.assert_allclose(vol.affine[:3, 3], [-72.2, -143.0, 8.7625], atol=1e-4)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_bigendian.dcm"])
def test_compressed_syntaxes_decode_identically(tmp_path, name):
  ref_path = _need(os.path.join(PYDICOM_FILES, "MR_small.dcm"))
  shutil.copy(_need(os.path.join(PYDICOM_FILES, name)), tmp_path / name)
  shutil.copy(ref_path, tmp_path / "ref.dcm")
  ref = dicom.load_volume(_one_stack(tmp_path / "ref.dcm", min_slices=1))
  vol = dicom.load_volume(_one_stack(tmp_path / name, min_slices=1))
  assert vol.voxels.shape == (1, 64, 64)
  np.testing.assert_array_equal(vol.voxels, ref.voxels)
  np.testing.assert_allclose(vol.affine, ref.affine)


def test_compressed_multifile_series(tmp_path):
  """A 3-slice series whose files are JPEG-LS (header edits keep the codec)."""
  src = pydicom.dcmread(_need(os.path.join(PYDICOM_FILES,
                                           "MR_small_jpeg_ls_lossless.dcm")))
  series = pydicom.uid.generate_uid()
  for k in range(3):
    src.SeriesInstanceUID = series
    src.SOPInstanceUID = pydicom.uid.generate_uid()
    src.ImagePositionPatient = [0, 0, 4.0 * k]
    src.ImageOrientationPatient = AXIAL
    src.save_as(tmp_path / f"s{k}")
  vol = dicom.load_volume(_one_stack(tmp_path))
  ref = pydicom.dcmread(PYDICOM_FILES + "/MR_small.dcm").pixel_array
  assert vol.voxels.shape == (3, 64, 64)
  np.testing.assert_array_equal(vol.voxels[0], ref.astype(np.float32))
  assert vol.spacing[0] == pytest.approx(4.0)


def test_enhanced_ct_per_frame_rescale():
  path = _need(os.path.join(DATA_STORE, "eCT_Supplemental.dcm"))
  vol = dicom.load_volume(_one_stack(path, min_slices=2))
  raw = pydicom.dcmread(path).pixel_array.astype(np.float32) - 1024.0
  assert vol.voxels.shape == (2, 512, 512)
  # D runs superior -> inferior: z = -149 (frame 2) first. The IOP row
  # direction is -x, so W is flipped to run right -> left.
  np.testing.assert_array_equal(vol.voxels, raw[::-1, :, ::-1])
  np.testing.assert_allclose(vol.spacing, [10.0, 0.388672, 0.388672], atol=1e-6)
  assert vol.affine[2, 0] == pytest.approx(-10.0)


def test_enhanced_mr_and_mosaic_geometry():
  nibabel = pytest.importorskip("nibabel")
  data = os.path.join(os.path.dirname(nibabel.__file__), "nicom", "tests", "data")
  vol = dicom.load_volume(_one_stack(_need(os.path.join(data, "philips_mprage.dcm.gz"))))
  assert vol.voxels.shape == (176, 256, 256)
  np.testing.assert_allclose(vol.spacing, 1.0, atol=1e-4)
  for k, target in enumerate(geometry.CANONICAL["SAG"]):
    assert vol.affine[:3, k] @ target > 0.9
  with warnings.catch_warnings():  # nibabel: "readers are experimental"
    warnings.simplefilter("ignore")
    from nibabel.nicom import dicomwrappers
  path = _need(os.path.join(data, "siemens_dwi_1000.dcm.gz"))
  vol = dicom.load_volume(_one_stack(path))
  assert vol.voxels.shape == (48, 128, 128)
  np.testing.assert_allclose(vol.spacing, [3.0, 1.796875, 1.796875], atol=1e-4)
  import gzip
  with gzip.open(path) as f:
    wrapper = dicomwrappers.wrapper_from_data(pydicom.dcmread(f))
  ref_shape = (128, 128, 48)
  corners_ref = _corners(wrapper.affine, ref_shape)
  corners = _corners(vol.affine, vol.voxels.shape)
  np.testing.assert_allclose(corners, corners_ref, atol=1e-2)


def _corners(affine, shape):
  """The 8 world corners of a voxel grid, sorted (axis-order independent)."""
  idx = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                  for k in (0, shape[2] - 1)], float)
  pts = idx @ affine[:3, :3].T + affine[:3, 3]
  return pts[np.lexsort(np.round(pts, 2).T[::-1])]


@pytest.mark.parametrize("signed", [0, 1])
def test_native_fast_path_matches_pydicom_bit_handling(signed):
  from radnet_jax.dicom.pixels import _native_pixels
  px = np.array([[0x0123, 0x0F23], [0x0800, 0xFFFF]], np.uint16)
  ds = sd.make_slice(px, [0, 0, 0], AXIAL, [1, 1], series_uid="1.2.3",
                     study_uid="1.2.4")
  ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, signed
  expected = [[291, 3875], [2048, 4095]] if not signed else [[291, -221], [-2048, -1]]
  np.testing.assert_array_equal(ds.pixel_array, expected)
  np.testing.assert_array_equal(_native_pixels(ds), expected)


@pytest.mark.parametrize("plane", ["AX", "COR", "SAG"])
def test_reorient_in_place_equals_reorient_for_every_flip_and_transpose(plane):
  from radnet_jax.dicom import geometry
  rng = np.random.default_rng(0)
  vox = rng.standard_normal((3, 4, 5)).astype(np.float32)
  for signs in np.ndindex(2, 2, 2):
    for swap in (False, True):
      t_d, t_h, t_w = geometry.CANONICAL[plane]
      a_h, a_w = (t_w, t_h) if swap else (t_h, t_w)
      axes = [t_d * (1 - 2 * signs[0]), a_h * (1 - 2 * signs[1]),
              a_w * (1 - 2 * signs[2])]
      affine = np.eye(4)
      affine[:3, :3] = np.stack(axes, 1) * [2.0, 0.7, 0.8]
      affine[:3, 3] = [10.0, -20.0, 30.0]
      ref, ref_aff = geometry.reorient(vox, affine, plane)
      got, got_aff = geometry.reorient_in_place(vox.copy(), affine, plane)
      assert got.flags.c_contiguous and got.shape == ref.shape
      np.testing.assert_array_equal(got, ref)
      np.testing.assert_array_equal(got_aff, ref_aff)
      # The canonical axes point where the architecture says.
      unit = got_aff[:3, :3] / np.linalg.norm(got_aff[:3, :3], axis=0)
      np.testing.assert_allclose(unit.T, np.stack(geometry.CANONICAL[plane]),
                                 atol=1e-12)
