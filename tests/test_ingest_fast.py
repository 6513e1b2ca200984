"""The streaming conversion path equals load_volume + cache_record.

``dicom.stream.load_resampled`` decodes a stack straight onto the shard grid
through ``resample.SliceStream``; ``convert.convert_stack`` uses it. These
tests require the same voxels (bit for bit), affine, spacing, record and
encoded shard record as the full-volume path, on real DICOM files (pydicom's
test files, copied into multi-slice series keeping their encodings) and on
synthetic series with oblique, flipped and transposed geometry, and check
that the stacks the streaming path declines still convert (or fail) exactly
as before.
"""
import os
import shutil
import tracemalloc
import warnings

import numpy as np
import pydicom
import pytest

from radnet_jax import dicom
from radnet_jax.shards import convert
from radnet_jax.shards import records
from radnet_jax import resample as rs
from radnet_jax.dicom import geometry, stream
from radnet_jax.dicom.errors import DicomError
from tests.data import synth_dicom as sd

SALT = "test-salt"
PYDICOM_FILES = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
DATA_STORE = os.path.join(os.path.dirname(os.path.dirname(pydicom.__file__)),
                          "data_store", "data")
AXIAL = [1, 0, 0, 0, 1, 0]
SHAPES = [(4, 6, 5), (9, 3, 7), (5, 8, 8)]   # D down / up / same


def _need(path):
  if not os.path.exists(path):
    pytest.skip(f"test file not installed: {path}")
  return path


def _stacks(root, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    res = dicom.scan(str(root), salt=SALT, **kw)
  assert res.stacks, res.skipped
  return res.stacks


def _assert_same_as_full_path(stack, shape):
  """Streaming result == load_volume + resize, and the same shard bytes."""
  fast = stream.load_resampled(stack, shape)
  assert fast is not None, "the streaming path declined this stack"
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    vol = dicom.load_volume(stack)
  assert fast.shape == vol.voxels.shape
  assert fast.voxels.dtype == np.float32 and fast.voxels.shape == tuple(shape)
  np.testing.assert_array_equal(fast.voxels, rs.resize(vol.voxels, shape))
  np.testing.assert_array_equal(fast.affine, vol.affine)
  np.testing.assert_array_equal(fast.spacing, vol.spacing)
  assert fast.record == vol.record
  full = records.encode(convert.cache_record(stack, vol, shape))
  assert records.encode(convert.resampled_cache_record(stack, fast)) == full
  assert records.encode(convert.convert_stack(stack, shape)) == full
  return fast, vol


# ---------------------------------------------------------------------------
# SliceStream == resize
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("in_shape,out_shape,mode", [
    ((37, 20, 18), (8, 12, 10), "depth"),      # CT-like: D shrinks
    ((301, 9, 11), (48, 9, 11), "depth"),      # long series, wide band
    ((3, 5, 5), (1, 2, 2), "depth"),
    ((5, 31, 29), (24, 16, 16), "plane"),      # few thick slices, D grows
    ((1, 6, 7), (4, 3, 3), "plane"),
    ((12, 17, 13), (12, 8, 9), "identity"),
    ((13, 97, 97), (5, 41, 37), "depth"),      # odd sizes: unaligned rows
])
def test_slice_stream_equals_resize_bit_for_bit(in_shape, out_shape, mode):
  x = np.random.default_rng(0).normal(0, 100, in_shape).astype(np.float32)
  stream = rs.SliceStream(in_shape, out_shape)
  assert stream._mode == mode  # pylint: disable=protected-access
  for z in range(in_shape[0]):
    stream.slot()[...] = x[z]
    stream.push()
  np.testing.assert_array_equal(stream.result(), rs.resize(x, out_shape))
  # The window holds a few bands of slices, never the whole long series.
  if in_shape[0] > 100:
    assert stream.window_slices < in_shape[0] // 4


def test_slice_stream_rejects_misuse():
  stream = rs.SliceStream((3, 4, 4), (2, 2, 2))
  stream.slot()[...] = 1.0
  stream.push()
  with pytest.raises(ValueError, match="1 of 3"):
    stream.result()
  for _ in range(2):
    stream.slot()[...] = 1.0
    stream.push()
  np.testing.assert_allclose(stream.result(), 1.0)
  with pytest.raises(ValueError, match="all 3 input slices"):
    stream.slot()
  with pytest.raises(ValueError):
    rs.SliceStream((0, 4, 4), (2, 2, 2))
  with pytest.raises(ValueError):
    rs.SliceStream((3, 4, 4), (2, 0, 2))


# ---------------------------------------------------------------------------
# Real DICOM files
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_real_ct_series(shape):
  root = _need(os.path.join(PYDICOM_FILES, "dicomdirtests", "98892001", "CT5N"))
  (stack,) = _stacks(root)
  fast, _ = _assert_same_as_full_path(stack, shape)
  assert fast.shape == (5, 16, 16)
  assert fast.record["Modality"] == "CT"


def _series_from_file(src_path, folder, n=5, iop=AXIAL, step=(0, 0, 3.0),
                      vary_pixels=True):
  """n copies of a real file at n positions, keeping its transfer syntax;
  uncompressed pixels are shifted per slice so that D resampling mixes
  different values."""
  ds = pydicom.dcmread(src_path)
  series = pydicom.uid.generate_uid()
  native = not ds.file_meta.TransferSyntaxUID.is_compressed
  base = ds.pixel_array.copy() if native and vary_pixels else None
  os.makedirs(folder, exist_ok=True)
  for k in range(n):
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.ImagePositionPatient = [float(v) * k for v in step]
    ds.ImageOrientationPatient = list(iop)
    ds.RescaleSlope, ds.RescaleIntercept = "1.5", f"{-20 * k}"
    if base is not None:
      ds.PixelData = np.roll(base, 3 * k, axis=1).astype(base.dtype).tobytes()
    ds.save_as(os.path.join(folder, f"s{k:02d}"))
  return folder


@pytest.mark.parametrize("name", [
    "CT_small.dcm",                       # explicit VR LE, signed
    "MR_small.dcm",
    "MR_small_implicit.dcm",              # implicit VR LE
    "MR_small_jpeg_ls_lossless.dcm",      # compressed: pydicom per slice
    "MR_small_RLE.dcm",
])
def test_real_files_copied_into_series(tmp_path, name):
  src = _need(os.path.join(PYDICOM_FILES, name))
  _series_from_file(src, str(tmp_path / "s"))
  (stack,) = _stacks(tmp_path / "s")
  for shape in SHAPES[:2]:
    _assert_same_as_full_path(stack, shape)


def test_real_mr_2_implicit_vr_oblique(tmp_path):
  src = _need(os.path.join(DATA_STORE, "MR2_UNCI.dcm"))
  iop = sd.oblique_iop("SAG", 14.0)
  normal = geometry.slice_normal(iop)
  _series_from_file(src, str(tmp_path / "s"), n=4, iop=iop, step=-2.5 * normal)
  (stack,) = _stacks(tmp_path / "s")
  _assert_same_as_full_path(stack, (6, 32, 40))


# ---------------------------------------------------------------------------
# Synthetic geometry: oblique, flipped, transposed, rescaled, 12-bit
# ---------------------------------------------------------------------------

def _flipped_iop(iop, how):
  r, c = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
  if how == "flip_r":
    r = -r
  elif how == "flip_c":
    c = -c
  elif how == "swap":            # rows along r: canonical needs a transpose
    r, c = c, r
  elif how == "swap_flip":
    r, c = -c, -r
  return np.concatenate([r, c])


@pytest.mark.parametrize("plane,angle,how,descending", [
    ("AX", 0.0, "none", False),
    ("AX", 20.0, "flip_r", True),
    ("AX", -10.0, "swap", False),
    ("COR", 15.0, "flip_c", True),
    ("COR", -25.0, "swap_flip", False),
    ("SAG", 12.0, "swap", True),
    ("SAG", -30.0, "flip_r", False),
])
def test_synthetic_oblique_flipped_series(tmp_path, plane, angle, how, descending):
  iop = _flipped_iop(sd.oblique_iop(plane, angle), how)
  normal = geometry.slice_normal(iop)
  n = 11
  rng = np.random.default_rng(3)
  stored = rng.integers(-1200, 3000, size=(n, 13, 9)).astype(np.int16)
  step = (-1.7 if descending else 1.7) * normal
  pos = sd.linear_positions([5.0, -12.0, 40.0], step, n)
  slopes = [1.0 + 0.25 * (k % 3) for k in range(n)]
  sd.write_series(str(tmp_path / "s"), stored, pos, iop, pixel_spacing=(0.9, 1.3),
                  slopes=slopes, intercept=-1024)
  (stack,) = _stacks(tmp_path / "s")
  for shape in SHAPES:
    fast, vol = _assert_same_as_full_path(stack, shape)
  # The canonical axes of the geometry table (docs/architecture.md).
  axes = fast.affine[:3, :3] / np.linalg.norm(fast.affine[:3, :3], axis=0)
  target = np.stack(geometry.CANONICAL[geometry.plane_of(normal)], axis=1)
  assert np.all(np.sum(axes * target, axis=0) > 0.5)
  # On the stack's own grid the resize is the identity: load_volume's voxels.
  same = stream.load_resampled(stack, vol.voxels.shape)
  np.testing.assert_array_equal(same.voxels, vol.voxels)


def test_unsigned_12_bit_with_garbage_high_bits(tmp_path):
  rng = np.random.default_rng(4)
  stored = rng.integers(0, 4096, size=(6, 8, 10)).astype(np.uint16)
  noisy = stored | np.uint16(0xF000)          # overlay bits above BitsStored
  pos = sd.linear_positions([0, 0, 0], [0, 0, 2.0], 6)
  sd.write_series(str(tmp_path / "s"), noisy, pos, AXIAL, modality="MR",
                  BitsStored=12, HighBit=11)
  (stack,) = _stacks(tmp_path / "s")
  fast, vol = _assert_same_as_full_path(stack, (6, 8, 10))
  np.testing.assert_array_equal(fast.voxels, stored[::-1].astype(np.float32))


# ---------------------------------------------------------------------------
# Declined stacks: the full path decides, with its usual result or error
# ---------------------------------------------------------------------------

def test_declines_tilt_non_uniform_duplicates_and_gaps(tmp_path):
  stored = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
  cases = {
      "tilt": sd.linear_positions([0, 0, 0], [0, 0.6, 2.0], 6),
      "uneven": [np.array([0, 0, z]) for z in (0, 2, 4, 6.5, 8.5, 10.5)],
      "dup": [np.array([0, 0, z]) for z in (0, 2, 4, 4, 6, 8)],
  }
  for name, pos in cases.items():
    data = stored.copy()
    if name == "dup":
      data[3] = data[2]            # identical duplicate: dropped by load_volume
    sd.write_series(str(tmp_path / name), data, pos, AXIAL)
    (stack,) = _stacks(tmp_path / name)
    assert stream.load_resampled(stack, (3, 4, 4)) is None, name
    vol = dicom.load_volume(stack)
    assert (records.encode(convert.convert_stack(stack, (3, 4, 4))) ==
            records.encode(convert.cache_record(stack, vol, (3, 4, 4))))
  # One missing slice: filled on the full path, which the streaming path
  # leaves it to.
  hole = [np.array([0, 0, z]) for z in (0, 2, 4, 8, 10, 12)]
  sd.write_series(str(tmp_path / "hole"), stored, hole, AXIAL)
  (stack,) = _stacks(tmp_path / "hole")
  assert stream.load_resampled(stack, (3, 4, 4)) is None
  vol = dicom.load_volume(stack)
  assert vol.record["MissingSlicesInterpolated"] == 1
  assert (records.encode(convert.convert_stack(stack, (3, 4, 4))) ==
          records.encode(convert.cache_record(stack, vol, (3, 4, 4))))
  # A wide gap: scan cuts two stacks, each streamed.
  gap = [np.array([0, 0, z]) for z in (0, 2, 4, 10, 12, 14)]
  sd.write_series(str(tmp_path / "gap"), stored, gap, AXIAL)
  for stack in _stacks(tmp_path / "gap"):
    assert len(stack.files) == 3
    assert stream.load_resampled(stack, (3, 4, 4)) is not None


def test_declines_enhanced_and_big_endian(tmp_path):
  (stack,) = _stacks(_need(os.path.join(DATA_STORE, "eCT_Supplemental.dcm")),
                     min_slices=2)
  assert stack.frames is not None
  assert stream.load_resampled(stack, (2, 8, 8)) is None
  vol = dicom.load_volume(stack)
  assert (records.encode(convert.convert_stack(stack, (2, 8, 8))) ==
          records.encode(convert.cache_record(stack, vol, (2, 8, 8))))
  src = _need(os.path.join(PYDICOM_FILES, "MR_small_bigendian.dcm"))
  _series_from_file(src, str(tmp_path / "be"), vary_pixels=False)
  (stack,) = _stacks(tmp_path / "be")
  assert stream.load_resampled(stack, (2, 8, 8)) is None
  vol = dicom.load_volume(stack)
  assert (records.encode(convert.convert_stack(stack, (2, 8, 8))) ==
          records.encode(convert.cache_record(stack, vol, (2, 8, 8))))


def test_truncated_file_falls_back_to_the_usual_error(tmp_path):
  stored = np.arange(5 * 6 * 6, dtype=np.int16).reshape(5, 6, 6)
  pos = sd.linear_positions([0, 0, 0], [0, 0, 2.0], 5)
  paths = sd.write_series(str(tmp_path / "s"), stored, pos, AXIAL)
  (stack,) = _stacks(tmp_path / "s")
  with open(paths[2], "r+b") as f:      # truncated after the scan
    f.truncate(os.path.getsize(paths[2]) - 20)
  assert stream.load_resampled(stack, (2, 3, 3)) is None
  with pytest.raises(DicomError):
    convert.convert_stack(stack, (2, 3, 3))


# ---------------------------------------------------------------------------
# Memory: no full-resolution volume
# ---------------------------------------------------------------------------

def test_streaming_peak_memory_is_a_fraction_of_the_volume(tmp_path):
  n, h, w = 96, 64, 64
  stored = np.random.default_rng(5).integers(-1000, 1000, (n, h, w)).astype(np.int16)
  pos = sd.linear_positions([0, 0, 0], [0, 0, -1.0], n)
  sd.write_series(str(tmp_path / "s"), stored, pos, AXIAL, intercept=-1024,
                  shuffle=False)
  (stack,) = _stacks(tmp_path / "s")
  volume_bytes = n * h * w * 4
  tracemalloc.start()
  try:
    fast = stream.load_resampled(stack, (24, 16, 16))
    _, peak_stream = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    vol = dicom.load_volume(stack)
    _, peak_full = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert fast is not None
  assert peak_full >= volume_bytes
  assert peak_stream < 0.5 * volume_bytes, (peak_stream, volume_bytes)
  np.testing.assert_array_equal(fast.voxels, rs.resize(vol.voxels, (24, 16, 16)))


def test_convert_stack_on_a_copied_real_series(tmp_path):
  """Callers that still run load_volume + cache_record (the Beam pipeline,
  api.preprocess) get the same bytes as convert_stack."""
  root = _need(os.path.join(PYDICOM_FILES, "dicomdirtests", "98892001", "CT5N"))
  shutil.copytree(root, tmp_path / "ct")
  (stack,) = _stacks(tmp_path / "ct")
  shape = (3, 64, 64)
  a = records.encode(convert.convert_stack(stack, shape))
  b = records.encode(convert.cache_record(stack, dicom.load_volume(stack), shape))
  assert a == b
  dec = records.decode(a)
  assert dec["volume"].shape == shape and dec["volume"].dtype == np.float16
  assert dec["geometry"]["orig_shape"] == [5, 16, 16]
