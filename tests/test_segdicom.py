"""DICOM CT + DICOM SEG: SEG round trips on known geometry, shards from DICOM
equal shards from NIfTI, clear errors, and predict_seg writing a SEG."""
import copy
import importlib.util
import json
import os
import types

import numpy as np
import pydicom
import pytest
from pydicom.pixels import pack_bits

from data_prep import build_seg_shards
from radnet_jax.dicom import nifti
from radnet_jax import dicom, privacy
from radnet_jax.shards import seg as segdata
from radnet_jax.dicom import seg as segdicom
from radnet_jax.dicom import seg_write
from radnet_jax.phantom import acquisition, make_lits
from radnet_jax.phantom.anatomy import Grid
from radnet_jax.phantom.lits import grid_affine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SALT = "test-salt"


# ------------------------------------------------------------------ helpers


def _kij_affine(grid: Grid) -> np.ndarray:
  """(slice k, row i, column j, 1) -> LPS mm: lits.grid_affine's (j, i, k) columns reversed."""
  return grid_affine(grid)[:, [2, 1, 0, 3]]


def _write_ct(folder: str, grid: Grid, order: np.ndarray, series: int = 1) -> list[str]:
  """A CT series on ``grid`` (HU = a ramp plus a bright box) via the
  phantom's DICOM writer; ``order``: slice index of each instance."""
  os.makedirs(folder, exist_ok=True)
  k, rows, cols = grid.shape
  img = np.full(grid.shape, -100.0, np.float32) + np.arange(k)[:, None, None] * 10
  img[2:5, 3:9, 4:7] = 200.0
  plan = types.SimpleNamespace(modality="CT", vendor="GE", study_description="CT ABDOMEN",
                               thickness=float(grid.spacing[0]))
  patient = types.SimpleNamespace(age=50, sex="F", weight=70.0, height=1700.0)
  ids = {"patient_id": "TESTPAT01", "study_no": 3, "study_uid": acquisition.uid("t", "study"),
         "for_uid": acquisition.uid("t", "for"), "series_uid": acquisition.uid("t", series),
         "series_no": series}
  return acquisition.write_series(folder, [f"IM{i:03d}.dcm" for i in range(k)], plan, patient,
                                  grid, img, {"SeriesDescription": "test"}, ids, "20200101",
                                  order)


def _box_mask(shape) -> np.ndarray:
  m = np.zeros(shape, np.uint8)
  m[1:6, 2:10, 3:8] = 1
  m[2:4, 4:6, 4:6] = 2      # tumour inside the liver
  m[6, 0, 0] = 1            # a corner voxel: catches off-by-one flips
  return m


def _rot(axis, deg):
  axis = np.asarray(axis, float) / np.linalg.norm(axis)
  t = np.radians(deg)
  k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
  return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


GRIDS = {
    # oblique (20 deg about an off-axis direction), instances in reverse order
    "oblique_reversed": (Grid(origin=np.array([-20.0, -15.0, 30.0]),
                              r=_rot([1, 1, 0], 20) @ [1.0, 0, 0],
                              c=_rot([1, 1, 0], 20) @ [0, 1.0, 0],
                              n=_rot([1, 1, 0], 20) @ [0, 0, 1.0],
                              spacing=(2.5, 1.25, 1.5), shape=(8, 12, 10)), "reversed"),
    # rows run anterior (c = -Y), slices stored feet -> head (n = -Z)
    "flipped": (Grid(origin=np.array([-10.0, 12.0, -40.0]), r=np.array([1.0, 0, 0]),
                     c=np.array([0, -1.0, 0]), n=np.array([0, 0, -1.0]),
                     spacing=(3.0, 1.0, 1.0), shape=(8, 12, 10)), "ascending"),
}


@pytest.fixture(scope="module")
def lits_dicom(tmp_path_factory):
  """Two small phantom cases as NIfTI and as CT DICOM + SEG."""
  out = str(tmp_path_factory.mktemp("lits"))
  make_lits(out, n=2, seed=0, workers=1, progress=False, small=True, dicom=True)
  return out


# ------------------------------------------------------------------ SEG geometry


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_seg_round_trip_on_known_geometry(tmp_path, name):
  grid, order = GRIDS[name]
  k = grid.shape[0]
  files = _write_ct(str(tmp_path / "ct"), grid,
                    np.arange(k)[::-1] if order == "reversed" else np.arange(k))
  mask = _box_mask(grid.shape)
  kij = _kij_affine(grid)
  seg_path = seg_write.write_seg(mask, kij, files, str(tmp_path / "seg.dcm"))
  ref = segdicom.ct_reference(files)
  # Back onto the writing grid: exactly the same mask.
  np.testing.assert_array_equal(
      segdicom.rasterise(seg_path, kij, grid.shape, ct=ref), mask)
  # Onto the load_volume (canonical) grid: each voxel holds the label of the
  # grid voxel at the same physical position.
  (stack,) = dicom.scan(str(tmp_path / "ct"), salt=SALT).stacks
  vol = dicom.load_volume(stack)
  got = segdicom.rasterise(seg_path, vol.affine, vol.voxels.shape, ct=ref)
  d, h, w = np.indices(vol.voxels.shape).reshape(3, -1)
  src = np.rint(np.linalg.inv(kij) @ vol.affine @ np.stack([d, h, w, np.ones_like(d)]))
  src = src.astype(int)
  np.testing.assert_array_equal(got.reshape(-1), mask[src[0], src[1], src[2]])
  assert np.bincount(got.ravel(), minlength=3).tolist() == \
      np.bincount(mask.ravel(), minlength=3).tolist()
  ds = pydicom.dcmread(seg_path)
  assert ds.SegmentationType == "BINARY" and ds.Modality == "SEG"
  assert [s.SegmentLabel for s in ds.SegmentSequence] == ["Liver", "Tumour"]
  assert ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
  assert ds.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
  assert ds.SegmentSequence[0].SegmentAlgorithmName == "RadNet-JAX"


def test_shuffled_frames_rasterise_by_position(tmp_path):
  grid, _ = GRIDS["flipped"]
  files = _write_ct(str(tmp_path / "ct"), grid, np.arange(grid.shape[0]))
  mask, kij = _box_mask(grid.shape), _kij_affine(grid)
  seg_path = seg_write.write_seg(mask, kij, files, str(tmp_path / "seg.dcm"))
  ds = pydicom.dcmread(seg_path)
  n = int(ds.NumberOfFrames)
  perm = np.random.default_rng(0).permutation(n)
  assert (perm != np.arange(n)).any()
  frames = ds.pixel_array[perm]
  ds.PerFrameFunctionalGroupsSequence = [
      copy.deepcopy(ds.PerFrameFunctionalGroupsSequence[i]) for i in perm]
  ds.PixelData = pack_bits(frames)
  out = str(tmp_path / "shuffled.dcm")
  ds.save_as(out)
  np.testing.assert_array_equal(segdicom.rasterise(out, kij, grid.shape), mask)
  # Same frame of reference, another series: the SEG is not this CT's.
  files2 = _write_ct(str(tmp_path / "ct2"), grid, np.arange(grid.shape[0]), series=2)
  with pytest.raises(ValueError, match=r"shuffled\.dcm: SEG does not reference this CT"):
    segdicom.rasterise(out, kij, grid.shape, ct=segdicom.ct_reference(files2))


def test_fractional_seg_thresholds_at_half(tmp_path):
  import highdicom as hd
  grid, _ = GRIDS["flipped"]
  files = _write_ct(str(tmp_path / "ct"), grid, np.arange(grid.shape[0]))
  prob = np.zeros(grid.shape + (1,), np.float32)
  prob[1:4, 2:6, 3:7, 0] = 0.8
  prob[1:4, 2:6, 7, 0] = 0.4              # below one half: background
  srcs = [pydicom.dcmread(f) for f in files]  # written in slice order 0..k-1
  seg = hd.seg.Segmentation(
      source_images=srcs, pixel_array=prob, segmentation_type="FRACTIONAL",
      segment_descriptions=seg_write.segment_descriptions([segdicom.LIVER]),
      series_instance_uid=hd.UID(), series_number=5, sop_instance_uid=hd.UID(),
      instance_number=1, manufacturer="test", manufacturer_model_name="test",
      software_versions="0", device_serial_number="0", max_fractional_value=100)
  out = str(tmp_path / "frac.dcm")
  seg.save_as(out)
  got = segdicom.rasterise(out, _kij_affine(grid), grid.shape)
  np.testing.assert_array_equal(got, (prob[..., 0] >= 0.5).astype(np.uint8))


def test_real_seg_test_file():
  """pydicom-data's liver.dcm: 3 frames of 512 x 512, one segment "Liver"."""
  path = pydicom.data.get_testdata_file("liver.dcm", download=False)
  if path is None:
    pytest.skip("pydicom-data is not installed")
  ds = pydicom.dcmread(path)
  segs = segdicom.read_segments(ds, path)
  assert [(s.number, s.label) for s in segs] == [(1, "Liver")]
  assert segdicom.segment_values(segs, path) == {1: segdicom.LIVER}
  # The grid of the SEG's own frames: slices 1 mm apart along +Z.
  aff = np.eye(4)
  aff[:3, 0] = (0, 0, 1.0)
  aff[:3, 1] = (0, 0.810547, 0)
  aff[:3, 2] = (0.810547, 0, 0)
  aff[:3, 3] = (-235.2, -226.8, -128.69)
  got = segdicom.rasterise(path, aff, (3, 512, 512))
  assert got.max() == 1
  # Frames are stored at z -128.69, -127.69, -126.69 with these counts.
  assert [int(got[k].sum()) for k in range(3)] == [36233, 35645, 35220]


# ------------------------------------------------------------------ errors


def _case0(lits_dicom):
  folder = os.path.join(lits_dicom, "dicom", "case-0")
  (stack,) = dicom.scan(folder, salt=SALT).stacks
  return folder, stack, dicom.load_volume(stack)


def test_errors_name_the_file(tmp_path, lits_dicom):
  folder, stack, vol = _case0(lits_dicom)
  seg_path = os.path.join(folder, "SEG.dcm")
  shape = vol.voxels.shape
  ref = segdicom.ct_reference(stack.files)
  assert segdicom.rasterise(seg_path, vol.affine, shape, ct=ref).max() >= 1
  # A SEG of another series (case 1) against case 0's CT.
  other = os.path.join(lits_dicom, "dicom", "case-1", "SEG.dcm")
  with pytest.raises(ValueError, match=r"case-1/SEG\.dcm.*(does not reference|frame of ref)"):
    segdicom.rasterise(other, vol.affine, shape, ct=ref)
  # Truncated file.
  bad = str(tmp_path / "corrupt.dcm")
  with open(seg_path, "rb") as f:
    data = f.read()
  with open(bad, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises((ValueError, dicom.DicomError), match="corrupt.dcm"):
    segdicom.rasterise(bad, vol.affine, shape, ct=ref)
  # A CT image is not a SEG.
  with pytest.raises(ValueError, match="not a DICOM SEG"):
    segdicom.rasterise(stack.files[0], vol.affine, shape)
  # A frame moved half a slice off the CT grid.
  ds = pydicom.dcmread(seg_path)
  pos = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
  z = [float(v) for v in pos.ImagePositionPatient]
  z[2] += vol.spacing[0] / 2
  pos.ImagePositionPatient = z
  off = str(tmp_path / "off.dcm")
  ds.save_as(off)
  with pytest.raises(ValueError, match=r"off\.dcm frame 1: .*between CT slices"):
    segdicom.rasterise(off, vol.affine, shape, ct=ref)
  # Unknown segment names: a clear error, or a label_map.
  ds = pydicom.dcmread(seg_path)
  ds.SegmentSequence[0].SegmentLabel = "Spleen"
  ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue = "78961009"
  ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning = "Spleen"
  unk = str(tmp_path / "spleen.dcm")
  ds.save_as(unk)
  with pytest.raises(ValueError, match=r"spleen\.dcm: segment 1 \('Spleen'"):
    segdicom.rasterise(unk, vol.affine, shape)
  got = segdicom.rasterise(unk, vol.affine, shape, label_map={"spleen": 0})
  assert set(np.unique(got)) <= {0, 2}


# ------------------------------------------------------------------ shards


def test_shards_from_dicom_equal_shards_from_nifti(tmp_path, lits_dicom):
  cfg = segdata.SegPrepConfig(spacing=(10.0, 8.0, 8.0), test_fraction=0.0)
  m_nii = segdata.build_shards(lits_dicom, str(tmp_path / "nii"), cfg, progress=False)
  assert m_nii.get("format") is None            # auto-detected NIfTI, as before
  rc = build_seg_shards.main(["--input", os.path.join(lits_dicom, "dicom"),
                              "--out", str(tmp_path / "dcm"), "--spacing", "10,8,8",
                              "--test-fraction", "0", "--format", "dicom"])
  assert rc == 0
  m_dcm = segdata.load_manifest(str(tmp_path / "dcm"))
  assert m_dcm["format"] == "dicom" and not m_dcm["errors"]
  salt = open(tmp_path / "dcm" / ".salt").read().strip()
  nii = {r["case"]: r for r in segdata.load_records(str(tmp_path / "nii"), "train")}
  dcm = {r["case"]: r for r in segdata.load_records(str(tmp_path / "dcm"), "train")}
  assert len(nii) == len(dcm) == 2
  for case in (0, 1):
    # Case ids: the salted series hash, never the UID.
    cid = privacy.hash_id(acquisition.uid(0, "lits", case, 1), salt)
    a, b = nii[str(case)], dcm[cid]
    assert a["volume"].shape == b["volume"].shape
    np.testing.assert_allclose(a["volume"].astype(np.float32), b["volume"].astype(np.float32),
                               atol=1e-3)
    np.testing.assert_array_equal(a["mask"], b["mask"])
    assert b["mask"].max() >= 1 and b["has_mask"]
    np.testing.assert_allclose(a["affine"], b["affine"], atol=1e-3)
    # Predictions map back onto the DICOM (load_volume) grid.
    back = nifti.to_original_grid(b["mask"], b["geometry"])
    assert list(back.shape) == b["geometry"]["orig_shape"]
  text = open(tmp_path / "dcm" / "manifest.json").read()
  assert "2.25." not in text and "LITS0" not in text and "PHANTOM" not in text


def test_dicom_tree_with_unlabelled_series_and_orphan_seg(tmp_path, lits_dicom):
  import shutil
  tree = tmp_path / "tree"
  shutil.copytree(os.path.join(lits_dicom, "dicom", "case-0"), tree / "case-0")
  grid, _ = GRIDS["flipped"]
  _write_ct(str(tree / "plain-ct"), grid, np.arange(grid.shape[0]), series=7)
  other = _write_ct(str(tmp_path / "elsewhere"), grid, np.arange(grid.shape[0]), series=8)
  seg_write.write_seg(_box_mask(grid.shape), _kij_affine(grid), other,
                      str(tree / "orphan-seg.dcm"))
  # A second SEG of case 0 holding a lesion only: merged with the first.
  (stack,) = dicom.scan(str(tree / "case-0"), salt=SALT).stacks
  vol = dicom.load_volume(stack)
  lesion = np.zeros(vol.voxels.shape, np.uint8)
  lesion[5:7, 1:4, 1:4] = 2
  seg_write.write_seg(lesion, vol.affine, stack.files, str(tree / "case-0" / "SEG-lesion.dcm"),
                      label_values=(segdicom.TUMOUR,))
  cases, _ = segdicom.find_dicom_cases(str(tree), SALT)
  (c0,) = [c for c in cases if c.seg_path]
  assert len(cases) == 2 and sorted(os.path.basename(p) for p in (c0.seg_path, *c0.more_segs)) \
      == ["SEG-lesion.dcm", "SEG.dcm"]
  liver = segdicom.rasterise(str(tree / "case-0" / "SEG.dcm"), vol.affine, vol.voxels.shape)
  want, _, _ = nifti.canonicalise(np.maximum(liver, lesion),
                                    np.diag([-1.0, -1, 1, 1]) @ vol.affine, "x")
  np.testing.assert_array_equal(segdicom.load_case(c0)[3], want)
  cfg = segdata.SegPrepConfig(spacing=(10.0, 8.0, 8.0), test_fraction=0.0)
  m = segdata.build_shards(str(tree), str(tmp_path / "a"), cfg, progress=False, salt=SALT)
  assert m["counts"]["train"] == 1 and m["unlabelled_series_left_out"] == 1
  assert m["errors"] == [{"file": "orphan-seg.dcm", "reason":
                          "SEG references no CT series found under the input folder"}]
  m = segdata.build_shards(str(tree), str(tmp_path / "b"), cfg, progress=False, salt=SALT,
                           unlabelled=True)
  recs = segdata.load_records(str(tmp_path / "b"), "train")
  assert sorted(r["has_mask"] for r in recs) == [False, True]


# ------------------------------------------------------------------ predict


def _tiny_run(workdir: str):
  """A randomly initialised tiny VNet run (config.json + checkpoint)."""
  import grain
  import jax
  import jax.numpy as jnp
  import ml_collections
  from radnet_jax import contract
  from radnet_jax.models import factory
  from radnet_jax.training import checkpoints
  from radnet_jax.training import trainer
  spec = importlib.util.spec_from_file_location(
      "transfer_liver_cfg", os.path.join(ROOT, "experiments", "transfer_liver.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("tiny,scratch")
  c.model.name = "vnet"
  c.model.kwargs = ml_collections.ConfigDict({"filters": (4, 8, 16, 32, 64),
                                              "conv_impl": "xla"})
  c.data.spacing = (12.0, 12.0, 12.0)
  c.input_shape = (16, 16, 16)   # patches and sliding windows
  model = factory.segmentation_model(c)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 16, 16, 16, 1)), train=False))
  rng = np.random.default_rng(1)

  def value(path, s):
    name = str(path[-1].key)
    if name == "var":
      return np.ones(s.shape, s.dtype)
    if name == "mean":
      return np.zeros(s.shape, s.dtype)
    return rng.normal(0, 0.5, s.shape).astype(s.dtype)
  v = jax.tree_util.tree_map_with_path(value, shapes)
  state = trainer.TrainState(step=jnp.int32(1), params=v["params"],
                             batch_stats=v.get("batch_stats", {}), opt_state={},
                             rng=jax.random.PRNGKey(0))
  ck = checkpoints.Checkpointer(workdir)
  ck.save(1, state, iter(grain.MapDataset.range(2).to_iter_dataset()))
  ck.close()
  checkpoints.save_config(workdir, c)
  contract.write(workdir, contract.for_segment(c))   # as train_and_evaluate does
  return c


def test_predict_seg_dicom_writes_a_seg_on_the_ct_grid(tmp_path, lits_dicom):
  import nibabel as nib
  from radnet_jax.cli import predict_seg
  from radnet_jax.inference import segment
  wd = str(tmp_path / "run")
  _tiny_run(wd)
  folder, stack, vol = _case0(lits_dicom)
  out, nii = str(tmp_path / "pred" / "seg.dcm"), str(tmp_path / "pred" / "mask.nii.gz")
  assert predict_seg.main(["--workdir", wd, "--input", folder, "--out", out,
                           "--prefer", "latest", "--nifti-out", nii]) == 0
  # Independent prediction on the same grid.
  predictor = segment.load_seg_predictor(wd, "latest")
  hu, aff, geom, _ = segdicom.load_ct_canonical(stack)
  pred, geom = segment.predict_canonical(predictor, hu, aff, geom)
  expect = nifti.to_original_grid(pred, geom)
  got = segdicom.rasterise(out, vol.affine, vol.voxels.shape,
                           ct=segdicom.ct_reference(stack.files))
  np.testing.assert_array_equal(got, expect)
  np.testing.assert_array_equal(np.asarray(nib.load(nii).dataobj), expect)
  ds = pydicom.dcmread(out)
  assert [s.SegmentLabel for s in ds.SegmentSequence] == ["Liver"]   # 2-class run
  assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == \
      pydicom.dcmread(stack.files[0]).SeriesInstanceUID
  assert ds.Manufacturer == "RadNet-JAX"
  # NIfTI in -> NIfTI out on the input grid.
  res = segment.predict_path(wd, os.path.join(lits_dicom, "volume-0.nii.gz"),
                             str(tmp_path / "pred-0.nii.gz"), prefer="latest")
  img = nib.load(res["nifti"])
  assert img.shape == nib.load(os.path.join(lits_dicom, "volume-0.nii.gz")).shape
  # A folder without CT is a clear error.
  empty = tmp_path / "empty"
  empty.mkdir()
  assert predict_seg.main(["--workdir", wd, "--input", str(empty), "--out",
                           str(tmp_path / "x.dcm")]) == 1
  assert json.load(open(os.path.join(wd, "config.json")))["num_classes"] == 2


def test_segment_names_to_labels():
  seg = lambda n, label, ptype="", code="": segdicom.SegmentInfo(n, label, ptype, code, "")
  got = segdicom.segment_values(
      [seg(1, "Liver"), seg(2, "liver tumor"), seg(3, "Lesion 1"),
       seg(4, "Seg 4", "Neoplasm", "108369006"), seg(5, "organ", "Liver", "10200004")], "f.dcm")
  assert got == {1: 1, 2: 2, 3: 2, 4: 2, 5: 1}
  for label in ("Kidney", "Hepatic vessel", "Couinaud segment IV"):
    with pytest.raises(ValueError, match=rf"f\.dcm: segment 1 \('{label}'"):
      segdicom.segment_values([seg(1, label)], "f.dcm")
  assert segdicom.segment_values([seg(1, "Kidney"), seg(2, "Liver")], "f.dcm",
                                 label_map={"KIDNEY": 0}) == {1: 0, 2: 1}
  assert segdicom.segment_values([seg(7, "x")], "f.dcm", label_map={7: 2}) == {7: 2}


def _anonymise(src: str, dst: str, text_uids: bool = False) -> str:
  """Copies a CT series the way real anonymisers leave it: SOPClassUID and
  PatientID blanked (the file meta keeps the class), InstanceNumber,
  SliceThickness, birth date and accession number deleted; ``text_uids``:
  Study / Series / SOP UIDs replaced by strings that are not UIDs."""
  import warnings
  os.makedirs(dst, exist_ok=True)
  for i, name in enumerate(sorted(os.listdir(src))):
    ds = pydicom.dcmread(os.path.join(src, name))
    if ds.get("Modality") != "CT":
      continue
    ds.SOPClassUID = ""
    ds.PatientID = ""
    for key in ("InstanceNumber", "SliceThickness", "PatientBirthDate",
                "AccessionNumber", "PatientName"):
      if key in ds:
        delattr(ds, key)
    if text_uids:
      ds.StudyInstanceUID, ds.SeriesInstanceUID = "ANON-STUDY", "ANON-SERIES"
      ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"ANON-IMG-{i}"
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      ds.save_as(os.path.join(dst, name))
  return dst


def test_predict_seg_on_an_anonymised_series_writes_mask_then_seg(tmp_path, lits_dicom):
  import nibabel as nib
  from radnet_jax.cli import predict_seg
  from radnet_jax.inference import segment
  wd = str(tmp_path / "run")
  _tiny_run(wd)
  folder, stack, vol = _case0(lits_dicom)
  anon = _anonymise(folder, str(tmp_path / "anon"))
  (anon_stack,) = dicom.scan(anon, salt=SALT).stacks
  assert anon_stack.record["SOPClassUID"] == pydicom.uid.CTImageStorage   # file meta
  out, nii = str(tmp_path / "p" / "seg.dcm"), str(tmp_path / "p" / "mask.nii.gz")
  assert predict_seg.main(["--workdir", wd, "--input", anon, "--out", out,
                           "--prefer", "latest", "--nifti-out", nii]) == 0
  mask = np.asarray(nib.load(nii).dataobj)
  anon_vol = dicom.load_volume(anon_stack)
  got = segdicom.rasterise(out, anon_vol.affine, anon_vol.voxels.shape,
                           ct=segdicom.ct_reference(anon_stack.files))
  np.testing.assert_array_equal(got, mask)
  ds = pydicom.dcmread(out)
  refs = {r.ReferencedSOPClassUID for s in ds.ReferencedSeriesSequence
          for r in s.ReferencedInstanceSequence}
  assert refs == {pydicom.uid.CTImageStorage}
  # UIDs that are not UIDs: no SEG can reference the images; the mask is
  # still written, the reason is printed, the exit status is 2.
  bad = _anonymise(folder, str(tmp_path / "anon_text"), text_uids=True)
  out2 = str(tmp_path / "q" / "seg.dcm")
  res = segment.predict_path(wd, bad, out2, prefer="latest")
  assert res["seg"] is None and "StudyInstanceUID is missing or not a DICOM UID" in res["seg_error"]
  assert not os.path.exists(out2)
  np.testing.assert_array_equal(np.asarray(nib.load(res["nifti"]).dataobj), mask)
  assert res["nifti"] == str(tmp_path / "q" / "seg.nii.gz")
  assert predict_seg.main(["--workdir", wd, "--input", bad, "--out", out2,
                           "--prefer", "latest"]) == 2
