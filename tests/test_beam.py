"""The Beam pipeline writes exactly the records of the local converter.

Phantom corpus (8 series, tiny shape) converted twice: by
``build.build_shards`` (multiprocessing path, one worker) and by
``beam_pipeline`` on the DirectRunner, in both input modes (driver scan +
distributed stacks; workers scanning patient folders). Same salt -> the same
set of record bytes per split, the same labels.csv and errors.csv, and a
manifest that ``input_pipeline`` reads the same way.
"""
import hashlib
import json
import os

import pytest

beam = pytest.importorskip(
    "apache_beam", reason="apache_beam not installed (pip install -r requirements-beam.txt)")

from array_record.python.array_record_module import ArrayRecordReader  # noqa: E402

from radnet_jax import phantom, privacy
from radnet_jax.shards import beam as beam_pipeline
from radnet_jax.shards import build
from radnet_jax.shards import convert
from radnet_jax.shards import records  # noqa: E402

SALT = "beam-test-salt"
SHAPE = (4, 16, 16)


def _record_sets(out_dir: str) -> dict[str, list[str]]:
  out = {}
  for split in convert.SPLITS:
    digests = []
    for path in convert.shard_paths(out_dir, split):
      reader = ArrayRecordReader(path)
      try:
        digests += [hashlib.sha256(b).hexdigest() for b in reader.read_all()]
      finally:
        reader.close()
    out[split] = sorted(digests)
  return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("phantom"))
  phantom.make_corpus(root, n=8, seed=5, small=True, workers=1, progress=False,
                      noise=phantom.HeaderNoise.off())
  dicom_dir = os.path.join(root, "dicom")
  # One unreadable file, so that both converters must report the same error.
  with open(os.path.join(dicom_dir, "broken.dcm"), "wb") as f:
    f.write(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
  local = str(tmp_path_factory.mktemp("local"))
  build.build_shards(dicom_dir, local, shape=SHAPE, workers=1, salt=SALT,
                       records_per_shard=3, split=(0.5, 0.25, 0.25),
                       priors="builtin", progress=False)
  return dicom_dir, local


@pytest.mark.parametrize("mode", ["stacks", "units"])
def test_beam_matches_local_converter(corpus, tmp_path, mode):
  dicom_dir, local = corpus
  out = str(tmp_path / "beam")
  beam_pipeline.run(dicom_dir, out, shape=SHAPE, salt=SALT, records_per_shard=3,
                    split=(0.5, 0.25, 0.25), priors="builtin", mode=mode,
                    scan_depth=1, pipeline_args=["--runner=DirectRunner"])
  a, b = _record_sets(out), _record_sets(local)
  assert sum(len(v) for v in b.values()) >= 6
  assert a == b
  with open(os.path.join(out, "labels.csv")) as f1, \
       open(os.path.join(local, "labels.csv")) as f2:
    assert f1.read() == f2.read()
  ma, ml = convert.read_manifest(out), convert.read_manifest(local)
  assert ma["num_records"] == ml["num_records"]
  assert ma["counts"] == ml["counts"]
  assert ma["config"].pop("engine") == "apache_beam"
  assert ma["config"] == ml["config"]
  # Shard counts and names follow the same rule (ceil(n / records_per_shard)).
  assert ({s: [x["file"] for x in ma["shards"][s]] for s in convert.SPLITS}
          == {s: [x["file"] for x in ml["shards"][s]] for s in convert.SPLITS})
  rec = next(convert.iter_records(out, "train"))
  assert rec["kind"] == "pretrain" and rec["volume"].shape == SHAPE
  assert rec["split"] == "train" and len(rec["series"]) == 16
  errors = open(os.path.join(out, "errors.csv")).read()
  local_errors = open(os.path.join(local, "errors.csv")).read()
  # Paths are salted hashes in both (the default); the broken file's is the
  # hash of its relative path.
  assert privacy.hash_id("broken.dcm", SALT) in local_errors
  assert "broken.dcm" not in local_errors
  if mode == "stacks":
    assert errors == local_errors
  # Units mode scans patient folders, so the loose root-level file is out of
  # any unit; the rest is the same hashed rows.
  assert os.path.dirname(dicom_dir) not in errors


def test_cli_and_stale_shards(corpus, tmp_path):
  from data_prep import beam_build_shards
  dicom_dir, local = corpus
  out = tmp_path / "cli"
  out.mkdir()
  (out / "train-00007-of-00009.array_record").write_bytes(b"stale")
  rc = beam_build_shards.main(["--input", dicom_dir, "--out", str(out), "--shape", "4,16,16",
                               "--salt", SALT, "--records-per-shard", "100", "--split",
                               "0.5,0.25,0.25", "--", "--runner=DirectRunner"])
  assert rc == 0
  assert not (out / "train-00007-of-00009.array_record").exists()
  assert _record_sets(str(out)) == _record_sets(local)
  manifest = json.loads((out / "manifest.json").read_text())
  assert all(len(v) <= 1 for v in manifest["shards"].values())


def test_units_and_shard_helpers(corpus, tmp_path, monkeypatch):
  dicom_dir, _ = corpus
  units = beam_pipeline.list_units(dicom_dir, 1)
  assert units and all(os.path.dirname(u) == dicom_dir for u in units)
  assert beam_pipeline.list_units(dicom_dir, 0) == [dicom_dir]
  # Copying a unit through Beam's filesystem layer keeps the tree.
  dest = str(tmp_path / "copy")
  beam_pipeline._localise(units[0], dest)
  n_src = sum(len(f) for _, _, f in os.walk(units[0]))
  assert n_src > 0 and sum(len(f) for _, _, f in os.walk(dest)) == n_src
  assert {beam_pipeline.shard_of(f"k{i}", 4) for i in range(64)} == {0, 1, 2, 3}
  assert beam_pipeline.shard_of("abc", 7) == beam_pipeline.shard_of("abc", 7)
  assert beam_pipeline.is_remote("gs://b/x") and not beam_pipeline.is_remote("/x")
  monkeypatch.delenv("RADNET_SALT", raising=False)
  with pytest.raises(ValueError, match="RADNET_SALT"):
    beam_pipeline.run(dicom_dir, "gs://bucket/out", salt=None)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    beam_pipeline.run(str(tmp_path / "nope"), str(tmp_path / "o"), salt=SALT)
  assert records.SCHEMA_VERSION >= 1


def test_beam_and_local_converter_stream_classic_stacks(corpus, tmp_path, stack_loads):
  # Both engines decode classic stacks straight onto the shard grid
  # (dicom.stream.load_resampled); the full-resolution path (load_volume) is
  # never needed for the phantom's classic CT / MR stacks.
  dicom_dir, _ = corpus
  beam_pipeline.run(dicom_dir, str(tmp_path / "beam"), shape=SHAPE, salt=SALT,
                    records_per_shard=3, split=(0.5, 0.25, 0.25), priors="builtin",
                    mode="stacks", scan_depth=1,
                    pipeline_args=["--runner=DirectRunner"])
  n_beam = sum(convert.read_manifest(str(tmp_path / "beam"))["num_records"].values())
  assert n_beam >= 6 and stack_loads == {"resampled": n_beam, "full": 0}
  stack_loads.update(resampled=0, full=0)
  build.build_shards(dicom_dir, str(tmp_path / "local"), shape=SHAPE, workers=1,
                       salt=SALT, split=(0.5, 0.25, 0.25), priors="builtin",
                       progress=False)
  assert stack_loads == {"resampled": n_beam, "full": 0}
