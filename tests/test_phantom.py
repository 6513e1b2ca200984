"""Phantom corpus: geometry, truth vs headers, physics, determinism, LiTS set."""
import collections
import hashlib
import os

import numpy as np
import pydicom
import pytest

from radnet_jax.phantom import HeaderNoise, load_truth, make_corpus, make_lits
from radnet_jax.phantom import physics
from radnet_jax.phantom.anatomy import T, TISSUES
from radnet_jax.phantom.protocols import _mr_params
from radnet_jax.phantom.truth import coverage, read_truth

SALT = "test-salt"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("phantom_clean"))
  summary = make_corpus(out, n=8, seed=3, workers=1, noise=HeaderNoise.off(), progress=False, small=True)
  return out, summary


def _series_files(out):
  by = collections.defaultdict(list)
  for d, _, fs in os.walk(os.path.join(out, "dicom")):
    for f in fs:
      ds = pydicom.dcmread(os.path.join(d, f))
      by[ds.SeriesInstanceUID].append(ds)
  return by


def test_corpus_layout_and_truth(clean):
  out, summary = clean
  rows = read_truth(os.path.join(out, "truth.csv"))
  assert summary["n_series"] == len(rows) == 8
  assert {r["sequence"] for r in rows} <= {"CT", "T1", "T2", "T1-FLAIR", "T2-FLAIR", "PT", "DWI", "other"}
  by = _series_files(out)
  image_series = {uid for uid, dss in by.items() if "PixelData" in dss[0] and "LOCALIZER" not in dss[0].get("ImageType", [])}
  assert image_series == {r["series_uid"] for r in rows}
  for name in (f for _, _, fs in os.walk(out) for f in fs):
    assert "PHANTOM" not in name and "^" not in name


def test_written_geometry_matches_truth(clean):
  out, _ = clean
  by = _series_files(out)
  for row in read_truth(os.path.join(out, "truth.csv")):
    dss = by[row["series_uid"]]
    assert len(dss) == row["n_slices"]
    iop = np.array(dss[0].ImageOrientationPatient, float)
    r, c = iop[:3], iop[3:]
    np.testing.assert_allclose([r @ r, c @ c, r @ c], [1, 1, 0], atol=1e-5)
    n = np.cross(r, c)
    pos = np.sort([np.array(d.ImagePositionPatient, float) @ n for d in dss])
    np.testing.assert_allclose(np.diff(pos), row["spacing"], atol=1e-3)
    assert float(dss[0].PixelSpacing[0]) == pytest.approx(row["pixel_spacing"], abs=1e-3)
    assert (dss[0].Rows, dss[0].Columns) == (row["rows"], row["columns"])
    plane = ("SAG", "COR", "AX")[int(np.argmax(np.abs(n)))]
    assert plane == row["plane"]
    z = [np.array(d.ImagePositionPatient, float)[2] for d in dss]
    assert min(z) >= row["z_low"] - 1e-2 and max(z) <= row["z_high"] + 1e-2
    if row["modality"] == "CT":
      assert dss[0].RescaleIntercept == -1024 and dss[0].SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"


def test_ingestion_reads_simulated_grid(clean):
  dicom = pytest.importorskip("radnet_jax.dicom")
  out, _ = clean
  truth = load_truth(os.path.join(out, "truth.csv"), SALT)
  res = dicom.scan(os.path.join(out, "dicom"), salt=SALT)
  seen = set()
  for stack in res.stacks:
    row = truth.get(stack.record.get("SeriesHash"))
    if row is None:
      continue
    seen.add(stack.record["SeriesHash"])
    vol = dicom.load_volume(stack)
    assert vol.voxels.shape[0] == row["n_slices"]
    assert sorted(vol.voxels.shape[1:]) == sorted([row["rows"], row["columns"]])
    assert vol.spacing[0] == pytest.approx(row["spacing"], abs=1e-2)
    if row["modality"] == "CT":   # air outside, tissue inside, in HU
      assert vol.voxels.min() < -900 and -200 < np.median(vol.voxels[vol.voxels > -500]) < 300
  assert seen == set(truth)


def test_header_labels_equal_truth_without_noise(clean):
  labels = pytest.importorskip("radnet_jax.labels")
  dicom = pytest.importorskip("radnet_jax.dicom")
  out, _ = clean
  truth = load_truth(os.path.join(out, "truth.csv"), SALT)
  res = dicom.scan(os.path.join(out, "dicom"), salt=SALT)
  decided = collections.Counter()
  for stack in res.stacks:
    row = truth.get(stack.record.get("SeriesHash"))
    if row is None:
      continue
    lab = labels.label(stack.record, taxonomy="extended")
    for task in ("sequence", "plane", "contrast"):
      if lab[task].known:
        decided[task] += 1
        assert lab[task].value == row[task], (task, lab[task], row)
    if lab["spacing"].known:
      assert lab["spacing"].value == pytest.approx(row["spacing"], abs=0.05)
  assert decided["sequence"] == decided["plane"] == len(truth)


def test_determinism_and_idempotence(tmp_path):
  def digest(out):
    h = hashlib.sha256()
    for d, _, fs in sorted(os.walk(os.path.join(out, "dicom"))):
      for f in sorted(fs):
        h.update(os.path.relpath(os.path.join(d, f), out).encode())
        h.update(open(os.path.join(d, f), "rb").read())
    h.update(open(os.path.join(out, "truth.csv"), "rb").read())
    return h.hexdigest()
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  sa = make_corpus(a, n=3, seed=11, workers=1, progress=False, small=True)
  make_corpus(b, n=3, seed=11, workers=2, progress=False, small=True)
  assert digest(a) == digest(b)
  mtime = os.path.getmtime(os.path.join(a, "truth.csv"))
  assert make_corpus(a, n=3, seed=11, workers=1, progress=False, small=True) == sa
  assert os.path.getmtime(os.path.join(a, "truth.csv")) == mtime


def test_noise_rates_follow_config(tmp_path):
  noise = HeaderNoise(missing_bodypart=1.0, wrong_bodypart=0.0, contrast_tags_empty=0.0,
                      description_only=0.0, misleading_description=0.0, missing_description=0.0)
  out = str(tmp_path / "n")
  make_corpus(out, n=3, seed=5, workers=1, progress=False, small=True, noise=noise)
  rows = read_truth(os.path.join(out, "truth.csv"))
  assert all(r["header_noise"] == "missing_bodypart" for r in rows)
  by = _series_files(out)
  for r in rows:
    assert not by[r["series_uid"]][0].get("BodyPartExamined")


def test_ct_hu_per_tissue():
  lab = np.repeat(np.arange(len(TISSUES), dtype=np.int8), 200).reshape(len(TISSUES), 10, 20)
  rng = np.random.default_rng(0)
  pre = physics.ct_image(lab, False, rng, spacing=(50.0, 1.0, 1.0), thickness=1.0, noise_hu=0.0)
  post = physics.ct_image(lab, True, rng, spacing=(50.0, 1.0, 1.0), thickness=1.0, noise_hu=0.0)
  med = lambda img, t: float(np.median(img[T[t]]))
  assert med(pre, "air") < -990 and med(pre, "gas") < -990
  assert -900 < med(pre, "lung") < -700
  assert -130 < med(pre, "fat") < -70
  assert -10 < med(pre, "csf") < 20
  assert 45 < med(pre, "liver") < 70 and med(post, "liver") > med(pre, "liver") + 30
  assert med(post, "blood") > 150
  assert med(pre, "bone") > 300


@pytest.mark.parametrize("seq", ["T1", "T2", "T1-FLAIR", "T2-FLAIR"])
def test_mr_contrast_ordering(seq):
  p = _mr_params(seq, np.random.default_rng(1), gre=False)
  lab = np.array([T["csf"], T["wm"], T["gm"], T["fat"]], np.int8)
  csf, wm, gm, fat = physics.mr_signal(lab, tr=p["tr"], te=p["te"], ti=p["ti"])
  if seq == "T2":
    assert csf > gm > wm
  elif seq == "T2-FLAIR":
    assert gm > wm > csf
  else:   # T1 and T1-FLAIR
    assert wm > gm > csf
  liv = np.array([T["liver"]], np.int8)
  if seq == "T1":   # gadolinium shortens T1: brighter on T1
    assert physics.mr_signal(liv, tr=p["tr"], te=p["te"], gd=1.0)[0] > physics.mr_signal(liv, tr=p["tr"], te=p["te"])[0]


def test_coverage_rule():
  bands = {"brain": (0, 100), "head": (-100, 0), "neck": (-160, -100), "lung": (-360, -160),
           "breast": (-300, -200), "liver": (-460, -300), "kidney": (-560, -440),
           "intestine": (-700, -520), "pelvis": (-800, -620)}
  assert coverage(bands, -360, -140, "chest") == ("lung",)
  assert coverage(bands, -360, -140, "wholebody") == ("lung", "breast")
  assert coverage(bands, -900, 120, "wholebody") == tuple(bands)
  assert coverage(bands, -30, 110, "brain") == ("brain",)
  # A slab through part of the brain images the brain, however thin.
  assert coverage(bands, 55, 95, "brain") == ("brain",)
  assert coverage(bands, -25, 25, "brain") == ("brain", "head")
  assert coverage(bands, -450, -410, "abdomen") == ("liver",)


def test_head_mr_slabs_through_part_of_the_brain(monkeypatch):
  """A 2D head MR series sometimes covers only part of the brain (fMRI and
  DTI slabs, targeted work-up series): the same draw with a partial slab
  spans 35-70% of the full slab's extent, lies inside it, and its truth
  coverage is still the brain."""
  import dataclasses
  from radnet_jax.phantom import acquisition, protocols
  from radnet_jax.phantom.anatomy import make_patient
  rng = np.random.default_rng(0)
  plans = [p for _ in range(40) for p in protocols.plan_study(rng)
           if p.modality == "MR" and p.region == "brain" and p.fov and not p.slab]
  assert {p.plane for p in plans} == {"AX", "COR", "SAG"} and any(p.epi or p.bold for p in plans)
  patient = make_patient(np.random.default_rng(1), 1)
  prob = acquisition._partial_slab_prob

  def grid(p, i, prob):
    monkeypatch.setattr(acquisition, "_partial_slab_prob", lambda plan: prob)
    return acquisition.plan_grid(patient, dataclasses.replace(p), np.random.default_rng(i))

  for i, p in enumerate(plans):
    full, part = grid(p, i, 0.0), grid(p, i, 1.0)
    ext = lambda g: (g.shape[0] - 1) * g.spacing[0]
    ratio = ext(part) / ext(full)
    assert 0.35 - full.spacing[0] / ext(full) <= ratio <= 0.7 or part.shape[0] == 8, (p, ratio)
    assert np.allclose(part.n, full.n)
    # along the slice normal, the partial slab lies inside the full one (to
    # within a slice: the slice count rounds each slab down)
    s0, s1 = (float(g.origin @ g.n) for g in (full, part))
    tol = full.spacing[0]
    assert s0 - tol <= s1 and s1 + ext(part) <= s0 + ext(full) + tol, p
    z = acquisition.grid_z_range(part)
    assert "brain" in coverage(patient.bands, *z, p.region), (p, z)
  # echo-planar series (BOLD, diffusion) are cut more often than the others
  epi = next(p for p in plans if p.epi or p.bold)
  other = next(p for p in plans if not (p.epi or p.bold))
  assert prob(epi) > prob(other) > 0


def test_lits_layout(tmp_path):
  nib = pytest.importorskip("nibabel")
  out = str(tmp_path / "lits")
  cases = make_lits(out, n=2, seed=1, workers=1, progress=False, small=True)["cases"]
  for i, info in enumerate(cases):
    vol = nib.load(os.path.join(out, f"volume-{i}.nii.gz"))
    seg = nib.load(os.path.join(out, f"segmentation-{i}.nii.gz"))
    hu, m = np.asarray(vol.dataobj), np.asarray(seg.dataobj)
    assert hu.dtype == np.int16 and hu.shape == m.shape
    assert set(np.unique(m)) <= {0, 1, 2} and (m == 1).sum() > 100
    np.testing.assert_allclose(vol.affine, seg.affine)
    assert nib.aff2axcodes(vol.affine) == ("L", "P", "S")
    liver_hu = float(np.median(hu[m == 1]))
    if info["phase"] in ("none", "arterial"):          # plain: 45-70 HU, 10-50 with steatosis
      assert (5 if info["steatosis"] else 40) < liver_hu < 100
    else:                                              # portal venous / delayed: enhanced
      assert 50 < liver_hu < 200
    assert float(np.median(hu[m == 0])) < liver_hu     # background has air and fat
    # the liver lies in the patient's right side: RAS +x (LPS -x)
    xyz = nib.affines.apply_affine(vol.affine, np.argwhere(m == 1).mean(0))
    assert xyz[0] > 0


def test_ct_plans_carry_phase_kernel_dose_and_clinical_fov():
  """CT acquisitions of the corpus: a contrast phase exactly when contrast was
  given (reformats share their acquisition's phase, kernel and dose), every
  kernel and phase in use, the vendor's kernel name in the header, and body
  CT axials on a 350-500 mm display FOV."""
  from radnet_jax.phantom import acquisition, corpus, ct, protocols, truth
  from radnet_jax.phantom.anatomy import make_patient
  rng = np.random.default_rng(0)
  plans = [p for _ in range(400) for p in protocols.plan_study(rng) if p.modality == "CT"]
  phases, kernels = collections.Counter(), collections.Counter()
  acq = None
  for p in plans:
    if p.reformat:   # a reformat follows its acquisition in the plan
      assert (p.phase, p.kernel, p.kvp, p.mas) == acq, p
    else:
      acq = (p.phase, p.kernel, p.kvp, p.mas)
    assert (p.phase in ct.PHASES) == (p.contrast == "yes"), p
    assert p.kernel in ct.KERNELS and p.mas > 0 and p.kvp in (100.0, 120.0, 140.0)
    phases[p.phase] += 1
    kernels[p.kernel] += 1
    tags = corpus.series_tags(p, rng)
    assert tags["ConvolutionKernel"] == corpus._KERNEL_NAMES[p.vendor][ct.KERNELS.index(p.kernel)]
    assert tags["KVP"] == p.kvp
  assert set(phases) == {"", *ct.PHASES} and set(kernels) == set(ct.KERNELS)
  assert phases["portal"] > phases["arterial"] > 0 and phases["portal"] > phases["delayed"] > 0
  body = [p for p in plans if p.region in ("abdomen", "abdpelvis", "cap", "chest") and p.plane == "AX"][:6]
  patient = make_patient(np.random.default_rng(1), 1)
  # abdomen-pelvis CT, the commonest body CT: dome of the liver to the symphysis
  abdpel = [p for p in plans if p.region == "abdpelvis"][:4]
  assert abdpel
  for p in abdpel:
    z = acquisition.grid_z_range(acquisition.plan_grid(patient, p, rng))
    assert truth.coverage(patient.bands, *z, p.region) == ("liver", "kidney", "intestine", "pelvis"), z
  for p in body:
    g = acquisition.plan_grid(patient, p, rng)
    fov = g.spacing[1] * max(g.shape[1:])
    assert 349.0 <= fov <= 501.0, (p.region, fov)


def test_slice_elements_encode_as_pydicom_writes_them():
  """acquisition._elem (the per-slice elements of the corpus writer) gives pydicom's own bytes."""
  from pydicom.dataelem import DataElement
  from radnet_jax.phantom.acquisition import _elem, _enc, uid
  rng = np.random.default_rng(0)
  floats = [0, 0.0, -0.0, 1e-3, -1024, 1, 0.5] + [round(float(v), k) for v in rng.normal(0, 300, 60)
                                                  for k in (1, 4, 6)]
  cases = [(0x00200032, "DS", floats[i:i + 3]) for i in range(0, len(floats) - 3, 3)]
  cases += [(0x00201041, "DS", [v]) for v in floats] + [(0x00281053, "DS", [v]) for v in floats]
  cases += [(0x00200013, "IS", [n]) for n in (1, 9, 10, 99, 120, 400)]
  cases += [(0x00080018, "UI", uid("1.2.3", k)) for k in range(20)] + [(0x00020003, "UI", "1.234")]
  cases += [(0x00020000, "UL", n) for n in (0, 190, 70000)]
  cases += [(0x7FE00010, "OW", rng.integers(0, 4096, (3, 5)).astype(np.uint16).tobytes()), (0x7FE00010, "OW", b"")]
  for tag, vr, value in cases:
    want = _enc(DataElement(tag, vr, value if vr in ("UI", "UL", "OW") or len(value) > 1 else value[0]))
    assert _elem(tag, vr, value) == want, (tag, vr, value)
