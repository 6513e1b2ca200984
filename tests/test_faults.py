"""Fault suite (issue 16): what the converter and ``predict`` do when things break.

Each case is reproduced on a tiny phantom corpus (3 patients, 40x40 slices)
and the fixed behaviour asserted: the conversion finishes, names the broken
file and its reason and keeps every good series; environment errors stop the
run without a row in errors.csv and a rerun resumes to identical shards; an
empty salt is refused; no identifying value of the inputs reaches any output.
"""
import collections
import csv
import errno
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from radnet_jax import api, phantom, privacy
from radnet_jax.dicom import isolation
from radnet_jax.dicom import metadata as dmeta
from radnet_jax.shards import build
from radnet_jax.shards import convert
from radnet_jax.shards import labelling
from radnet_jax.shards import records

SALT = "faults-test-salt-0123456789abcdef"
SHAPE = (4, 16, 16)
scan_mod = sys.modules["radnet_jax.dicom.scan"]   # radnet_jax.dicom.scan is the function


@pytest.fixture(scope="module")
def corpus_src(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("faults_corpus"))
  phantom.make_corpus(root, n=3, seed=3, small=True, workers=1, progress=False,
                      noise=phantom.HeaderNoise.off())
  return os.path.join(root, "dicom")


@pytest.fixture
def corpus(corpus_src, tmp_path):
  """A fresh copy of the phantom DICOM tree."""
  dst = str(tmp_path / "dicom")
  shutil.copytree(corpus_src, dst)
  return dst


def _series(dicom_dir):
  """{SeriesInstanceUID: sorted files} of the image series (> 8 files)."""
  by = collections.defaultdict(list)
  for p in sorted(glob.glob(os.path.join(dicom_dir, "**", "*"), recursive=True)):
    if not os.path.isfile(p):
      continue
    try:
      ds = pydicom.dcmread(p, stop_before_pixels=True)
    except pydicom.errors.InvalidDicomError:
      continue
    if "SeriesInstanceUID" in ds and "ImagePositionPatient" in ds:
      by[str(ds.SeriesInstanceUID)].append(p)
  return {k: v for k, v in by.items() if len(v) > 8}


def _rle_series(dicom_dir):
  """RLE-compresses the smallest image series; returns its files."""
  files = min(_series(dicom_dir).values(), key=len)
  for f in files:
    ds = pydicom.dcmread(f)
    ds.compress(RLELossless)
    ds.save_as(f)
  return files


def _corrupt_rle(path):
  """The file's RLE stream holds 5 rows more than its header says: pylibjpeg-
  rle panics on it (pyo3_runtime.PanicException, a BaseException)."""
  ds = pydicom.dcmread(path)
  ds.decompress()
  arr = ds.pixel_array
  rows = ds.Rows
  big = np.zeros((rows + 5, ds.Columns), arr.dtype)
  big[:rows] = arr
  ds.Rows, ds.PixelData = rows + 5, big.tobytes()
  ds.compress(RLELossless)
  ds.Rows = rows
  ds.save_as(path)


def _errors(out):
  with open(os.path.join(out, "errors.csv")) as f:
    return [r for r in csv.DictReader(f) if r["stage"] != "scan"]


def _n_records(out):
  return sum(convert.read_manifest(out)["num_records"].values())


def _n_stacks(dicom_dir):
  from radnet_jax import dicom
  return len(dicom.scan(dicom_dir, salt=SALT).stacks)


def _shard_bytes(out):
  return {os.path.basename(p): open(p, "rb").read()
          for s in convert.SPLITS for p in convert.shard_paths(out, s)}


def _build(dicom_dir, out, **kw):
  kw.setdefault("workers", 1)
  return build.build_shards(dicom_dir, out, shape=SHAPE, salt=SALT, progress=False,
                            hash_paths=False, **kw)


# ----------------------------------------------------------------------------
# 1. Native decoders: panic, segfault, hang
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_rle_panic_is_one_named_skip(corpus, tmp_path, workers):
  files = _rle_series(corpus)
  _corrupt_rle(files[2])
  n = _n_stacks(corpus)
  out = str(tmp_path / "out")
  summary = _build(corpus, out, workers=workers)
  rows = _errors(out)
  assert len(rows) == 1 and rows[0]["stage"] == "load"
  assert os.path.basename(files[2]) in rows[0]["reason"]
  assert "PanicException" in rows[0]["reason"]
  assert summary["failed"] == 1 and _n_records(out) == n - 1
  # The resume converts nothing again and crashes on nothing.
  again = _build(corpus, out, workers=workers)
  assert again["cached"] == n - 1 and _errors(out) == rows


def test_compressed_series_decode_in_a_worker_same_bytes(corpus, tmp_path):
  """workers=1 hands a compressed series to its isolated worker; the shards
  are the same bytes as the uncompressed original's."""
  plain = str(tmp_path / "plain")
  _build(corpus, plain)
  _rle_series(corpus)
  rle = str(tmp_path / "rle")
  _build(corpus, rle)
  assert _shard_bytes(rle) == _shard_bytes(plain)


@pytest.mark.parametrize("kind,workers", [("segfault", 1), ("segfault", 2),
                                          ("hang", 1), ("panic", 2)])
def test_decoder_crash_or_hang_is_attributed_to_its_file(corpus, tmp_path, monkeypatch,
                                                         kind, workers):
  files = _rle_series(corpus)
  victim = os.path.basename(files[3])
  monkeypatch.setenv(isolation.FAULT_ENV, f"{kind}:{victim}")
  n = _n_stacks(corpus)
  out = str(tmp_path / "out")
  t0 = time.monotonic()
  _build(corpus, out, workers=workers, file_timeout_s=3)
  rows = _errors(out)
  assert len(rows) == 1, rows
  expected = {"segfault": ("crash", "SIGSEGV"), "hang": ("timeout", "longer than 3 s"),
              "panic": ("load", "injected decoder panic")}[kind]
  assert rows[0]["stage"] == expected[0] and expected[1] in rows[0]["reason"]
  assert victim in rows[0]["reason"]
  assert _n_records(out) == n - 1
  assert time.monotonic() - t0 < 120


def test_predict_inputs_survive_a_decoder_crash(corpus, monkeypatch):
  files = _rle_series(corpus)
  victim = os.path.basename(files[1])
  monkeypatch.setenv(isolation.FAULT_ENV, f"segfault:{victim}")
  for workers in (1, 2):
    it, _ = api.prepare_inputs(corpus, shard_shape=SHAPE, input_shape=SHAPE, salt=SALT,
                               workers=workers, hash_paths=False)
    items = list(it)
    bad = [i for i in items if isinstance(i, api.SkippedInput)]
    assert len(bad) == 1 and bad[0].stage == "crash" and victim in bad[0].reason
    assert sum(isinstance(i, api.Prepared) for i in items) == len(items) - 1


def test_workers_die_with_their_parent(tmp_path):
  """SIGKILL of the parent: its Supervisor workers exit (PR_SET_PDEATHSIG)."""
  script = textwrap.dedent("""
      import sys, time
      from radnet_jax.dicom import isolation
      import threading
      sup = isolation.Supervisor(time.sleep, 2)
      results = sup.map([600, 600])   # two workers, each busy for 10 minutes
      threading.Thread(target=lambda: list(results), daemon=True).start()
      while len(sup.workers) < 2 or not all(w.proc.pid for w in sup.workers):
        time.sleep(0.05)
      time.sleep(1.0)
      print(" ".join(str(w.proc.pid) for w in sup.workers), flush=True)
      time.sleep(600)
  """)
  proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                          text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  pids = [int(p) for p in proc.stdout.readline().split()]
  assert len(pids) == 2
  for pid in pids:
    os.kill(pid, 0)   # alive
  proc.kill()
  proc.wait()
  deadline = time.monotonic() + 20
  alive = set(pids)
  while alive and time.monotonic() < deadline:
    for pid in list(alive):
      try:
        os.waitpid(pid, os.WNOHANG)
      except ChildProcessError:
        pass
      try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
          if f.read().split(")")[-1].split()[0] == "Z":
            alive.discard(pid)
      except (ProcessLookupError, FileNotFoundError):
        alive.discard(pid)
    time.sleep(0.2)
  assert not alive


# ----------------------------------------------------------------------------
# 2. Non-regular files, stalled reads
# ----------------------------------------------------------------------------

def test_fifo_socket_device_and_broken_link_are_skipped_unopened(corpus, tmp_path):
  os.mkfifo(os.path.join(corpus, "pipe.dcm"))
  os.symlink("/nonexistent/x.dcm", os.path.join(corpus, "broken.dcm"))
  os.symlink("/dev/zero", os.path.join(corpus, "zero.dcm"))
  sock = socket.socket(socket.AF_UNIX)
  sock.bind(os.path.join(corpus, "sock"))
  try:
    out = str(tmp_path / "out")
    t0 = time.monotonic()
    summary = _build(corpus, out)
    assert time.monotonic() - t0 < 120
  finally:
    sock.close()
  with open(os.path.join(out, "errors.csv")) as f:
    reasons = {r["path"]: r["reason"] for r in csv.DictReader(f) if r["stage"] == "scan"}
  assert "FIFO" in reasons["pipe.dcm"] and "without opening" in reasons["pipe.dcm"]
  assert "socket" in reasons["sock"]
  assert "character device" in reasons["zero.dcm"]
  assert "broken symbolic link" in reasons["broken.dcm"]
  assert summary["failed"] == 0 and _n_records(out) == summary["stacks"]


def test_stalled_read_gets_a_time_limit(tmp_path, monkeypatch):
  """A read that blocks (here: a FIFO opened directly, as a hung network
  mount would) is interrupted after READ_TIMEOUT_S and skipped with a reason."""
  fifo = str(tmp_path / "stall.dcm")
  os.mkfifo(fifo)
  monkeypatch.setattr(scan_mod, "READ_TIMEOUT_S", 0.5)
  t0 = time.monotonic()
  res = scan_mod._read_limited(fifo, SALT, None)  # pylint: disable=protected-access
  assert time.monotonic() - t0 < 5
  assert res.path == fifo and "took longer than 0.5 s" in res.reason


# ----------------------------------------------------------------------------
# 3. The salt
# ----------------------------------------------------------------------------

def test_empty_or_short_salt_is_refused(corpus, tmp_path, capsys):
  from data_prep import build_shards as cli
  out = str(tmp_path / "out")
  os.makedirs(out)
  for content in (b"", b"abc\n"):
    with open(os.path.join(out, ".salt"), "wb") as f:
      f.write(content)
    with pytest.raises(ValueError, match=r"\.salt: salt file has \d+ usable"):
      build.build_shards(corpus, out, shape=SHAPE, workers=1, progress=False)
    assert cli.main(["--input", corpus, "--out", out, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert ".salt" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
  assert not glob.glob(os.path.join(out, "*.array_record"))


def test_salt_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
  new = str(tmp_path / "a")
  salt = privacy.load_or_create_salt(new)
  assert len(salt) == privacy.SALT_CHARS
  assert open(os.path.join(new, ".salt")).read() == salt
  assert privacy.load_salt(new) == salt

  def full_disk(fd, data):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(os, "write", full_disk)
  with pytest.raises(OSError):
    privacy.load_or_create_salt(str(tmp_path / "b"))
  assert os.listdir(tmp_path / "b") == []   # no 0-byte .salt, no temporary file


# ----------------------------------------------------------------------------
# 4. Environment errors
# ----------------------------------------------------------------------------

def test_disk_full_stops_the_run_and_resumes_to_identical_shards(corpus, tmp_path,
                                                                  monkeypatch, capsys):
  from data_prep import build_shards as cli
  ref = str(tmp_path / "ref")
  _build(corpus, ref)
  out = str(tmp_path / "out")
  real = convert.atomic_write
  calls = []

  def fills_up(path, data):
    calls.append(path)
    if len(calls) >= 2:   # the disk fills while the second stack is written
      with open(f"{path}.tmp{os.getpid()}", "wb") as f:   # what a kill leaves
        f.write(data[:10])
      raise OSError(errno.ENOSPC, "No space left on device", path)
    real(path, data)
  monkeypatch.setattr(convert, "atomic_write", fills_up)
  code = cli.main(["--input", corpus, "--out", out, "--salt", SALT, "--workers", "1",
                   "--shape", "4,16,16", "--plain-paths", "--quiet"])
  err = capsys.readouterr().err
  assert code == 3
  assert "no space left on the device" in err and "rerun" in err and "Traceback" not in err
  assert not os.path.exists(os.path.join(out, "manifest.json"))
  assert not os.path.exists(os.path.join(out, "errors.csv"))   # no data error recorded
  orphans = glob.glob(os.path.join(out, convert.WORK_DIR, "*", "*.tmp*"))
  assert len(orphans) == 1
  monkeypatch.setattr(convert, "atomic_write", real)   # space is back
  summary = _build(corpus, out)
  assert summary["cached"] == 1 and summary["failed"] == 0
  assert not glob.glob(os.path.join(out, convert.WORK_DIR, "*", "*.tmp*"))
  assert _shard_bytes(out) == _shard_bytes(ref)
  assert open(os.path.join(out, "errors.csv")).read() == \
      open(os.path.join(ref, "errors.csv")).read()


@pytest.mark.parametrize("error", [MemoryError(),
                                   PermissionError(errno.EACCES, "Permission denied")])
def test_memory_and_permission_errors_stop_the_run(corpus, tmp_path, monkeypatch, error):
  def fail(*args, **kwargs):
    raise error
  target = "cache_record" if isinstance(error, MemoryError) else "atomic_write"
  monkeypatch.setattr(convert, target, fail)
  monkeypatch.setattr(convert.stream, "load_resampled", lambda *a: None)
  with pytest.raises(build.RunStopped, match="stopped while converting stack"):
    _build(corpus, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out" / "errors.csv")


def test_every_stack_failed_exits_non_zero(tmp_path, capsys):
  from data_prep import build_shards as cli
  junk = tmp_path / "junk"
  junk.mkdir()
  (junk / "a.dcm").write_bytes(b"not dicom")
  assert cli.main(["--input", str(junk), "--out", str(tmp_path / "out"), "--quiet",
                   "--salt", SALT]) == 1
  assert "no image stack was found" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# 5. PHI in free text (deid-data's fake-PHI CT header)
# ----------------------------------------------------------------------------

def _deid_template():
  deid_data = pytest.importorskip("deid_data")
  return os.path.join(os.path.dirname(deid_data.__file__), "data", "humans",
                      "ctbrain1.dcm")


def _identifying_values(ds):
  """Every identifying value of a header: names (and components), IDs,
  accession, dates, institution, station, UIDs, the free text we inject."""
  vals = set()
  for elem in ds.iterall():
    if elem.VR in ("PN", "DA", "DT", "UI") or elem.keyword in dmeta._IDENTIFYING_KEYS:  # pylint: disable=protected-access
      for v in (elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue))
                else [elem.value]):
        text = str(v).strip()
        if not text or elem.keyword in ("SOPClassUID", "TransferSyntaxUID",
                                        "MediaStorageSOPClassUID", "ImplementationClassUID"):
          continue
        vals.add(text)
        if elem.VR == "PN":
          vals.update(p for p in text.replace("^", " ").split() if len(p) >= 3)
  return {v for v in vals if len(v) >= 4 and not v.startswith("1.2.840.10008")}


def test_no_identifier_reaches_any_output(corpus, tmp_path, capfd):
  template = pydicom.dcmread(_deid_template(), stop_before_pixels=True)
  files = min(_series(corpus).values(), key=len)
  series_uid = pydicom.uid.generate_uid()
  for f in files:
    ds = pydicom.dcmread(f)
    for elem in template:
      if elem.tag.group in (0x0008, 0x0010, 0x0020, 0x0032, 0x0040) and \
          elem.keyword not in ("ImageType", "SOPClassUID", "SOPInstanceUID",
                               "ImagePositionPatient", "ImageOrientationPatient",
                               "FrameOfReferenceUID", "Modality", "SeriesInstanceUID",
                               "InstanceNumber", "SliceLocation", "ImageComments",
                               "AcquisitionNumber", "PositionReferenceIndicator",
                               "StudyInstanceUID"):
        ds[elem.tag] = elem
    ds.StudyInstanceUID = template.StudyInstanceUID
    ds.SeriesInstanceUID = series_uid
    ds.StudyDescription = "CT study of SIMPSON^HOMER^J^"
    ds.SeriesDescription = "AX T1 POST Homer Simpson MRN 00007041776 2023-01-01"
    ds.ProtocolName = "ED_HEAD acc 999887722 SGH SPRINGFIELD GENERAL HOSPITAL"
    ds.save_as(f)
  secrets = _identifying_values(pydicom.dcmread(files[0], stop_before_pixels=True))
  secrets |= {"SIMPSON", "HOMER", "Homer", "Simpson", "00007041776", "999887722",
              "20230101", "2023-01-01", "SPRINGFIELD", "HIBBARD", "RIVERIA", "SGHCT01A"}
  out = str(tmp_path / "out")
  summary = build.build_shards(corpus, out, shape=SHAPE, workers=1, salt=SALT,
                               progress=True)
  logs = "".join(capfd.readouterr())
  assert summary["failed"] == 0, open(os.path.join(out, "errors.csv")).read()
  texts = {"logs": logs}
  for dirpath, _, names in os.walk(out):
    for name in names:
      path = os.path.join(dirpath, name)
      raw = open(path, "rb").read()
      texts[path] = raw.decode("latin-1")
      if name.endswith(".rec"):
        texts[path + ":meta"] = json.dumps(records.decode(raw), default=str)
  for s in convert.SPLITS:
    for i, rec in enumerate(convert.iter_records(out, s)):
      texts[f"{s}:{i}"] = json.dumps({k: v for k, v in rec.items()
                                      if not isinstance(v, np.ndarray)}, default=str)
  leaks = sorted((v, where) for where, text in texts.items() for v in secrets
                 if v.lower() in text.lower())
  assert not leaks, leaks[:10]
  # The scrubbed text is still there for what it says about the series.
  rec = next(r for s in convert.SPLITS for r in convert.iter_records(out, s)
             if r["metadata"].get("StudyDescription") == "CT study of")
  assert rec["metadata"]["SeriesDescription"] == "AX T1 POST MRN"


def test_labels_read_the_raw_text_kept_in_memory():
  md = {"Modality": "MR", "SeriesDescription": "AX T1", "SeriesHash": "s"}
  raw = {dmeta.UNSCRUBBED_KEY: {"SeriesDescription": "AX T1 POST GAD SIMPSON^HOMER"}}
  with_raw = labelling.label_entry(md, "k", "paper", scan_record=raw)
  without = labelling.label_entry(md, "k", "paper")
  assert with_raw["labels"]["contrast"] == "yes" != without["labels"]["contrast"]
  assert with_raw["md"] == md   # what is stored stays the scrubbed record
  assert dmeta.UNSCRUBBED_KEY not in convert.safe_metadata({**md, **raw})


def test_scrubbing_changes_no_phantom_label(tmp_path):
  """On a phantom corpus with header noise, the labels of the scrubbed
  records equal those of the raw ones (the rules lose nothing they use)."""
  from radnet_jax import dicom
  root = str(tmp_path / "noisy")
  phantom.make_corpus(root, n=4, seed=5, small=True, workers=1, progress=False)
  stacks = dicom.scan(os.path.join(root, "dicom"), salt=SALT).stacks
  assert stacks
  for st in stacks:
    scrubbed = {k: v for k, v in st.record.items() if k != dmeta.UNSCRUBBED_KEY}
    assert (labelling.label_entry(scrubbed, st.key, "paper")["labels"] ==
            labelling.label_entry(scrubbed, st.key, "paper", scan_record=st.record)["labels"])


def test_scrub_text():
  ids = privacy.identifier_tokens(["SIMPSON^HOMER^J^", "00007041776", "20230101",
                                   "SGH SPRINGFIELD GENERAL HOSPITAL"])
  assert privacy.scrub_text("CT study of SIMPSON^HOMER^J^", ids) == "CT study of"
  assert privacy.scrub_text("Homer simpson ax t2 00007041776", ids) == "ax t2"
  assert privacy.scrub_text("t1 post 01/02/2023 id 1234567", ids) == "t1 post id"
  for clean in ("BRAIN SEQ  4.8  H31s", "DWI b1000", "T2 FLAIR 3mm", "AX T1 POST"):
    assert privacy.scrub_text(clean, ids) == clean


# ----------------------------------------------------------------------------
# 6. Smaller ones
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("slope", ["0", "NaN"])
def test_bad_rescale_slope_is_a_named_skip(corpus, tmp_path, slope):
  files = min(_series(corpus).values(), key=len)
  ds = pydicom.dcmread(files[4])
  ds.RescaleSlope = slope
  ds.save_as(files[4])
  out = str(tmp_path / "out")
  _build(corpus, out)
  rows = _errors(out)
  assert len(rows) == 1 and "invalid RescaleSlope" in rows[0]["reason"]
  assert os.path.basename(files[4]) in rows[0]["reason"]


def test_blank_series_is_a_named_skip(corpus, tmp_path):
  """A series whose pixels are all one value (a header-only export) is
  skipped with that reason; every other series converts."""
  n = _n_stacks(corpus)
  files = min(_series(corpus).values(), key=len)
  for f in files:
    ds = pydicom.dcmread(f)
    ds.PixelData = bytes(len(ds.PixelData))
    ds.save_as(f)
  out = str(tmp_path / "out")
  _build(corpus, out)
  rows = _errors(out)
  assert len(rows) == 1 and "blank image: every voxel is" in rows[0]["reason"], rows
  assert _n_records(out) == n - 1


def test_real_header_only_file_is_refused_as_blank(tmp_path):
  """nibabel's Philips 3D MPRAGE test file keeps its header but its 176
  frames of 256x256 pixels are all zero: there is nothing to predict from."""
  import gzip
  nibabel = pytest.importorskip("nibabel")
  from radnet_jax import dicom
  src = os.path.join(os.path.dirname(nibabel.__file__), "nicom", "tests", "data",
                     "philips_mprage.dcm.gz")
  (tmp_path / "mprage.dcm").write_bytes(gzip.open(src).read())
  stacks = dicom.scan(str(tmp_path), salt=SALT).stacks
  assert len(stacks) == 1 and stacks[0].record["NumberOfFrames"] == 176
  with pytest.raises(convert.StageError, match="blank image: every voxel is 0"):
    convert.convert_stack_staged(stacks[0], SHAPE)


def test_wrong_columns_is_reported_as_such(corpus, tmp_path):
  files = min(_series(corpus).values(), key=len)
  ds = pydicom.dcmread(files[5])
  cols = ds.Columns
  ds.Columns = cols - 3
  ds.save_as(files[5])
  out = str(tmp_path / "out")
  _build(corpus, out)
  with open(os.path.join(out, "errors.csv")) as f:
    row = next(r for r in csv.DictReader(f) if r["path"].endswith(os.path.basename(files[5])))
  assert f"x{cols - 3} (Rows x Columns) differs" in row["reason"]
  assert "too few slices" not in row["reason"]


def test_predict_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
  from radnet_jax.cli import predict as cli
  with pytest.raises(SystemExit) as e:
    cli.main(["--checkpoint", "x", "--input", str(tmp_path), "--threshold", "5"])
  assert e.value.code == 2
  assert "--threshold: must be a probability in (0, 1], got '5'" in capsys.readouterr().err
  assert cli.main(["--checkpoint", "x", "--input", str(tmp_path / "missing"),
                   "--out", str(tmp_path / "p.csv")]) == 2
  err = capsys.readouterr().err
  assert err.strip() == f"error: {tmp_path / 'missing'}: input does not exist"
  # A segmentation checkpoint (a model without classification heads).
  seg = api.Loaded(model=object(), variables={}, path="workdirs/seg", step=1,
                   config={"entry": "radnet_jax.tasks.segment"}, contract=None)
  monkeypatch.setattr(api, "load", lambda *a, **k: seg)
  monkeypatch.setattr(api.Loaded, "heads", property(lambda self: {}))
  assert cli.main(["--checkpoint", "workdirs/seg", "--input", str(tmp_path),
                   "--out", str(tmp_path / "p.csv"), "--salt", SALT]) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "no classification heads" in err
