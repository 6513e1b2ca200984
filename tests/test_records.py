import math

import numpy as np
import pytest

from radnet_jax import privacy
from radnet_jax.shards import records
from radnet_jax.labels import taxonomy as tx


def test_roundtrip_arrays_and_meta():
  vol = np.arange(2 * 3 * 4, dtype=np.float16).reshape(2, 3, 4)
  aff = np.diag([2.0, 0.5, 0.5, 1.0])
  rec = {"volume": vol, "affine": aff, "coverage": np.eye(9, dtype=np.float32)[3],
         "kind": "pretrain", "targets": {"sequence": 2, "spacing": float("nan")},
         "series": "abc"}
  data = records.encode(rec)
  out = records.decode(data)
  np.testing.assert_array_equal(out["volume"], vol)
  assert out["volume"].dtype == np.float16
  np.testing.assert_array_equal(out["affine"], aff)
  assert out["coverage"].argmax() == 3
  assert out["targets"]["sequence"] == 2
  assert math.isnan(records.spacing_target(out["targets"]["spacing"]))
  assert out["schema_version"] == records.SCHEMA_VERSION
  # deterministic bytes: same record, same encoding
  assert records.encode(rec) == data


def test_decode_rejects_foreign_and_newer():
  with pytest.raises(ValueError, match="not a RadNet record"):
    records.decode(b"PK\x03\x04" + b"\0" * 20)
  data = bytearray(records.encode({"x": np.zeros(2)}))
  data[4:6] = (records.SCHEMA_VERSION + 1).to_bytes(2, "little")
  with pytest.raises(ValueError, match="newer"):
    records.decode(bytes(data))


def test_taxonomy_encode_masks_unknown_and_other():
  labels = {"sequence": tx.Label("T2-FLAIR", "x"), "plane": tx.unknown(),
            "contrast": tx.Label("yes", "x"),
            "coverage": tx.Label(("liver", "kidney"), "x"),
            "spacing": tx.Label(5.0, "x")}
  t = tx.Taxonomy("paper").encode(labels)
  assert t["sequence"] == 4 and t["plane"] == -1 and t["contrast"] == 1
  assert t["coverage_mask"] == 1
  assert [b for b, v in zip(tx.COVERAGE_BANDS, t["coverage"]) if v] == ["liver", "kidney"]
  assert t["spacing"] == 5.0
  pet = {"sequence": tx.Label("PT", "x")}
  assert tx.Taxonomy("paper").encode(pet)["sequence"] == -1
  assert tx.Taxonomy("extended").encode(pet)["sequence"] == 5
  assert tx.Taxonomy("paper").encode({"sequence": tx.Label(tx.OTHER, "x")})["sequence"] == -1


def test_hash_id_salted_and_stable():
  a = privacy.hash_id("PAT-001", "s1")
  assert a == privacy.hash_id("PAT-001", "s1") and len(a) == 16
  assert a != privacy.hash_id("PAT-001", "s2")
  assert "PAT" not in a and privacy.hash_id("", "s1") == ""
  assert privacy.safe_name("T1 +C/ax: 3mm") == "T1_C_ax_3mm"


def test_load_salt_reads_but_never_creates(tmp_path, monkeypatch):
  from radnet_jax import privacy
  monkeypatch.delenv(privacy.SALT_ENV, raising=False)
  d = str(tmp_path / "shards")
  with pytest.raises(FileNotFoundError, match="no salt file"):
    privacy.load_salt(d)
  assert not (tmp_path / "shards").exists()          # nothing was written
  made = privacy.load_or_create_salt(d)               # the converter's call
  assert len(made) == 32 and privacy.load_salt(d) == made
  assert privacy.load_salt(d, "explicit") == "explicit"
  monkeypatch.setenv(privacy.SALT_ENV, "from-env")
  assert privacy.load_salt(d) == "from-env"
