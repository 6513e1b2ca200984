"""Reading one DICOM file (plain or gzipped) with clear failure reasons."""
from __future__ import annotations

import gzip
import io
import os

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pydicom is imported on the first read (its import is slow)
  from pydicom.dataset import Dataset

from radnet_jax.dicom.errors import DicomError

DICOMDIR_SOP = "1.2.840.10008.1.3.10"


def read_dataset(path: str, *, stop_before_pixels: bool) -> Dataset:
  """Reads ``path`` (``.gz`` allowed); raises DicomError naming the reason.

  Files without the 128-byte preamble / ``DICM`` prefix are accepted only if,
  read leniently, they look like a DICOM image or object (they carry a
  SOPClassUID or a Modality); anything else is "not a DICOM file".
  """
  import pydicom  # pylint: disable=import-outside-toplevel
  from pydicom.errors import InvalidDicomError  # pylint: disable=import-outside-toplevel
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        fp = io.BytesIO(f.read())
    else:
      fp = open(path, "rb")
  except (OSError, EOFError) as e:
    raise DicomError(path, f"unreadable file ({type(e).__name__}: {e})") from e
  try:
    try:
      ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
      fp.seek(0)
      try:
        ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels,
                             force=True)
        if "SOPClassUID" not in ds and "Modality" not in ds:
          raise DicomError(path, "not a DICOM file")
      except DicomError:
        raise
      except Exception as e:
        raise DicomError(path, "not a DICOM file") from e
    except (EOFError, OSError, ValueError, TypeError, KeyError,
            AttributeError, IndexError, NotImplementedError) as e:
      raise DicomError(path, f"corrupt or truncated header "
                             f"({type(e).__name__}: {e})") from e
    if stop_before_pixels:
      # Remember where the pixel data element starts (truncation check).
      ds._radnet_pixel_offset = fp.tell()  # pylint: disable=protected-access
      try:
        fp.seek(0, os.SEEK_END)
        ds._radnet_file_size = fp.tell()  # pylint: disable=protected-access
      except (OSError, ValueError):
        pass
    return ds
  finally:
    fp.close()


def is_dicomdir(ds: Dataset) -> bool:
  meta = getattr(ds, "file_meta", None)
  sop = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
  return sop == DICOMDIR_SOP or "DirectoryRecordSequence" in ds
