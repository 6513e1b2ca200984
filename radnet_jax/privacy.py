"""PHI-safe identifiers: salted hashes of DICOM identifiers.

Nothing that leaves ingestion (records, manifests, reports, logs, file names)
carries a raw PatientID, UID, name or date. Identifiers are replaced with
``hash_id(value, salt)``: the first 16 hex characters of HMAC-SHA256 keyed by a
per-corpus salt. The salt is a secret the user keeps (``<out>/.salt``); without
it the hashes cannot be reversed by guessing medical record numbers.
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import os
import re
import secrets

SALT_ENV = "RADNET_SALT"
SALT_FILE = ".salt"
# A created salt is 16 random bytes as 32 hex characters, written whole or
# not at all. A salt file with fewer than MIN_SALT_CHARS characters (empty
# after a full disk, cut short) is refused: hashes keyed by a short salt can
# be recomputed by anyone from known UIDs or MRNs.
SALT_CHARS = 32
MIN_SALT_CHARS = 16
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
  path = os.path.join(shards_dir, SALT_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path}: no salt file, so the series hashes in these shards cannot be "
        f"reproduced; pass the conversion's salt or set ${SALT_ENV}")
  return read_salt_file(path)


def read_salt_file(path: str) -> str:
  """The salt in ``path``; ValueError naming the file if it is empty or short."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    salt = raw.decode("ascii").strip()
  except UnicodeDecodeError:
    salt = ""
  if len(salt) < MIN_SALT_CHARS:
    raise ValueError(
        f"{path}: salt file has {len(salt)} usable characters, fewer than "
        f"{MIN_SALT_CHARS} (empty or cut short, e.g. by a full disk; this code "
        f"writes {SALT_CHARS}); refusing to hash with it. Restore the original .salt (the "
        f"hashes of existing outputs depend on it), or delete it to start a new "
        f"corpus, or pass the salt explicitly / set ${SALT_ENV}")
  return salt


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
  new = secrets.token_hex(SALT_CHARS // 2)
  path = os.path.join(out_dir, SALT_FILE)
  # Whole or not at all: a temporary file, flushed to disk, then linked to
  # its name; a full disk raises here and leaves no .salt behind.
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
      data = new.encode()
      if os.write(fd, data) != len(data):
        raise OSError(errno.ENOSPC, "short write of the salt", tmp)
      os.fsync(fd)
    finally:
      os.close(fd)
    try:
      os.link(tmp, path)   # never replaces a salt another process just wrote
    except FileExistsError:
      pass
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return read_salt_file(path)


# Free text kept for labelling can carry PHI ("CT study of SIMPSON^HOMER^J^",
# an MRN typed into the protocol name). Before such text is stored anywhere
# it goes through scrub_text with the identifying values of its own header.
_PN_TOKEN = re.compile(r"\S*\^\S*")                  # DICOM PN: FAMILY^GIVEN^...
_DATE = re.compile(r"(?<!\d)(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|"
                   r"\d{1,2}[-./]\d{1,2}[-./]\d{2,4})(?!\d)")
_DIGIT_RUN = re.compile(r"\d{6,}")                    # MRNs, accession numbers, dates
_SPACES = re.compile(r"\s{2,}")


def identifier_tokens(values: object) -> set[str]:
  """The tokens to remove from free text, from identifying header values
  (names, IDs, accession numbers, dates, institutions): each value whole, and
  each name component (split at ``^``, ``,``, spaces) of 2+ characters."""
  out: set[str] = set()
  stack = [values]
  while stack:
    v = stack.pop()
    if v is None:
      continue
    if isinstance(v, (list, tuple, set, frozenset)):
      stack.extend(v)
      continue
    text = str(v).strip()
    if not text:
      continue
    out.add(text)
    for part in re.split(r"[\^,=\s]+", text):
      part = part.strip(".")
      if len(part) >= 2:
        out.add(part)
  return out


def scrub_text(text: str, identifiers: object = ()) -> str:
  """``text`` without identifying content: every ``identifier_tokens`` value
  (case-insensitive, not inside a longer word), PN-formatted strings (any
  token with ``^``), dates and runs of 6+ digits. Clean text is unchanged."""
  out = str(text)
  tokens = identifiers if isinstance(identifiers, set) else identifier_tokens(identifiers)
  for tok in sorted(tokens, key=len, reverse=True):
    out = re.sub(rf"(?<![A-Za-z0-9]){re.escape(tok)}(?![A-Za-z0-9])", "", out,
                 flags=re.IGNORECASE)
  out = _PN_TOKEN.sub("", out)
  out = _DATE.sub("", out)
  out = _DIGIT_RUN.sub("", out)
  return text if out == text else _SPACES.sub(" ", out).strip()


def safe_name(text: str, max_len: int = 64) -> str:
  """Sanitises free text for use in a file name (never pass raw tag values)."""
  cleaned = _SAFE.sub("_", str(text)).strip("._")
  return (cleaned or "x")[:max_len]
