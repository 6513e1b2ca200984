"""Figure of one phantom patient across sequences, contrast states and planes.

  python -m data_prep.phantom_figure --out docs/phantom.png [--seed 0]

Rows: CT, CT + contrast, T1, T1 + gadolinium, T2, T1-FLAIR, T2-FLAIR, PET;
columns: axial brain, axial upper abdomen, coronal and sagittal mid-slices.
Images are simulated directly on single-slice grids with the corpus physics.
"""
from __future__ import annotations


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
  img = physics.mr_image(lab, rng, spacing=grid.spacing, thickness=3.0, **kw)
  return np.clip(img / np.percentile(img, 99.5), 0, 1)


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
  fig, axes = plt.subplots(len(ROWS), 4, figsize=(7.2, 2.2 * len(ROWS)), gridspec_kw={"width_ratios": widths})
  for r, (name, kw) in enumerate(ROWS):
    for c, (lab, g) in enumerate(zip(labs, grids)):
      a = axes[r, c]
      a.imshow(_image(lab, g, kw, rng)[0], cmap="gray", vmin=0, vmax=1, aspect="equal", interpolation="bilinear")
      a.set_xticks([]), a.set_yticks([])
      if c == 0:
        a.set_ylabel(name, fontsize=9)
      if r == 0:
        a.set_title(("AX brain", "AX abdomen", "COR", "SAG")[c], fontsize=9)
  fig.suptitle(f"RadNet-JAX phantom (patient: {patient.sex}, {patient.height:.0f} mm)", fontsize=10)
  fig.tight_layout()
  fig.savefig(args.out, dpi=80)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
