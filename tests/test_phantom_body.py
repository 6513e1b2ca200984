"""Phantom body (phantom.body, phantom.ct, phantom.lits): anatomy truth, CT physics, LiTS masks."""
import numpy as np
import pytest

from radnet_jax.phantom import ct, lits, physics
from radnet_jax.phantom.anatomy import TISSUES, Grid, T, make_patient, render_labels
from radnet_jax.phantom.shapes import Blob

VOX = 4.0   # mm, isotropic grid over the trunk


@pytest.fixture(scope="module")
def trunk():
  """One patient (3 lesions) rendered on a 4 mm grid from the lung apex to the hips."""
  p = make_patient(np.random.default_rng([5, 1]), 0, lesions=3)
  z_hi, z_lo = p.bands["lung"][1] + 10, p.bands["pelvis"][0] + 20
  k = int((z_hi - z_lo) / VOX) + 1
  n = int(2 * p.half_width / VOX) + 8
  m = int(2 * p.half_depth / VOX) + 24
  g = Grid(np.array([-(n - 1) / 2 * VOX, -(m - 1) / 2 * VOX, z_lo]), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]),
           np.array([0, 0, 1.0]), (VOX, VOX, VOX), (k, m, n))
  lab = render_labels(p, g)
  pts = lambda t: np.argwhere(np.isin(lab, [T[x] for x in np.atleast_1d(t)])) * VOX + [z_lo, g.origin[1], g.origin[0]]
  return p, lab, pts   # pts: (z, y, x) mm of a tissue's voxels


def _litres(lab, *tissues):
  return float(np.isin(lab, [T[t] for t in tissues]).sum()) * VOX ** 3 / 1e6


def test_body_tissues_present(trunk):
  _, lab, _ = trunk
  present = {TISSUES[i] for i in np.unique(lab)}
  body = {"skin", "fat", "muscle", "bone", "marrow", "disc", "csf", "cord", "lung", "blood", "artery", "vein",
          "portal", "myocardium", "liver", "liver_portal", "liver_vein", "bile", "spleen", "pancreas", "kidney",
          "medulla", "collecting", "bowel", "gas", "urine", "cartilage"}
  assert body <= present, body - present
  assert {"lesion", "lesion_hyper"} & present          # the 3 lesions are there


def test_organ_volumes_are_adult(trunk):
  _, lab, _ = trunk
  assert 0.9 < _litres(lab, "liver", "liver_portal", "liver_vein", "lesion", "lesion_hyper") < 2.8
  assert 0.08 < _litres(lab, "spleen") < 0.6
  assert 0.15 < _litres(lab, "kidney", "medulla", "collecting") < 0.6   # both kidneys
  assert 0.02 < _litres(lab, "pancreas") < 0.15
  assert 2.0 < _litres(lab, "lung") < 8.0


def test_organ_positions(trunk):
  """LPS: +x = patient left, +y = posterior, +z = superior."""
  p, lab, pts = trunk
  c = lambda t: pts(t).mean(0)   # (z, y, x)
  assert c("liver")[2] < -20 < 20 < c("spleen")[2]      # liver right, spleen left
  assert c("liver")[0] > c("kidney")[0]                  # liver above the kidneys
  kid = pts("kidney")
  right, left = kid[kid[:, 2] < 0], kid[kid[:, 2] > 0]
  assert len(right) and len(left) and right[:, 0].mean() < left[:, 0].mean()   # right kidney lower
  assert right[:, 1].mean() > c("liver")[1]                                    # kidneys posterior
  lo, hi = p.bands["liver"]
  z_liver = pts(["liver", "liver_portal", "liver_vein", "lesion", "lesion_hyper"])[:, 0]
  assert abs(z_liver.min() - lo) < 2 * VOX and abs(z_liver.max() - hi) < 2 * VOX   # band = rendered extent
  # the vertebral bodies lie behind the aorta at the level of the kidneys
  zk = c("kidney")[0]
  sl = lambda t: pts(t)[np.abs(pts(t)[:, 0] - zk) < 8]
  assert sl("marrow")[:, 1].mean() > sl("artery")[:, 1].mean()


def test_liver_vessels_and_lesions_inside_liver(trunk):
  _, lab, pts = trunk
  liver_all = pts(["liver", "liver_portal", "liver_vein", "lesion", "lesion_hyper"])
  lo, hi = liver_all.min(0), liver_all.max(0)
  for t in ("liver_portal", "liver_vein", "lesion", "lesion_hyper"):
    q = pts(t)
    if len(q):
      assert (q >= lo - 1e-6).all() and (q <= hi + 1e-6).all(), t


def test_same_seed_same_body():
  g = Grid(np.array([-150.0, -120.0, -400.0]), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0]),
           (6.0, 5.0, 5.0), (20, 48, 60))
  a = render_labels(make_patient(np.random.default_rng([9, 2])), g)
  b = render_labels(make_patient(np.random.default_rng([9, 2])), g)
  c = render_labels(make_patient(np.random.default_rng([9, 3])), g)
  assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def test_blob_lattice_matches_exact_field():
  rng = np.random.default_rng(0)
  b = Blob(rng.normal(0, 20, (4, 3)), rng.uniform(15, 30, (4, 3)), deform=((np.array([1.0, 2, 0.5]), 0.3, 0.05),))
  p = rng.uniform(b.lo, b.hi, (20000, 3)).astype(np.float32)
  exact = b.ratio(p) >= b.level
  assert exact.mean() > 0.1
  assert (b.inside(p) == exact).mean() > 0.99   # differs only within ~1 mm of the surface


# --------------------------------------------------------------- CT physics ---
def _tissue_rows(*names):
  return np.repeat(np.array([T[n] for n in names], np.int8), 400).reshape(len(names), 20, 20)


def _hu(lab, phase, contrast=True, patient_ct=None):
  img = physics.ct_image(lab, contrast, np.random.default_rng(0), spacing=(50.0, 1.0, 1.0), thickness=1.0,
                         noise_hu=0.0, phase=phase, patient_ct=patient_ct, beam_hardening=0.0)
  return {n: float(np.median(img[i])) for i, n in enumerate(NAMES)}


NAMES = ("liver", "spleen", "artery", "portal", "liver_vein", "kidney", "medulla", "collecting",
         "lesion", "lesion_hyper", "pancreas", "muscle")


def test_contrast_phases():
  lab = _tissue_rows(*NAMES)
  pre, art, pv, dl = _hu(lab, "portal", False), _hu(lab, "arterial"), _hu(lab, "portal"), _hu(lab, "delayed")
  assert 45 < pre["liver"] < 70 and 100 < pv["liver"] < 130            # liver peaks portal venous
  assert art["liver"] < pv["liver"] and dl["liver"] < pv["liver"]
  assert art["artery"] > 280 > pv["artery"] > dl["artery"]             # aorta peaks arterial
  assert pv["portal"] > art["portal"] and pv["liver_vein"] > art["liver_vein"] + 100   # hepatic veins late
  assert art["kidney"] - art["medulla"] > 80 and abs(pv["kidney"] - pv["medulla"]) < 40   # CMD -> nephrographic
  assert dl["collecting"] > 400 and pv["collecting"] < 20                # excretion only when delayed
  assert art["lesion_hyper"] > art["liver"] + 40 and pv["lesion_hyper"] < pv["liver"]      # HCC: wash-in, wash-out
  assert pv["lesion"] < pv["liver"] - 30                                 # metastasis: hypodense
  assert art["pancreas"] > pv["pancreas"]
  with pytest.raises(ValueError, match="phase"):
    ct.enhancement("venous")


def test_patient_offsets_steatosis_and_enhancement_factor():
  lab = _tissue_rows(*NAMES)
  fatty = {"offsets": {"liver": -40.0}, "enhance": {"*": 0.7, "liver": 0.8}}
  pre, pre_f = _hu(lab, "portal", False), _hu(lab, "portal", False, fatty)
  assert pre_f["liver"] == pytest.approx(pre["liver"] - 40, abs=3) and pre_f["liver"] < pre_f["spleen"]
  pv, pv_f = _hu(lab, "portal"), _hu(lab, "portal", True, fatty)
  enh, enh_f = pv["liver"] - pre["liver"], pv_f["liver"] - pre_f["liver"]
  assert enh_f == pytest.approx(enh * 0.7 * 0.8, rel=0.1)


def _water_slab(shape=(4, 96, 96)):
  return np.full(shape, T["soft"], np.int8)


def test_noise_follows_dose_and_kernel():
  assert ct.noise_sd(50, 5, 300) == pytest.approx(2 * ct.noise_sd(200, 5, 300))
  assert ct.noise_sd(200, 1.25, 300) == pytest.approx(2 * ct.noise_sd(200, 5, 300))
  assert ct.noise_sd(200, 5, 400) > 2 * ct.noise_sd(200, 5, 300) > ct.noise_sd(200, 5, 250)
  lab = _water_slab()
  sd = {}
  corr = {}
  for kern in ct.KERNELS:
    img = physics.ct_image(lab, False, np.random.default_rng(1), spacing=(2.0, 0.4, 0.4), thickness=2.0,
                           noise_hu=None, mas=200, diameter_mm=300, kernel=kern, beam_hardening=0.0)
    n = img[:, 10:-10, 10:-10] - np.median(img)
    sd[kern] = float(n.std())
    corr[kern] = float(np.corrcoef(n[:, :, :-1].ravel(), n[:, :, 1:].ravel())[0, 1])
  assert sd["sharp"] > sd["standard"] > sd["soft"]
  assert corr["soft"] > corr["standard"] > corr["sharp"]                # coarser grain with softer kernels
  assert sd["standard"] == pytest.approx(ct.noise_sd(200, 2.0, 300), rel=0.35)


def test_streak_between_dense_bones():
  lab = _water_slab((2, 128, 128))
  yy, xx = np.mgrid[:128, :128]
  for cx in (30, 98):   # two femoral-head-sized bones 68 mm apart (1 mm pixels... x2)
    lab[:, (yy - 64) ** 2 + (xx - cx) ** 2 < 14 ** 2] = T["bone"]
  hu = np.zeros(lab.shape, np.float32)
  out, nmul = ct.beam_hardening(hu, lab, (2.0, 2.0, 2.0), np.random.default_rng(0))
  between, aside = out[:, 64, 55:73].mean(), out[:, 20, 55:73].mean()
  assert between < aside - 10 and nmul[:, 64, 64].min() > 1.1
  lab1 = _water_slab((2, 128, 128))
  lab1[:, (yy - 64) ** 2 + (xx - 30) ** 2 < 14 ** 2] = T["bone"]
  out1, _ = ct.beam_hardening(hu, lab1, (2.0, 2.0, 2.0), np.random.default_rng(0))
  assert out1[:, 64, 55:73].mean() > between + 10                      # one bone: no streak


def test_abdominal_fov_range():
  rng = np.random.default_rng(0)
  fovs = [ct.abdominal_fov(rng, hw, hd) for hw, hd in ((140, 100), (180, 125), (120, 90))]
  assert all(350 <= f <= 450 for f in fovs)
  assert ct.abdominal_fov(rng, 240, 160) > 450     # obese: 500 mm


# ------------------------------------------------------------------ LiTS set ---
def test_lits_masks_follow_tissue_truth():
  lab = np.array([[[T["liver"], T["liver_portal"], T["liver_vein"], T["lesion"], T["lesion_hyper"],
                    T["bile"], T["vein"], T["spleen"], T["kidney"]]]], np.int8)
  assert lits.masks(lab).ravel().tolist() == [1, 1, 1, 2, 2, 0, 0, 0, 0]


def test_lits_case_lesions_and_neighbours():
  """A small LiTS case: tumour truth where the lesions are; neighbours overlap the liver's HU."""
  found = False
  for case in range(3):
    hu, seg, _, info, (patient, _, grid, _) = lits.lits_case(3, case, small=True)
    assert info["tumour_voxels"] == int((seg == 2).sum())
    found |= bool(info["lesions"] and info["tumour_voxels"] > 20)
    lab = render_labels(patient, grid).transpose(2, 1, 0)
    np.testing.assert_array_equal(seg, lits.masks(lab))
    if case == 0:
      a, b = lits.lits_case(3, case, small=True)[:2]
      assert a.tobytes() == hu.tobytes() and b.tobytes() == seg.tobytes()   # deterministic by seed
  assert found


def _oblique_grid(rng, shape=(9, 14, 11)):
  from radnet_jax.phantom.shapes import _rot
  rot = _rot(rng, 40.0)
  return Grid(rng.uniform(-60, 0, 3), rot[:, 0], rot[:, 1], rot[:, 2], tuple(rng.uniform(1.5, 6.0, 3)), shape)


def test_grid_boxes_hold_every_voxel_of_each_box():
  """Grid.boxes (all paint shapes at once): each index box holds every voxel centre inside its world
  box, is no larger than the box of its corners, and agrees with the one-box ``Grid.box``."""
  rng = np.random.default_rng(3)
  for _ in range(4):
    g = _oblique_grid(rng)
    pts = g.points(((0, g.shape[0]), (0, g.shape[1]), (0, g.shape[2]))).astype(np.float64)
    lo = rng.uniform(-80, 40, (40, 3))
    hi = lo + rng.uniform(1, 60, (40, 3))
    start, stop = g.boxes(lo, hi)
    assert start.shape == stop.shape == (40, 3)
    hits = 0
    for n in range(40):
      inside = np.argwhere(np.all((pts >= lo[n]) & (pts <= hi[n]), -1))
      one = g.box(lo[n], hi[n])
      if (stop[n] <= start[n]).any():
        assert one is None and len(inside) == 0
        continue
      assert one == [(int(a), int(b)) for a, b in zip(start[n], stop[n])]
      if len(inside):
        hits += 1
        assert (inside >= start[n]).all() and (inside < stop[n]).all()
      corners = np.array([[x, y, z] for x in (lo[n, 0], hi[n, 0]) for y in (lo[n, 1], hi[n, 1])
                          for z in (lo[n, 2], hi[n, 2])])
      idx = g.index_of(corners)
      assert (start[n] >= np.maximum(np.floor(idx.min(0)), 0)).all()
      assert (stop[n] <= np.ceil(idx.max(0)) + 1).all()
    assert hits >= 5


def test_trunk_inside_matches_the_superellipse_formula():
  """Trunk.inside (its table gathers by np.take) equals the plain formula voxel for voxel."""
  from radnet_jax.phantom.shapes import Trunk, _pow
  p = make_patient(np.random.default_rng([5, 1]), 0)
  trunks = [s for s, _, _ in p.paint if isinstance(s, Trunk)]
  assert trunks and all((t.e, t.e_post) == (2.5, 3.0) for t in trunks)
  pts = np.random.default_rng(0).uniform([-250, -200, -900], [250, 200, 100], (200_000, 3)).astype(np.float32)
  for t in trunks:
    tab, z = t._tab, pts[:, 2]
    idx = np.clip((z - t.z[0] + 0.5).astype(np.int32), 0, tab.shape[1] - 1)
    u = np.abs((pts[:, 0] - tab[0][idx]) * tab[2][idx])
    dy = pts[:, 1] - tab[1][idx]
    v = np.abs(np.where(dy > 0, dy * tab[4][idx], dy * tab[3][idx]))
    f = np.where(dy > 0, _pow(u, 3.0) + _pow(v, 3.0), _pow(u, 2.5) + _pow(v, 2.5))
    ref = (f <= 1.0) & (z >= t.z[0]) & (z <= t.z[-1])
    got = t.inside(pts)
    assert 0.05 < ref.mean() < 0.95
    np.testing.assert_array_equal(got, ref)
