"""fastread: the struct header reader agrees with pydicom wherever it answers."""
import dataclasses
import importlib
import os

import numpy as np
import pydicom
import pytest

from radnet_jax import dicom
from radnet_jax.dicom import entries as entries_mod, fastread
from radnet_jax.dicom.reader import read_dataset
from tests.data import synth_dicom as sd

scan_mod = importlib.import_module("radnet_jax.dicom.scan")
volume_mod = importlib.import_module("radnet_jax.dicom.volume")

SALT = "test-salt"
PYDICOM_FILES = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
DATA_STORE = os.path.join(os.path.dirname(os.path.dirname(pydicom.__file__)),
                          "data_store", "data")


def _all_files():
  files = []
  for root in (PYDICOM_FILES, DATA_STORE):
    if os.path.isdir(root):
      files.extend(scan_mod.iter_files(root))
  return files


def _comparable(res):
  if isinstance(res, dicom.Skipped):
    return res
  out = []
  for e in res:
    d = dataclasses.asdict(e)
    d["iop"], d["position"] = d["iop"].tolist(), d["position"].tolist()
    out.append(d)
  return out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_header_values_equal_pydicom_on_every_test_file():
  answered = 0
  for path in _all_files():
    try:
      header = fastread.read_header(path)
    except OSError:
      continue
    if header is None:
      continue
    ds = read_dataset(path, stop_before_pixels=True)
    assert header._radnet_pixel_offset == ds._radnet_pixel_offset, path
    assert header._radnet_file_size == ds._radnet_file_size, path
    for key in ("TransferSyntaxUID", "MediaStorageSOPClassUID"):
      assert header.file_meta.get(key) == ds.file_meta.get(key), path
    syntax = header.file_meta["TransferSyntaxUID"]
    assert syntax.is_compressed == ds.file_meta.TransferSyntaxUID.is_compressed, path
    for keyword in fastread._TAGS:  # pylint: disable=protected-access
      assert (keyword in header) == (keyword in ds), (path, keyword)
      try:
        value = header.get(keyword)
      except fastread.Unsupported:
        continue
      expected = ds.get(keyword)
      if isinstance(expected, pydicom.multival.MultiValue):
        assert isinstance(value, list) and value == list(expected), (path, keyword)
      elif isinstance(expected, pydicom.uid.UID):
        # fastread's own UID (no pydicom import): the same string and the
        # property the callers use.
        assert isinstance(value, fastread.UID) and value == expected, (path, keyword)
      elif isinstance(expected, pydicom.valuerep.PersonName):
        assert isinstance(value, str) and value == str(expected), (path, keyword)
      else:
        assert value == expected and isinstance(expected, type(value)), (
            path, keyword, value, expected)
      answered += 1
  assert answered > 500  # the fast path really answers on these files


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_scan_entries_fast_equal_pydicom_per_file():
  fast_files = 0
  for path in _all_files():
    slow = entries_mod._entries(path, read_dataset(path, stop_before_pixels=True),  # pylint: disable=protected-access
                                SALT, None) if _pydicom_ok(path) else None
    header = fastread.read_header(path)
    if header is None or slow is None:
      continue
    try:
      fast = entries_mod._entries(path, header, SALT, None)  # pylint: disable=protected-access
    except Exception:  # pylint: disable=broad-except
      continue  # falls back to pydicom in read_entries
    fast_files += 1
    assert _comparable(fast) == _comparable(slow), path
  assert fast_files > 50


def _pydicom_ok(path):
  try:
    read_dataset(path, stop_before_pixels=True)
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def _no_fastread(monkeypatch):
  monkeypatch.setattr(fastread, "read_header", lambda path: None)


def _scan_load(root, monkeypatch=None):
  res = dicom.scan(root, salt=SALT)
  vols = [dicom.load_volume(st) for st in res.stacks]
  return res, vols


@pytest.mark.parametrize("variant", [
    dict(bits=16, stored=16, signed=True, slope=1.0, intercept=-1024.0),
    dict(bits=16, stored=12, signed=True, slope=1.0, intercept=0.0),
    dict(bits=16, stored=12, signed=False, slope=2.5, intercept=-7.0),
    dict(bits=16, stored=16, signed=False, slope=0.5, intercept=0.0),
    dict(bits=8, stored=8, signed=False, slope=1.0, intercept=0.0),
    dict(bits=16, stored=16, signed=True, slope=1.0, intercept=0.0,
         implicit=True, plane="SAG"),
    dict(bits=16, stored=16, signed=True, slope=1.0, intercept=5.0,
         plane="COR", diffusion=True),
])
def test_scan_and_load_fast_equal_pydicom_paths(tmp_path, monkeypatch, variant):
  rng = np.random.default_rng(0)
  n, h, w = 5, 6, 7
  hi = (1 << variant["stored"]) - 1
  stored = rng.integers(0, hi + 1, (n, h, w))
  if variant["signed"]:
    stored = stored - (hi + 1) // 2
  iop = sd.oblique_iop(variant.get("plane", "AX"), 10.0)
  normal = np.cross(iop[:3], iop[3:])
  pos = sd.linear_positions([-3.0, 4.0, 10.0], 1.5 * normal, n)
  paths = sd.write_series(str(tmp_path), stored.astype(np.int32), pos, iop,
                          intercept=variant["intercept"],
                          slopes=[variant["slope"]] * n,
                          modality="MR" if variant.get("diffusion") else "CT")
  for path in paths:  # rewrite with the variant's pixel encoding
    ds = pydicom.dcmread(path)
    dtype = f"{'i' if variant['signed'] else 'u'}{variant['bits'] // 8}"
    k = paths.index(path)
    raw = stored[k].astype(dtype)
    if variant["stored"] < variant["bits"] and variant["signed"]:
      raw = raw.view(np.uint16) & ((1 << variant["stored"]) - 1)  # 12-bit two's complement
      raw = raw | np.uint16(0xF000 * (k % 2))     # garbage in the unused bits
    ds.BitsAllocated, ds.BitsStored = variant["bits"], variant["stored"]
    ds.HighBit = variant["stored"] - 1
    ds.PixelRepresentation = int(variant["signed"])
    ds.PixelData = raw.tobytes()
    if variant.get("diffusion"):
      ds.DiffusionBValue = 1000.0
    if variant.get("implicit"):
      ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.save_as(path, implicit_vr=bool(variant.get("implicit")),
               little_endian=True)
  if not variant.get("diffusion"):
    assert fastread.read_header(paths[0]) is not None
  res_fast, vols_fast = _scan_load(str(tmp_path))
  _no_fastread(monkeypatch)
  res_slow, vols_slow = _scan_load(str(tmp_path))
  assert [s.key for s in res_fast.stacks] == [s.key for s in res_slow.stacks]
  assert [s.files for s in res_fast.stacks] == [s.files for s in res_slow.stacks]
  assert [s.record for s in res_fast.stacks] == [s.record for s in res_slow.stacks]
  assert res_fast.skipped == res_slow.skipped
  assert len(vols_fast) == 1, res_fast.skipped
  for a, b in zip(vols_fast, vols_slow):
    assert a.voxels.dtype == np.float32 and a.voxels.shape == b.voxels.shape
    np.testing.assert_array_equal(a.voxels, b.voxels)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert a.record == b.record
  # Known values: HU = stored * slope + intercept (AX: superior slice first).
  if variant.get("plane", "AX") == "AX" and variant["stored"] == variant["bits"]:
    ref = stored[::-1].astype(np.float32) * np.float32(variant["slope"]) + \
        np.float32(variant["intercept"])
    np.testing.assert_array_equal(vols_fast[0].voxels, ref)


def test_fast_reader_declines_what_it_does_not_handle(tmp_path):
  ds = sd.make_slice(np.zeros((4, 4), np.int16), [0, 0, 0], [1, 0, 0, 0, 1, 0],
                     [1, 1], series_uid="1.2.3", study_uid="1.2.4")
  plain = str(tmp_path / "plain.dcm")
  ds.save_as(plain, enforce_file_format=True)
  h = fastread.read_header(plain)
  assert h is not None and h.Rows == 4 and h.get("ImagePositionPatient") == [0, 0, 0]
  assert h.pixel_length == 32
  # No preamble, big endian and a truncated header: pydicom's business.
  raw = open(plain, "rb").read()
  (tmp_path / "nopre.dcm").write_bytes(raw[132:])
  assert fastread.read_header(str(tmp_path / "nopre.dcm")) is None
  (tmp_path / "cut.dcm").write_bytes(raw[:300])
  assert fastread.read_header(str(tmp_path / "cut.dcm")) is None
  ds.RescaleSlope = ""  # empty value: not answered
  ds.save_as(plain, enforce_file_format=True)
  with pytest.raises(fastread.Unsupported):
    fastread.read_header(plain).get("RescaleSlope")


def _fast_headers(files):
  """(path, fastread header) of every file the fast reader opens."""
  for path in files:
    try:
      header = fastread.read_header(path)
    except OSError:
      continue
    if header is not None:
      yield path, header


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_record_from_header_equals_record_from_dataset(tmp_path):
  # The metadata record built from a fastread header (no pydicom) is the one
  # pydicom's dataset gives, on every test file where the fast path answers;
  # the phantom's anonymised and tilted CTs and a small phantom corpus with
  # header noise (ISO_IR 100, vendor tags) are among them.
  from radnet_jax import phantom
  from radnet_jax.dicom import metadata
  from radnet_jax.phantom import geometry_layouts
  geometry_layouts.make_geometry_layouts(str(tmp_path / "geo"), rows=8, cols=8)
  phantom.make_corpus(str(tmp_path / "corpus"), n=2, seed=3, workers=1, small=True,
                      progress=False)
  files = _all_files() + list(scan_mod.iter_files(str(tmp_path)))
  answered = 0
  for path, header in _fast_headers(files):
    try:
      fast = metadata.record_from_header(header, SALT)
    except fastread.Unsupported:
      continue
    ds = read_dataset(path, stop_before_pixels=True)
    assert fast == metadata.record_from_dataset(ds, SALT), path
    answered += 1
  assert answered > 100


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_identifying_values_equal_pydicom_without_pydicom(tmp_path):
  # The PHI scrubber's tokens (names, IDs, dates, institutions) from a
  # fastread header equal those from pydicom's full header, on every test
  # file, on a phantom corpus with header noise and on deid-data's files with
  # realistic fake PHI; the fast path answers for most of them (explicit VR,
  # ASCII), so build_shards need not import pydicom to scrub.
  from radnet_jax import phantom
  from radnet_jax.dicom import metadata
  from pydicom.datadict import tag_for_keyword
  assert set(fastread.IDENTIFYING_TAGS) == set(metadata._IDENTIFYING_KEYS)  # pylint: disable=protected-access
  assert all(tag_for_keyword(k) == t for k, t in fastread.IDENTIFYING_TAGS.items())
  phantom.make_corpus(str(tmp_path / "corpus"), n=2, seed=3, workers=1, small=True,
                      progress=False)
  files = _all_files() + list(scan_mod.iter_files(str(tmp_path)))
  try:
    import deid_data
    files += list(scan_mod.iter_files(os.path.join(os.path.dirname(deid_data.__file__), "data")))
  except ImportError:
    pass
  fast, nonempty = 0, 0
  for path, header in _fast_headers(files):
    try:
      tokens = metadata.identifier_tokens(header.identifying_values())
    except fastread.Unsupported:
      continue
    ds = read_dataset(path, stop_before_pixels=True)
    assert tokens == metadata._identifying_values(ds), path  # pylint: disable=protected-access
    fast += 1
    nonempty += bool(tokens)
  assert fast > 100 and nonempty > 50
