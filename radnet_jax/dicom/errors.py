"""The one exception type of DICOM ingestion."""
from __future__ import annotations


class DicomError(Exception):
  """A file, series or stack that cannot become a volume, and why.

  ``where`` is a file path or a salted series/stack hash (never a raw UID);
  ``reason`` is a short human-readable cause (written to errors.csv).
  """

  def __init__(self, where: str, reason: str):
    super().__init__(f"{where}: {reason}")
    self.where = str(where)
    self.reason = str(reason)
