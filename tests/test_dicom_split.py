"""scan: a series whose slice positions repeat is split into its 3D volumes
by the keys that tell them apart, in the order of evidence (issue 15)."""
import importlib
import os
import shutil

import numpy as np
import pydicom
import pytest

from radnet_jax import dicom
from radnet_jax.dicom import entries as entries_mod, fastread, metadata
from radnet_jax.dicom.reader import read_dataset
from radnet_jax.phantom import layouts
from tests.data import synth_dicom as sd

scan_mod = importlib.import_module("radnet_jax.dicom.scan")
SALT = "test-salt"
IOP = [1, 0, 0, 0, 1, 0]
N_POS = 3


def _nibabel_data():
  nibabel = pytest.importorskip("nibabel")
  return os.path.join(os.path.dirname(nibabel.__file__), "nicom", "tests", "data")


def _write_4d(folder, n_vol, tags_of, n_pos=N_POS, skip=()):
  """n_vol volumes of n_pos slices at the same positions; volume v's pixels
  are all 100 * (v + 1); tags_of(v, k) -> per-file tags."""
  series = pydicom.uid.generate_uid()
  study = pydicom.uid.generate_uid()
  pos = sd.linear_positions([0, 0, 0], [0, 0, 3.0], n_pos)
  for v in range(n_vol):
    ks = [k for k in range(n_pos) if (v, k) not in skip]
    stored = np.full((len(ks), 4, 5), 100 * (v + 1), np.int16)
    sd.write_series(os.path.join(folder, f"v{v}"), stored, [pos[k] for k in ks],
                    IOP, modality="MR", series_uid=series, study_uid=study,
                    seed=v, per_slice_tags=[tags_of(v, k) for k in ks])


def _volumes(folder):
  res = dicom.scan(folder, salt=SALT)
  out = []
  for st in sorted(res.stacks, key=lambda s: s.record["VolumeIndex"]):
    vol = dicom.load_volume(st)
    values = np.unique(vol.voxels)
    assert len(values) == 1, "a volume mixes two acquisitions"
    out.append((int(values[0]) // 100 - 1, st.record))
  return out, res


def test_acquisition_number_wins_over_per_slice_acquisition_time(tmp_path):
  # AcquisitionTime differs per slice (2D acquisition): it never passes as a
  # volume key; AcquisitionNumber does.
  _write_4d(str(tmp_path), 4, lambda v, k: {
      "AcquisitionNumber": v + 1, "AcquisitionTime": "1000%02d.5" % (v * 10 + k),
      "InstanceNumber": v * N_POS + k + 1})
  vols, _ = _volumes(str(tmp_path))
  assert [v for v, _ in vols] == [0, 1, 2, 3]
  assert {r["VolumeSplitBy"] for _, r in vols} == {"AcquisitionNumber"}
  assert [r["AcquisitionNumber"] for _, r in vols] == [1, 2, 3, 4]
  assert [r["VolumeTimeS"] for _, r in vols] == [0.0, 10.0, 20.0, 30.0]


def test_temporal_position_comes_first_in_the_order_of_evidence(tmp_path):
  _write_4d(str(tmp_path), 3, lambda v, k: {
      "TemporalPositionIdentifier": v + 1, "AcquisitionNumber": 7 - v})
  vols, _ = _volumes(str(tmp_path))
  assert {r["VolumeSplitBy"] for _, r in vols} == {"TemporalPositionIdentifier"}
  assert [r["TemporalPositionIdentifier"] for _, r in vols] == [1, 2, 3]


def test_slice_major_instance_numbers_without_any_key(tmp_path):
  # Philips-style order (all time points of slice 1, then slice 2, ...) and
  # no temporal tag: the i-th file of each position is volume i.
  _write_4d(str(tmp_path), 4, lambda v, k: {"InstanceNumber": k * 4 + v + 1})
  vols, _ = _volumes(str(tmp_path))
  assert [v for v, _ in vols] == [0, 1, 2, 3]
  assert {r["VolumeSplitBy"] for _, r in vols} == {"InstanceNumber order"}
  assert {r["NumberOfVolumes"] for _, r in vols} == {4}


def test_incomplete_last_volume_uses_blocks_of_the_slice_count(tmp_path):
  # The run stopped during volume 3: its last slice is missing.
  _write_4d(str(tmp_path), 3, lambda v, k: {"InstanceNumber": v * N_POS + k + 1},
            skip={(2, N_POS - 1)})
  res = dicom.scan(str(tmp_path), salt=SALT, min_slices=2)
  sizes = sorted(len(s.files) for s in res.stacks)
  assert sizes == [N_POS - 1, N_POS, N_POS]
  for st in res.stacks:
    assert len(np.unique(dicom.load_volume(st).voxels)) == 1


def test_pair_of_keys_when_no_single_key_splits(tmp_path):
  # Two derived image types x two time points: neither ImageType nor
  # AcquisitionNumber alone makes whole volumes; the pair does.
  kinds = (["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"],
           ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"])
  _write_4d(str(tmp_path), 4, lambda v, k: {
      "ImageType": kinds[v % 2], "AcquisitionNumber": v // 2 + 1})
  vols, _ = _volumes(str(tmp_path))
  assert sorted(v for v, _ in vols) == [0, 1, 2, 3]
  assert {r["VolumeSplitBy"] for _, r in vols} == {"AcquisitionNumber+ImageType"}
  by_volume = dict(vols)
  assert by_volume[1]["ImageType"][-1] == "ADC"
  assert by_volume[0]["ImageType"][-1] == "TRACEW"


def test_copied_files_are_not_volumes(tmp_path):
  # The same slices twice (same InstanceNumbers, identical pixels): one stack,
  # load_volume keeps one copy of each.
  folder = tmp_path / "a"
  _write_4d(str(folder), 1, lambda v, k: {"InstanceNumber": k + 1})
  shutil.copytree(folder, tmp_path / "copy")
  res = dicom.scan(str(tmp_path), salt=SALT)
  (stack,) = res.stacks
  assert "VolumeSplitTried" in stack.record
  vol = dicom.load_volume(stack)
  assert vol.voxels.shape[0] == N_POS
  assert vol.record["DuplicateSlicesDropped"] == N_POS


def test_real_siemens_dti_mosaics_are_two_volumes_of_one_series(tmp_path):
  data = _nibabel_data()
  for name in ("siemens_dwi_0.dcm.gz", "siemens_dwi_1000.dcm.gz"):
    shutil.copy(os.path.join(data, name), tmp_path)
  res = dicom.scan(str(tmp_path), salt=SALT)
  recs = sorted((s.record for s in res.stacks), key=lambda r: r["VolumeIndex"])
  assert len(recs) == 2 and recs[0]["SeriesHash"] == recs[1]["SeriesHash"]
  assert [r["DiffusionBValue"] for r in recs] == [0.0, 1000.0]
  assert recs[1]["DiffusionGradientOrientation"] == pytest.approx(
      [0.99997449, 0.00505012, -0.00505012])
  assert all(r["SeriesBValues"] == [0.0, 1000.0] for r in recs)
  assert all(r["NumberOfVolumes"] == 2 for r in recs)


def test_siemens_csa_b_value_on_a_classic_slice(tmp_path):
  # A non-mosaic Siemens DWI slice whose b-value lives only in its (real)
  # CSA image header.
  with open(os.path.join(_nibabel_data(), "csa2_b1000.bin"), "rb") as f:
    csa = f.read()
  ds = sd.make_slice(np.zeros((4, 5), np.int16), [0, 0, 0], IOP, (1, 1),
                     series_uid=pydicom.uid.generate_uid(),
                     study_uid=pydicom.uid.generate_uid(), modality="MR",
                     Manufacturer="SIEMENS", SequenceName="*ep_b1000#1")
  block = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
  block.add_new(0x10, "OB", csa)
  path = str(tmp_path / "slice.dcm")
  ds.save_as(path, enforce_file_format=True)
  # The fast header reader cannot parse CSA: it hands the file to pydicom.
  with pytest.raises(fastread.Unsupported):
    metadata.vendor_b_value(fastread.read_header(path))
  (entry,) = entries_mod.read_entries(path, SALT)
  assert entry.hard_key[5] == 1000.0
  ds = read_dataset(path, stop_before_pixels=True)
  assert metadata.vendor_b_value(ds) == 1000.0
  assert metadata.vendor_diffusion_direction(ds) == pytest.approx(
      [0.99997449, 0.00505012, -0.00505012])


def test_vendor_diffusion_tags_read_fast_and_equal_to_pydicom(tmp_path, monkeypatch):
  layouts.make_layouts(str(tmp_path), styles=("ge_dti", "philips_dwi",
                                               "siemens_dwi", "canon_dwi",
                                               "uih_dwi"))
  for path in scan_mod.iter_files(str(tmp_path / "dicom")):
    header = fastread.read_header(path)
    ds = read_dataset(path, stop_before_pixels=True)
    assert header is not None, path
    assert metadata.vendor_b_value(header) == metadata.vendor_b_value(ds), path
    assert (metadata.vendor_diffusion_direction(header) ==
            metadata.vendor_diffusion_direction(ds)), path
    try:
      fast_record = metadata.record_from_header(header, SALT)
    except fastread.Unsupported:
      continue  # pydicom builds this file's record (same values)
    assert fast_record == metadata.record_from_dataset(ds, SALT), path
  # Plain classic GE DTI files: headers and the one record per volume (the
  # first file of each b-value / direction group) all by fastread; pydicom
  # never opens a file, and the 6 volumes carry their b-values.
  calls = []
  real = entries_mod.read_dataset
  monkeypatch.setattr(entries_mod, "read_dataset",
                      lambda p, **kw: calls.append(p) or real(p, **kw))
  res = dicom.scan(str(tmp_path / "dicom" / "ge_dti"), salt=SALT)
  assert len(res.stacks) == 6 and calls == []
  assert sorted(s.record["VolumeIndex"] for s in res.stacks) == list(range(6))


@pytest.fixture(scope="module")
def uih(tmp_path_factory):
  out = tmp_path_factory.mktemp("uih")
  layouts.make_layouts(str(out), styles=("uih_dti_vframe", "uih_dwi"))
  return out / "dicom"


def _rewrite(src, dst, edit, implicit=False):
  os.makedirs(dst, exist_ok=True)
  for name in sorted(os.listdir(src)):
    ds = pydicom.dcmread(os.path.join(src, name))
    edit(ds)
    if implicit:
      ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.save_as(os.path.join(dst, name), enforce_file_format=True)


@pytest.mark.parametrize("variant", ["implicit", "top_level_position",
                                     "orientation_in_items"])
def test_uih_vframe_variants_read_like_the_original(uih, tmp_path, variant):
  ref = [dicom.load_volume(s).voxels for s in sorted(
      dicom.scan(str(uih / "uih_dti_vframe"), salt=SALT).stacks,
      key=lambda s: s.record["VolumeIndex"])]

  def edit(ds):
    if variant == "top_level_position":   # a corner of the tiled image
      ds.ImagePositionPatient = ["-50", "-50", "-30"]
    if variant == "orientation_in_items":
      for item in ds[(0x0065, 0x1051)].value:
        item.ImageOrientationPatient = ds.ImageOrientationPatient
      del ds.ImageOrientationPatient
  _rewrite(uih / "uih_dti_vframe", tmp_path, edit, implicit=variant == "implicit")
  stacks = sorted(dicom.scan(str(tmp_path), salt=SALT).stacks,
                  key=lambda s: s.record["VolumeIndex"])
  assert len(stacks) == len(ref)
  for st, expected in zip(stacks, ref):
    assert st.record["MosaicLayout"] == "UIH VFRAME"
    np.testing.assert_array_equal(dicom.load_volume(st).voxels, expected)


def test_uih_files_without_geometry_are_skipped_naming_tag_and_vendor(uih, tmp_path):
  def strip_position(ds):
    del ds.ImagePositionPatient
  _rewrite(uih / "uih_dwi", tmp_path / "slices", strip_position)

  def strip_vframe(ds):
    del ds[(0x0065, 0x1051)]
  _rewrite(uih / "uih_dti_vframe", tmp_path / "vframe", strip_vframe)
  res = dicom.scan(str(tmp_path), salt=SALT)
  assert not res.stacks
  reasons = {os.path.basename(os.path.dirname(k.path)): k.reason for k in res.skipped}
  assert "ImagePositionPatient (0020,0032)" in reasons["slices"]
  assert "vendor UIH" in reasons["slices"]
  assert "MR VFrame Sequence (0065,1051)" in reasons["vframe"]
  assert "vendor UIH" in reasons["vframe"]


def _enhanced_mr(path, n_vol, temporal_index, order, diffusion=None):
  """An Enhanced MR object: n_vol volumes of N_POS frames at the same
  positions, frames in ``order`` (a permutation of volume-major frames);
  volume v's pixels are all 100 * (v + 1)."""
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.sequence import Sequence
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
  meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
  meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = "MR"
  ds.SeriesInstanceUID = pydicom.uid.generate_uid()
  ds.StudyInstanceUID = pydicom.uid.generate_uid()
  ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
  ds.Rows, ds.Columns = 4, 5
  ds.NumberOfFrames = n_vol * N_POS
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
  shared = Dataset()
  orient, meas = Dataset(), Dataset()
  orient.ImageOrientationPatient = IOP
  meas.PixelSpacing = [1.0, 1.0]
  meas.SliceThickness = 3.0
  shared.PlaneOrientationSequence = Sequence([orient])
  shared.PixelMeasuresSequence = Sequence([meas])
  ds.SharedFunctionalGroupsSequence = Sequence([shared])
  frames, pixels = [], []
  for f in order:
    v, k = divmod(f, N_POS)
    item, pos, content = Dataset(), Dataset(), Dataset()
    pos.ImagePositionPatient = [0.0, 0.0, 3.0 * k]
    if temporal_index:
      content.TemporalPositionIndex = v + 1
    item.PlanePositionSequence = Sequence([pos])
    item.FrameContentSequence = Sequence([content])
    if diffusion is not None:   # (b, direction, frame type) of volume v
      b, direction, frame_type = diffusion[v]
      diff, grad, ftype = Dataset(), Dataset(), Dataset()
      diff.DiffusionBValue = b
      grad.DiffusionGradientOrientation = list(direction)
      diff.DiffusionGradientDirectionSequence = Sequence([grad])
      ftype.FrameType = frame_type
      item.MRDiffusionSequence = Sequence([diff])
      item.MRImageFrameTypeSequence = Sequence([ftype])
    frames.append(item)
    pixels.append(np.full((4, 5), 100 * (v + 1), np.uint16))
  ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
  ds.PixelData = np.stack(pixels).tobytes()
  ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("temporal_index, by", [
    (True, "TemporalPositionIndex"), (False, "frame order")])
def test_enhanced_frames_at_repeated_positions(tmp_path, temporal_index, by):
  # Frames slice-major (every volume of slice 1, then slice 2, ...).
  order = [v * N_POS + k for k in range(N_POS) for v in range(3)]
  _enhanced_mr(str(tmp_path / "enh.dcm"), 3, temporal_index, order)
  vols, _ = _volumes(str(tmp_path))
  assert [v for v, _ in vols] == [0, 1, 2]
  assert {r["VolumeSplitBy"] for _, r in vols} == {by}


def test_enhanced_dti_frames_carry_their_own_direction_and_type(tmp_path):
  original = ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]
  diffusion = [(0.0, (0.0, 0.0, 0.0), original),
               (1000.0, (1.0, 0.0, 0.0), original),
               (1000.0, (0.0, 1.0, 0.0), original),
               (1000.0, (0.0, 0.0, 0.0), ["ORIGINAL", "PRIMARY", "DIFFUSION", "ISOTROPIC"])]
  order = list(range(len(diffusion) * N_POS))
  _enhanced_mr(str(tmp_path / "dti.dcm"), len(diffusion), False, order, diffusion)
  vols, _ = _volumes(str(tmp_path))
  assert [v for v, _ in vols] == [0, 1, 2, 3]
  for v, rec in vols:
    b, direction, frame_type = diffusion[v]
    assert rec["DiffusionBValue"] == b
    assert rec["DiffusionGradientOrientation"] == list(direction)
    assert rec["ImageType"] == frame_type


@pytest.mark.parametrize("padded", [False, True])
def test_uih_vframe_grid_of_six_slices(tmp_path, padded):
  # 6 slices: 3 tiles wide, 2 high (UIH's rule), or padded to 3x3.
  layouts.make_layouts(str(tmp_path), styles=("uih_dti_vframe",), n_slices=6,
                       rows=8, cols=8)
  src = tmp_path / "dicom" / "uih_dti_vframe"
  if padded:
    def pad(ds):
      tiled = ds.pixel_array
      out = np.zeros((tiled.shape[0] * 3 // 2, tiled.shape[1]), tiled.dtype)
      out[:tiled.shape[0]] = tiled
      ds.Rows = out.shape[0]
      ds.PixelData = out.tobytes()
    _rewrite(src, tmp_path / "padded", pad)
    src = tmp_path / "padded"
  stacks = dicom.scan(str(src), salt=SALT).stacks
  assert len(stacks) == 4
  for st in stacks:
    vol = dicom.load_volume(st)
    assert vol.voxels.shape == (6, 8, 8)
    assert vol.spacing[0] == pytest.approx(4.0)
    # The phantom's ellipsoid: tissue in the centre of every slice, air at
    # the corners (a wrong tile size would cut across tiles).
    assert (vol.voxels[:, 4, 4] > 100).all() and (vol.voxels[:, 0, 0] < 100).all()


def test_philips_position_only_in_the_private_header_copy(tmp_path):
  layouts.make_layouts(str(tmp_path), styles=("philips_dwi",))
  src = tmp_path / "dicom" / "philips_dwi"
  ref = {s.record["VolumeIndex"]: dicom.load_volume(s) for s in
         dicom.scan(str(src), salt=SALT).stacks}

  def move_position(ds):   # as anonymisers leave Philips files
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    item = Dataset()
    item.ImagePositionPatient = ds.ImagePositionPatient
    del ds.ImagePositionPatient
    ds.add_new((0x2005, 0x0014), "LO", "Philips MR Imaging DD 005")
    ds.private_block(0x2005, "Philips MR Imaging DD 005").add_new(
        0x0F, "SQ", Sequence([item]))
  _rewrite(src, tmp_path / "moved", move_position)
  stacks = dicom.scan(str(tmp_path / "moved"), salt=SALT).stacks
  assert len(stacks) == len(ref)
  for st in stacks:
    vol = dicom.load_volume(st)
    expected = ref[st.record["VolumeIndex"]]
    np.testing.assert_array_equal(vol.voxels, expected.voxels)
    np.testing.assert_allclose(vol.affine, expected.affine)
