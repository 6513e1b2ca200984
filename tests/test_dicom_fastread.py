"""fastread: the struct header reader agrees with pydicom wherever it answers."""
import dataclasses
import importlib
import os

import numpy as np
import pydicom
import pytest

from radnet_jax import dicom
from radnet_jax.dicom import fastread
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
    for keyword in fastread._TAGS:  # pylint: disable=protected-access
      assert (keyword in header) == (keyword in ds), (path, keyword)
      try:
        value = header.get(keyword)
      except fastread.Unsupported:
        continue
      expected = ds.get(keyword)
      if isinstance(expected, pydicom.multival.MultiValue):
        assert isinstance(value, list) and value == list(expected), (path, keyword)
      else:
        assert value == expected and isinstance(expected, type(value)), (
            path, keyword, value, expected)
      answered += 1
  assert answered > 500  # the fast path really answers on these files


def test_scan_entries_fast_equal_pydicom_per_file():
  fast_files = 0
  for path in _all_files():
    slow = scan_mod._entries(path, read_dataset(path, stop_before_pixels=True),  # pylint: disable=protected-access
                             SALT, None) if _pydicom_ok(path) else None
    header = fastread.read_header(path)
    if header is None or slow is None:
      continue
    try:
      fast = scan_mod._entries(path, header, SALT, None)  # pylint: disable=protected-access
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
