"""PHI-safe identifiers: salted hashes of DICOM identifiers.

Nothing that leaves ingestion (records, manifests, reports, logs, file names)
carries a raw PatientID, UID, name or date. Identifiers are replaced with
``hash_id(value, salt)``: the first 16 hex characters of HMAC-SHA256 keyed by a
per-corpus salt. The salt is a secret the user keeps (``<out>/.salt``); without
it the hashes cannot be reversed by guessing medical record numbers.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets

SALT_ENV = "RADNET_SALT"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def hash_id(value: object, salt: str) -> str:
  """Salted 64-bit hash (16 hex chars) of an identifier; '' for missing values."""
  if value is None:
    return ""
  text = str(value).strip()
  if not text:
    return ""
  return hmac.new(salt.encode(), text.encode(), hashlib.sha256).hexdigest()[:16]


def load_salt(shards_dir: str, salt: str | None = None) -> str:
  """The salt existing shards were written with: explicit > $RADNET_SALT >
  ``shards_dir/.salt``. For readers that join on hashes (never creates one:
  a new salt would silently match nothing); FileNotFoundError if absent."""
  if salt:
    return salt
  if os.environ.get(SALT_ENV):
    return os.environ[SALT_ENV]
  path = os.path.join(shards_dir, ".salt")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path}: no salt file, so the series hashes in these shards cannot be "
        f"reproduced; pass the conversion's salt or set ${SALT_ENV}")
  with open(path) as f:
    return f.read().strip()


def load_or_create_salt(out_dir: str, salt: str | None = None) -> str:
  """Returns the corpus salt: explicit > $RADNET_SALT > ``out_dir/.salt`` > new.

  A new salt is written to ``out_dir/.salt`` so that a resumed or repeated
  conversion of the same input produces identical hashes (and shards).
  """
  try:
    return load_salt(out_dir, salt)
  except FileNotFoundError:
    pass
  os.makedirs(out_dir, exist_ok=True)
  new = secrets.token_hex(16)
  with open(os.path.join(out_dir, ".salt"), "w") as f:
    f.write(new)
  return new


def safe_name(text: str, max_len: int = 64) -> str:
  """Sanitises free text for use in a file name (never pass raw tag values)."""
  cleaned = _SAFE.sub("_", str(text)).strip("._")
  return (cleaned or "x")[:max_len]
