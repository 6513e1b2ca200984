"""Template heads: the stored map, per-patient deformation, head protocols, MR physics."""
import dataclasses

import numpy as np
import pytest

from radnet_jax.phantom import acquisition, head, physics, protocols
from radnet_jax.phantom.anatomy import T, TISSUES, Grid, make_patient, render_labels


def _sagittal(p, x=0.0, ps=2.0, n=(130, 110)):
  """One mid-sagittal slice through the head (rows inferior, columns posterior)."""
  return Grid(np.array([x, -110.0, p.z_vertex + 10]), np.array([0, 1.0, 0]), np.array([0, 0, -1.0]),
              np.array([-1.0, 0, 0]), (2.0, ps, ps), (1,) + n)


def test_template_map_and_attribution():
  tpl = head.template()
  lab = tpl["labels"]
  assert lab.dtype == np.uint8 and lab.ndim == 3 and float(tpl["spacing"]) == 1.5
  assert set(str(n) for n in tpl["names"]) <= set(TISSUES)
  names = [str(n) for n in tpl["names"]]
  vol_ml = lambda t: (lab == names.index(t)).sum() * 1.5 ** 3 / 1000
  assert 900 < vol_ml("gm") + vol_ml("wm") < 2000          # an adult brain (MNI is ~10 % large)
  assert 5 < vol_ml("vitreous") < 20                         # two globes of ~6.5 ml
  assert vol_ml("gas") > 30 and vol_ml("bone") > 200
  text = head.attribution()
  assert "ICBM152" in text and "Fonov" in text and "McGill" in text


def test_what_enhances_in_a_head_lies_outside_the_brain():
  """Dural sinuses, falx, choroid plexus, pituitary and the circle of Willis
  are in the map where anatomy puts them, and only they (not grey or white
  matter, behind the blood-brain barrier) brighten after contrast."""
  from radnet_jax.phantom import ct  # pylint: disable=g-import-not-at-top
  tpl = head.template()
  lab, names = tpl["labels"], [str(n) for n in tpl["names"]]
  vol_ml = lambda t: (lab == names.index(t)).sum() * 1.5 ** 3 / 1000
  assert 10 < vol_ml("vein") < 40 and 2 < vol_ml("artery") < 10 and 3 < vol_ml("dura") < 20
  x, y, z = (tpl["origin"][k] + np.arange(lab.shape[k]) * 1.5 for k in range(3))
  ix = lambda a, v: int(np.argmin(np.abs(a - v)))
  # Superior sagittal sinus: the highest intracranial voxel of the midline at the vertex is venous.
  col = lab[ix(x, 0.75), ix(y, -20.0)]
  inside = np.flatnonzero(np.isin(col, [names.index(n) for n in ("csf", "gm", "wm", "vein", "dura")]))
  assert names[col[inside.max()]] == "vein"
  # Choroid plexus sits in ventricular CSF of the atria.
  atrium = lab[ix(x, -27.0) - 3:ix(x, -27.0) + 4, ix(y, -40.0) - 3:ix(y, -40.0) + 4, ix(z, 14.0) - 3:ix(z, 14.0) + 4]
  assert (atrium == names.index("dura")).sum() > 10
  tissues = np.array([T["wm"], T["gm"], T["vein"], T["artery"], T["dura"]])
  for spin_echo in (False, True):   # spoiled GRE / MPRAGE, and spin-echo T1
    pre = physics.mr_signal(tissues, tr=500.0, te=12.0, spin_echo=spin_echo)
    post = physics.mr_signal(tissues, tr=500.0, te=12.0, gd=1.0, spin_echo=spin_echo)
    ratio = dict(zip(("wm", "gm", "vein", "artery", "dura"), post / pre))
    assert abs(ratio["wm"] - 1) < 1e-6 and abs(ratio["gm"] - 1) < 1e-6
    assert ratio["vein"] > 2.0 and ratio["artery"] > 2.0 and ratio["dura"] > 1.3
  # Spin echo: flowing blood is dark (flow void) on T2, while a gradient echo keeps it.
  t2 = dict(tr=4000.0, te=100.0)
  se = dict(zip(("wm", "gm", "vein", "artery", "dura"), physics.mr_signal(tissues, spin_echo=True, **t2)))
  gre = dict(zip(("wm", "gm", "vein", "artery", "dura"), physics.mr_signal(tissues, **t2)))
  csf = float(physics.mr_signal(np.array([T["csf"]]), spin_echo=True, **t2)[0])
  assert se["artery"] < 0.5 * se["wm"] and se["vein"] < 0.3 * csf and gre["vein"] > 2 * se["vein"]
  assert se["wm"] == gre["wm"]
  enh = ct.enhancement("portal")
  assert enh[T["vein"]] > 100 and enh[T["dura"]] > 30 and enh[T["gm"]] < 5 and enh[T["wm"]] < 5
  assert ct.enhancement("arterial")[T["artery"]] > 200


def test_each_patient_has_its_own_head_and_seed_fixes_it():
  a, b = (make_patient(np.random.default_rng([4, i, 1]), i) for i in (0, 1))
  a2 = make_patient(np.random.default_rng([4, 0, 1]), 0)
  la, la2 = render_labels(a, _sagittal(a)), render_labels(a2, _sagittal(a2))
  np.testing.assert_array_equal(la, la2)
  lb = render_labels(b, _sagittal(b))
  assert not np.array_equal(la, lb)
  for lab in (la, lb):   # a mid-sagittal head: brain, CSF, skull with diploe, sinuses or airway, cord
    present = {TISSUES[t] for t in np.unique(lab)}
    assert {"gm", "wm", "csf", "bone", "marrow", "gas", "cord", "skin", "fat", "muscle"} <= present
  # The brain lies below the vertex, inside the brain band; the face is anterior (-Y).
  k, i, j = np.nonzero(np.isin(la, [T["gm"], T["wm"]]))
  g = _sagittal(a)
  z = g.origin[2] - i * g.spacing[1]
  lo, hi = a.bands["brain"]
  assert lo - 2 <= z.min() and z.max() <= hi and hi == pytest.approx(a.z_vertex)
  assert a.bands["head"][1] == lo and a.bands["neck"][1] == a.bands["head"][0]


def test_eyes_are_anterior_and_paired():
  p = make_patient(np.random.default_rng(9))
  # An axial slab through the orbits: vitreous on both sides, in front of the brain.
  zs = np.arange(p.bands["brain"][0] - 10, p.bands["brain"][0] + 60, 4.0)
  best = None
  for z in zs:
    g = Grid(np.array([-100.0, -130.0, z]), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0]),
             (1.0, 2.0, 2.0), (1, 120, 100))
    lab = render_labels(p, g)[0]
    v = np.argwhere(lab == T["vitreous"])
    if len(v) and (best is None or len(v) > len(best[1])):
      best = (lab, v)
  lab, v = best
  cols = v[:, 1] * 2.0 - 100.0          # x mm (LPS: + = left)
  assert (cols < -10).sum() > 10 and (cols > 10).sum() > 10
  brain_rows = np.argwhere(np.isin(lab, [T["gm"], T["wm"]]))[:, 0]
  assert v[:, 0].mean() < brain_rows.mean()   # rows grow posterior: eyes in front


def _plans(pred, n=400, seed=0, full_size=False):
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < n:
    out += [p for p in protocols.plan_study(rng, full_size) if pred(p)]
  return out


def test_head_protocol_grids():
  rng = np.random.default_rng(1)
  p = make_patient(np.random.default_rng(2))
  t1 = _plans(lambda q: q.iso3d, 6)
  for plan in t1:
    g = acquisition.plan_grid(p, dataclasses.replace(plan), rng, max_slices=200)
    assert plan.plane == "SAG" and 160 <= g.shape[0] <= 193 and 0.9 <= g.spacing[0] <= 1.2
    assert 240 <= g.shape[2] * g.spacing[2] <= 258
  for plan in _plans(lambda q: q.modality == "MR" and q.region == "brain" and not q.iso3d and not q.epi, 20):
    g = acquisition.plan_grid(p, dataclasses.replace(plan), rng)
    assert 3.0 <= g.spacing[0] <= 6.0 and 190 <= g.shape[1] * g.spacing[1] <= 260
  for plan in _plans(lambda q: q.epi, 8):
    g = acquisition.plan_grid(p, dataclasses.replace(plan), rng)
    assert 2.0 <= g.spacing[0] <= 4.0 and 64 <= max(g.shape[1:]) <= 128
  for plan in _plans(lambda q: q.modality == "CT" and q.region == "brain" and not q.reformat, 6, full_size=True):
    g = acquisition.plan_grid(p, dataclasses.replace(plan), rng, max_slices=400)
    assert 0.39 <= g.spacing[1] <= 0.5 and 0.6 <= g.spacing[0] <= 5.0
  # Whole brain in the axial slab: the head's brain band lies inside the grid's z range.
  plan = _plans(lambda q: q.modality == "MR" and q.region == "brain" and q.plane == "AX" and not q.epi, 1)[0]
  lo, hi = acquisition.grid_z_range(acquisition.plan_grid(p, dataclasses.replace(plan, tilt_deg=0.0), rng))
  assert lo <= p.bands["brain"][0] + 12 and hi >= p.bands["brain"][1] - 2


def test_contrast_is_not_implied_by_sequence_and_plane():
  """Every MR (sequence, plane) that is acquired after gadolinium is also
  acquired without it, and studies pair post-contrast series with their
  pre-contrast twin, so no protocol prior tells the contrast state."""
  rng = np.random.default_rng(0)
  seen, twins, posts = {}, 0, 0
  for _ in range(1500):
    plans = [p for p in protocols.plan_study(rng) if p.modality == "MR"]
    keys = {(p.region, p.sequence, p.plane, p.contrast) for p in plans}
    for p in plans:
      seen.setdefault((p.region == "brain", p.sequence, p.plane), set()).add(p.contrast)
      if p.contrast == "yes":
        posts += 1
        twins += (p.region, p.sequence, p.plane, "no") in keys
  for key, states in seen.items():
    if "yes" in states:
      assert "no" in states, key
  assert {"yes", "no"} <= seen[(True, "T1", "AX")] and {"yes", "no"} <= seen[(True, "T1", "COR")]
  assert 0.3 < twins / posts < 0.9


def test_mr_field_strength_diffusion_and_randomisation():
  lab = np.array([T["csf"], T["wm"], T["gm"], T["fat"]], np.int8)
  # MPRAGE-like IR-GRE at 1.5 and 3 T: T1 contrast wm > gm > csf at both fields.
  for f in (1.5, 3.0):
    csf, wm, gm, fat = physics.mr_signal(lab, tr=2000, te=3, ti=900, field_t=f)
    assert wm > gm > csf
  assert physics.T1_3T[T["wm"]] > physics.T1[T["wm"]] and physics.T1_3T[T["gm"]] > physics.T1[T["gm"]]
  # b = 1000: CSF (free water) loses most of its signal, brain keeps more.
  b0 = physics.mr_signal(lab, tr=6000, te=80)
  b1 = physics.mr_signal(lab, tr=6000, te=80, b_value=1000)
  assert b1[0] / b0[0] < 0.1 < b1[1] / b0[1]
  big = np.repeat(lab, 400).reshape(4, 20, 20)
  kw = dict(spacing=(3.0, 1.0, 1.0), thickness=3.0, tr=500, te=12)
  plain = physics.mr_image(big, np.random.default_rng(0), **kw)
  again = physics.mr_image(big, np.random.default_rng(0), **kw)
  rand = physics.mr_image(big, np.random.default_rng(0), randomise=True, **kw)
  np.testing.assert_array_equal(plain, again)
  assert plain.shape == rand.shape and not np.allclose(plain, rand)


def test_forward_map_agrees_with_sampling():
  """Landmarks (bands, FOV centring) use the forward map; rendering the inverse: they must agree."""
  for seed in range(3):
    p = make_patient(np.random.default_rng([6, seed, 1]))
    h = p.head
    for u, tissue in (((32.0, 62.0, -44.0), "vitreous"), ((-32.0, 62.0, -44.0), "vitreous"),
                      ((0.0, -40.0, -110.0), "cord")):
      pt = h._forward_warped(np.array([u], np.float32), h.t)
      assert TISSUES[int(h.sample(pt)[0])] == tissue


def test_bold_epi_is_t2star_weighted_with_dropout_and_distortion():
  """Gradient-echo EPI (BOLD): T2* decay (dark deoxygenated veins, which a
  spin echo keeps), extra dephasing near air, displacement along the phase
  axis only, and a header whose sequence the labeller calls 'other' while
  its plane is known and its contrast never 'yes'."""
  from radnet_jax import labels
  from radnet_jax.phantom import corpus
  lab = np.array([T["gm"], T["wm"], T["vein"], T["csf"]], np.int8)
  kw = dict(tr=2500.0, te=30.0, field_t=3.0)
  se = physics.mr_signal(lab, **kw)
  gre = physics.mr_signal(lab, t2star=True, **kw)
  assert np.all(gre < se)
  assert gre[2] / gre[0] < 0.5 * se[2] / se[0]                # veins dark on BOLD
  r2 = np.full(lab.shape, 0.05, np.float32)                     # 50 /s more near air
  np.testing.assert_allclose(physics.mr_signal(lab, t2star=True, r2_extra=r2, **kw),
                             gre * np.exp(-30.0 * 0.05), rtol=1e-5)
  # A block of brain with an air pocket (a sinus) at one end.
  vol = np.full((6, 40, 30), T["gm"], np.int8)
  vol[:, :6] = T["air"]
  sp = (3.0, 3.0, 3.0)
  field = physics.susceptibility_field(vol, sp)
  assert field[3, 6, 15] > 0.2 > 0.01 > field[3, 30, 15]
  rng = np.random.default_rng(0)
  img = dict(spacing=sp, thickness=3.0, tr=2500.0, te=30.0, field_t=3.0, snr=1e6, bias=0.0)
  flat = physics.mr_image(vol, np.random.default_rng(0), **img)
  drop = physics.mr_image(vol, np.random.default_rng(0), t2star=True, **img)
  assert drop[3, 7, 15] / drop[3, 30, 15] < 0.8 * flat[3, 7, 15] / flat[3, 30, 15]
  # Distortion: none at shift 0; otherwise columns move, rows and slices do
  # not, and the signal is conserved (the Jacobian).
  ramp = np.broadcast_to(np.linspace(1.0, 2.0, 40, dtype=np.float32)[None, :, None], vol.shape).copy()
  np.testing.assert_array_equal(physics.epi_distort(ramp, field, sp, 0.0), ramp)
  moved = physics.epi_distort(ramp, field, sp, 8.0)
  assert np.abs(moved - ramp)[:, 6:14].max() > 0.02 and np.abs(moved - ramp)[:, 30:].max() < 0.02
  np.testing.assert_allclose(moved.std(axis=(0, 2)), 0.0, atol=1e-5)   # same in every slice and row
  assert abs(moved[:, 6:].sum() / ramp[:, 6:].sum() - 1.0) < 0.03
  # The protocol and its header.
  plans = [protocols._bold_plan("brain", v, rng, f) for v in protocols.VENDORS for f in (1.5, 3.0)]
  for p in plans:
    p.description = protocols.describe(p, rng)
    assert p.bold and p.sequence == "other" and p.contrast == "no" and 64 <= p.matrix <= 96
    assert 2000 <= p.tr <= 3000 and (25 <= p.te <= 35 if p.field_t == 3.0 else 40 <= p.te <= 50)
    tags = corpus.series_tags(p, rng)
    iop = {"AX": [1, 0, 0, 0, 1, 0], "COR": [1, 0, 0, 0, 0, -1], "SAG": [0, 1, 0, 0, 0, -1]}[p.plane]
    rec = dict(tags, Modality="MR", ImageOrientationPatient=iop)
    got = labels.label(rec)
    assert got["sequence"].value == labels.OTHER, (p.description, got["sequence"])
    # No contrast tag: "no" only when an (empty) agent tag is written, else unknown.
    assert got["plane"].value == p.plane and got["contrast"].value in ("no", None)
  studies = [protocols.plan_study(np.random.default_rng(s)) for s in range(600)]
  bold = [p for st in studies for p in st if p.bold]
  assert bold and all(p.region == "brain" for p in bold) and {p.plane for p in bold} == {"AX", "COR", "SAG"}


def test_template_lookup_reads_the_map_and_air_outside_it():
  """TemplateHead._lookup: the nearest voxel's tissue inside the stored map, air (0) outside it."""
  h = make_patient(np.random.default_rng([6, 0, 1])).head
  tpl = head.template()
  lab = tpl["labels"]
  rng = np.random.default_rng(1)
  ext = np.array(lab.shape) * float(tpl["spacing"])
  u = (h.origin + rng.uniform(-0.2, 1.2, (50_000, 3)) * ext).astype(np.float32)
  idx = np.rint((u - h.origin.astype(np.float32)) / np.float32(h.spacing)).astype(np.int64)
  ok = np.all((idx >= 0) & (idx < lab.shape), 1)
  ref = np.zeros(len(u), np.int8)
  ref[ok] = h.lut[lab[tuple(idx[ok].T)]]
  assert 0.2 < ok.mean() < 0.8 and len(np.unique(ref)) > 5
  np.testing.assert_array_equal(h._lookup(u), ref)
  np.testing.assert_array_equal(h._lookup(u.reshape(100, 500, 3)), ref.reshape(100, 500))


def test_head_coil_fades_the_neck_of_brain_mr_only():
  """Brain MR is received with a head coil that ends around C2: the same
  mid-sagittal T1 of one patient keeps the neck's soft tissue at its full
  signal on a head-neck protocol (a coil over the neck) and dims it to at
  most half of that on a brain protocol, relative to the scalp and face
  high above the chin, which keep their signal on both."""
  assert physics.head_coil_profile(np.array([0.0]), 0.0, 15.0, 0.2)[0] == pytest.approx(0.6)
  prof = physics.head_coil_profile(np.array([-200.0, -30.0, 0.0, 30.0, 200.0]), 0.0, 15.0, 0.2)
  assert np.all(np.diff(prof) > 0)
  assert prof[0] == pytest.approx(0.2, abs=1e-4) and prof[-1] == pytest.approx(1.0, abs=1e-4)
  plan = _plans(lambda q: q.modality == "MR" and q.region == "brain" and q.plane == "SAG" and q.sequence == "T1"
                and not q.iso3d, 1)[0]
  for seed in range(3):
    p = make_patient(np.random.default_rng([4, seed]))
    grid = _sagittal(p, n=(170, 110))
    lab = render_labels(p, grid)
    z = grid.points(tuple((0, n) for n in grid.shape))[..., 2]
    soft = np.isin(lab, [T["muscle"], T["fat"], T["skin"]])
    neck, face = soft & (z < p.head.z_chin - 40), soft & (z > p.head.z_chin + 120)
    assert neck.sum() > 100 and face.sum() > 100
    ratio = {}
    for region in ("brain", "headneck"):
      img = acquisition.simulate(p, dataclasses.replace(plan, region=region), grid, np.random.default_rng(seed))
      ratio[region] = float(np.median(img[neck]) / np.median(img[face]))
    assert ratio["brain"] < 0.6 * ratio["headneck"], (seed, ratio)
