"""Figure of one phantom patient across sequences, contrast states and planes.

  python -m data_prep.phantom_figure --out docs/phantom.png [--seed 0]

Rows: CT, CT + contrast, T1, T1 + gadolinium, T2, T1-FLAIR, T2-FLAIR, PET;
columns: axial brain, axial upper abdomen, coronal and sagittal mid-slices.
Images are simulated directly on single-slice grids with the corpus physics.

Below, phantom vs real: public real scans that pydicom, pydicom-data and
nibabel ship (top) next to a phantom slice on the same geometry (pixel
spacing, field of view, orientation incl. gantry tilt, at the matching
anatomical level of the phantom's template head), in the same windows
(CT: the real file's own window centre / width; MR: the 0.5-99.5 %
percentiles of each image, as the model's normalisation).
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from radnet_jax.phantom import physics  # noqa: E402
from radnet_jax.phantom.anatomy import Grid, make_patient, render_labels  # noqa: E402
from radnet_jax.cli import flags

ROWS = (("CT", dict(modality="CT", contrast=False)), ("CT +C", dict(modality="CT", contrast=True)),
        ("T1", dict(tr=500, te=12)), ("T1 +Gd", dict(tr=500, te=12, gd=1.0)),
        ("T2", dict(tr=4000, te=100)), ("T1-FLAIR", dict(tr=2000, te=12, ti=800)),
        ("T2-FLAIR", dict(tr=9000, te=120, ti=2370)), ("PET", dict(modality="PT")))


def _grids(p, ps: float = 2.0) -> list:
  zv = p.z_vertex
  ax = lambda z: Grid(np.array([-128 * ps / 2, -128 * ps / 2, z]), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]),
                      np.array([0, 0, 1.0]), (5.0, ps, ps), (1, 128, 128))
  h = int(round(1000 / 2.5))
  cor = Grid(np.array([-200.0, 10.0, zv + 10]), np.array([1.0, 0, 0]), np.array([0, 0, -1.0]),
             np.array([0, 1.0, 0]), (5.0, 2.5, 2.5), (1, h, 160))
  sag = Grid(np.array([0.0, -160.0, zv + 10]), np.array([0, 1.0, 0]), np.array([0, 0, -1.0]),
             np.array([-1.0, 0, 0]), (5.0, 2.5, 2.5), (1, h, 128))
  return [ax(zv - 60), ax(p.bands["liver"][1] - 60), cor, sag]


def _image(lab, grid, kw, rng):
  kw = dict(kw)
  mod = kw.pop("modality", "MR")
  if mod == "CT":
    return np.clip((physics.ct_image(lab, kw["contrast"], rng, spacing=grid.spacing, thickness=3.0) + 160) / 400, 0, 1)
  if mod == "PT":
    u = physics.pet_image(lab, rng, spacing=(7.0, *grid.spacing[1:]))
    return 1 - np.clip(u / 8.0, 0, 1)   # inverted grey, as PET is read
  # The rows are spin-echo / FSE / FLAIR sequences: flowing blood is a flow void.
  img = physics.mr_image(lab, rng, spacing=grid.spacing, thickness=3.0, spin_echo=True, **kw)
  return np.clip(img / np.percentile(img, 99.5), 0, 1)


def _real_pairs(patient, rng) -> list:
  """(title, real image, phantom image) pairs, windowed to [0, 1]."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  import pydicom  # pylint: disable=g-import-not-at-top
  from pydicom.data import get_testdata_file  # pylint: disable=g-import-not-at-top
  head = patient.head
  pct = lambda a: np.clip((a - np.percentile(a, 0.5)) / max(np.percentile(a, 99.5) - np.percentile(a, 0.5), 1e-6), 0, 1)
  win = lambda a, c, w: np.clip((a - (c - w / 2)) / w, 0, 1)

  def grid_at(centre, r, c, ps, shape, dz=5.0):
    r, c = np.asarray(r, float), np.asarray(c, float)
    origin = np.asarray(centre, float) - (shape[0] - 1) / 2 * ps[0] * c - (shape[1] - 1) / 2 * ps[1] * r
    return Grid(origin, r, c, np.cross(r, c), (dz, ps[0], ps[1]), (1,) + tuple(shape))

  out = []
  for name, level, title in (("693_UNCR.dcm", (0, -10, 18), "head CT 5 mm"),
                             ("J2K_pixelrep_mismatch.dcm", (0, 0, -38), "head CT, tilt")):
    ds = pydicom.dcmread(get_testdata_file(name))
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    wc, ww = (float(v[0]) if isinstance(v, pydicom.multival.MultiValue) else float(v)
              for v in (ds.WindowCenter, ds.WindowWidth))
    iop = np.array(ds.ImageOrientationPatient, float)
    ps = [float(v) for v in ds.PixelSpacing]
    shape = (int(ds.Rows) // 2, int(ds.Columns) // 2)
    g = grid_at(head.to_patient(level), iop[:3], iop[3:], (ps[0] * 2, ps[1] * 2), shape)
    ph = physics.ct_image(render_labels(patient, g), False, rng, spacing=g.spacing, thickness=5.0)[0]
    out.append((title, win(hu, wc, ww), win(ph, wc, ww)))
  data = os.path.join(os.path.dirname(nib.__file__), "tests", "data")
  epi = np.asarray(nib.load(os.path.join(data, "example4d.nii.gz")).dataobj)[..., 0].astype(np.float32)
  g = grid_at(head.to_patient((0, -5, 12)), (1, 0, 0), (0, 1, 0), (2.0, 2.0), (96, 128), dz=2.2)
  # nibabel's example4d is a BOLD run: gradient-echo EPI, as the corpus's fMRI protocol.
  ph = physics.mr_image(render_labels(patient, g), rng, spacing=g.spacing, thickness=2.2, tr=2500, te=30,
                        fat_sat=True, snr=40, field_t=3.0, t2star=True, epi_shift_mm=6.0)[0]
  out.append(("BOLD EPI axial", pct(epi[:, ::-1, 12].T), pct(ph)))
  anat = np.asarray(nib.load(os.path.join(data, "anatomical.nii")).dataobj).astype(np.float32)
  g = grid_at(head.to_patient((0, 0, 8)), (1, 0, 0), (0, 1, 0), (2.0, 2.0), (41, 33), dz=2.0)
  ph = physics.mr_image(render_labels(patient, g), rng, spacing=g.spacing, thickness=2.0, tr=500, te=12,
                        spin_echo=True)[0]
  out.append(("T1 crop", pct(anat[:, ::-1, 12].T), pct(ph)))
  ds = pydicom.dcmread(get_testdata_file("examples_overlay.dcm"))
  ps = float(ds.PixelSpacing[0])
  g = grid_at([0, 10, np.mean(patient.bands["kidney"])], (1, 0, 0), (0, 1, 0), (ps * 2, ps * 2),
              (int(ds.Rows) // 2, int(ds.Columns) // 2))
  ph = physics.mr_image(render_labels(patient, g), rng, spacing=g.spacing, thickness=4.0, tr=500, te=4,
                        fat_sat=True)[0]
  out.append(("abdomen T1 FS", pct(ds.pixel_array.astype(np.float32)), pct(ph)))
  return out


def main(argv=None) -> None:
  ap = flags.Parser(description=__doc__, formatter_class=flags.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default="docs/phantom.png")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  patient = make_patient(np.random.default_rng([args.seed, 7]), lesions=2)
  grids = _grids(patient)
  labs = [render_labels(patient, g) for g in grids]
  rng = np.random.default_rng(args.seed)
  widths = [1, 1, 0.6, 0.5]
  pairs = _real_pairs(patient, np.random.default_rng([args.seed, 3]))
  fig = plt.figure(figsize=(7.2, 1.75 * len(ROWS) + 3.2), layout="constrained")
  top, bottom = fig.subfigures(2, 1, height_ratios=[1.75 * len(ROWS), 3.2])
  axes = top.subplots(len(ROWS), 4, gridspec_kw={"width_ratios": widths})
  low = bottom.subplots(2, len(pairs))
  for c, (title, real, ph) in enumerate(pairs):
    for r, img in enumerate((real, ph)):
      low[r, c].imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
      low[r, c].set_xticks([]), low[r, c].set_yticks([])
    low[0, c].set_title(title, fontsize=7)
  low[0, 0].set_ylabel("real", fontsize=9)
  low[1, 0].set_ylabel("phantom", fontsize=9)
  bottom.suptitle("phantom vs real scans shipped by pydicom-data, pydicom, nibabel (same geometry, same windows)",
                  fontsize=8)
  for r, (name, kw) in enumerate(ROWS):
    for c, (lab, g) in enumerate(zip(labs, grids)):
      a = axes[r, c]
      a.imshow(_image(lab, g, kw, rng)[0], cmap="gray", vmin=0, vmax=1, aspect="equal", interpolation="bilinear")
      a.set_xticks([]), a.set_yticks([])
      if c == 0:
        a.set_ylabel(name, fontsize=9)
      if r == 0:
        a.set_title(("AX brain", "AX abdomen", "COR", "SAG")[c], fontsize=9)
  top.suptitle(f"RadNet-JAX phantom (patient: {patient.sex}, {patient.height:.0f} mm)", fontsize=10)
  fig.savefig(args.out, dpi=80)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
