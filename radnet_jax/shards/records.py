"""Shard record schema: one ArrayRecord record = one volume with its labels.

Binary layout (schema version 1), little-endian::

    b"RDNT" | u16 schema_version | u32 header_len | header (UTF-8 JSON) | payload

The JSON header is ``{"meta": {...}, "arrays": {name: [dtype, shape, offset,
nbytes]}}``; array bytes follow in the payload at 64-byte aligned offsets, so
decoding is zero-copy (``np.frombuffer``). ``decode`` returns one flat dict:
the meta keys plus one numpy array per array name.

Pretraining records (``kind == "pretrain"``):

=================  ==========================================================
key                 content
=================  ==========================================================
volume              float16 ``(D, H, W)``, intensity-normalised (see
                    ``normalisation``), canonical orientation, resampled to the
                    shard shape
affine              float64 ``(4, 4)``: voxel index (d, h, w, 1) -> LPS mm of
                    the *resampled* grid
coverage            float32 ``(9,)`` multi-hot over ``COVERAGE_BANDS``
targets             {"sequence": int, "plane": int, "contrast": int,
                    "coverage_mask": 0|1, "spacing": float mm or NaN};
                    -1 = unknown (masked out of the loss)
labels              {task: text value} as in the label report
provenance          {task: rule that fired}
taxonomy            "paper" | "extended"
series, study,      salted hashes (never raw UIDs or IDs)
patient, stack
split               "train" | "val" | "test" (by hashed patient)
modality            "CT", "MR", "PT", ...
geometry            {"orig_shape": [D,H,W], "orig_spacing": [mm,mm,mm],
                    "orig_affine": 4x4 list, "spacing": [mm,mm,mm]}
normalisation       "ct_window(-1000,1000)->[-1,1]" (CT, HU clipped) or
                    "pct(0.5,99.5)->[0,1]" (MR, PET, other: robust
                    percentiles); see ``radnet_jax.resample``
metadata            the PHI-free DICOM metadata record the labels were
                    computed from (keyword -> str/int/float/list), so shards
                    can be re-labelled without the DICOM files
=================  ==========================================================

Pretraining shards are written by ``radnet_jax.shards.build.build_shards``
(``{split}-{index:05d}-of-{count:05d}.array_record``, ``group_size:1``) with a
``manifest.json`` listing them; ``convert.shard_paths(out_dir, split)``.
Every reader of a shards folder's ``manifest.json`` (pretraining or
segmentation) goes through ``read_manifest``.

Segmentation records (``kind == "segmentation"``): ``volume`` float16
``(D, H, W)``, ``mask`` uint8 ``(D, H, W)`` (0 background, 1 liver, 2 tumour),
``affine`` float64 ``(4, 4)``, plus ``case``, ``split``, ``geometry``,
``normalisation``.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping

import numpy as np
from etils import epath

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MAGIC = b"RDNT"
_HEAD = struct.Struct("<4sHI")
_ALIGN = 64


def _jsonable(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, float) and obj != obj:  # NaN -> null keeps JSON standard
    return None
  return obj


def encode(record: Mapping[str, Any]) -> bytes:
  """Serialises a record: numpy arrays go to the payload, the rest to JSON."""
  arrays = {k: np.ascontiguousarray(v) for k, v in record.items()
            if isinstance(v, np.ndarray)}
  meta = {k: v for k, v in record.items() if not isinstance(v, np.ndarray)}
  meta.setdefault("schema_version", SCHEMA_VERSION)
  layout, chunks, offset = {}, [], 0
  for name in sorted(arrays):
    arr = arrays[name]
    if arr.dtype.byteorder == ">":
      arr = arr.astype(arr.dtype.newbyteorder("<"))
    pad = (-offset) % _ALIGN
    if pad:
      chunks.append(b"\0" * pad)
      offset += pad
    data = arr.tobytes()
    layout[name] = [arr.dtype.str, list(arr.shape), offset, len(data)]
    chunks.append(data)
    offset += len(data)
  header = json.dumps({"meta": _jsonable(meta), "arrays": layout},
                      sort_keys=True, allow_nan=False).encode()
  # Pad the header so that the payload starts 64-byte aligned in the record.
  pad = (-(_HEAD.size + len(header))) % _ALIGN
  header += b" " * pad
  return _HEAD.pack(MAGIC, SCHEMA_VERSION, len(header)) + header + b"".join(chunks)


def decode(data: bytes) -> dict:
  """Inverse of ``encode``; raises ValueError on a foreign or newer record."""
  if len(data) < _HEAD.size:
    raise ValueError("record too short to be a RadNet record")
  magic, version, hlen = _HEAD.unpack_from(data, 0)
  if magic != MAGIC:
    raise ValueError(f"not a RadNet record (magic {magic!r})")
  if version > SCHEMA_VERSION:
    raise ValueError(f"record schema v{version} is newer than this code "
                     f"(v{SCHEMA_VERSION}); upgrade radnet_jax")
  header = json.loads(data[_HEAD.size:_HEAD.size + hlen])
  base = _HEAD.size + hlen
  out = dict(header["meta"])
  buf = memoryview(data)
  for name, (dtype, shape, offset, nbytes) in header["arrays"].items():
    out[name] = np.frombuffer(buf[base + offset:base + offset + nbytes],
                              dtype=np.dtype(dtype)).reshape(shape)
  return out


def read_meta(path: str) -> dict:
  """The JSON meta of an encoded record file, without reading its arrays."""
  with open(path, "rb") as f:
    raw = f.read(_HEAD.size)
    if len(raw) < _HEAD.size:
      raise ValueError(f"{os.path.basename(path)}: too short to be a RadNet record")
    magic, _, hlen = _HEAD.unpack(raw)
    if magic != MAGIC:
      raise ValueError(f"{os.path.basename(path)}: not a RadNet record")
    return json.loads(f.read(hlen))["meta"]


def spacing_target(value: Any) -> float:
  """JSON null (written for NaN) back to NaN."""
  return float("nan") if value is None else float(value)


def read_manifest(shards_dir: str, kind: str | None = None) -> dict:
  """The ``manifest.json`` of a shards folder (local or any ``epath`` location).

  kind: "pretrain" or "segmentation" to check which converter wrote it.
  Raises FileNotFoundError (no manifest) or ValueError (not JSON, or another
  kind), naming the file.
  """
  path = epath.Path(shards_dir) / MANIFEST
  if not path.exists():
    raise FileNotFoundError(f"{path}: no manifest (build the shards first: python -m "
                            f"data_prep.build_shards, or data_prep.build_seg_shards)")
  try:
    manifest = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  # Manifests written before "kind" existed are pretraining manifests.
  found = manifest.get("kind", "pretrain")
  if kind is not None and found != kind:
    raise ValueError(f"{path}: a {found!r} manifest, expected {kind!r}")
  return manifest


def has_manifest(shards_dir: str) -> bool:
  """Whether ``shards_dir`` holds a complete conversion (its manifest)."""
  return (epath.Path(shards_dir) / MANIFEST).exists()
