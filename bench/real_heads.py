r"""The pretraining checkpoint on the real head scans that ship with packages.

  python bench/real_heads.py WORKDIR [--inputs-png out.png] [--phantom DIR]

Runs ``radnet_jax.predict`` (pixels only: the model input is the canonical
array of the series, no header value) on every real head scan that nibabel,
pydicom and pydicom-data ship and that the ingestion turns into a volume,
and prints one row each: what the scan is (from its own documentation /
headers, read here, never by the model), and the network's sequence, plane,
contrast and coverage bands with their probabilities.

The scans (all public test data of those packages):

* nibabel ``nicom/tests/data/philips_mprage.dcm.gz``: a Philips 3D T1 TFE
  (MPRAGE-like), sagittal, 176 x 256 x 256, no contrast. **Its pixel data
  are all zero** (a header-only test file: 41 KB gzip for 23 MB of frames),
  so what the network says about it is its answer to a blank volume.
* nibabel ``tests/data/example4d.nii.gz`` (first frame written to a 3D file):
  a real BOLD EPI of a head, 24 oblique axial slices of 2.2 mm, 128 x 96.
* nibabel ``tests/data/anatomical.nii``: a real T1 crop of a brain (33 x 41
  x 25 voxels of 2 mm, axial slices; the ventricles and basal ganglia).
* dipy ``data/files/aniso_vox.nii.gz`` (when dipy is installed:
  ``pip install -r bench/requirements.txt``): a real diffusion b0 EPI of a
  whole head, 58 x 58 x 24 voxels of 4 x 4 x 5 mm, slices oblique axial
  (normal 35 degrees from S towards A, as its affine says), no contrast.
* dipy ``data/files/S0_10slices.nii.gz``: a real diffusion b0 EPI slab, 10
  axial slices through the ventricles, 128 x 128 voxels of 2 mm. Its header's
  slice column is sheared, (30, 30, 32) mm, so the script writes the pixels
  with a plain axial affine (2 x 2 mm, 4 mm slices); the model input is
  resized to a fixed shape and never sees spacing, and the slice axis stays
  the file's third, so only the header's nonsense is replaced.
  dipy's ``test_piesno`` is left out: one slice under 14 noise draws, not a
  volume. ``ascm_out_test`` is ``aniso_vox`` denoised, the same scan.

With ``--inputs-png`` the model inputs (mid-slices of D, H and W) of the
real scans are drawn next to phantom series of the same kind from the
corpus under ``--phantom`` (a phantom corpus folder with ``dicom/``), to
compare what the network sees.
"""
from __future__ import annotations

import gzip
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import radnet_jax  # noqa: E402  pylint: disable=wrong-import-position
from radnet_jax.cli import flags  # noqa: E402  pylint: disable=wrong-import-position


def _nibabel_data() -> tuple[str, str]:
  import nibabel  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(nibabel.__file__)
  return os.path.join(root, "nicom", "tests", "data"), os.path.join(root, "tests", "data")


def real_inputs(tmp: str) -> list[tuple[str, str, dict]]:
  """(name, path, truth) of the real scans, staged into ``tmp``."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  nicom, tests = _nibabel_data()
  out = []
  d = os.path.join(tmp, "mprage")
  os.makedirs(d)
  with gzip.open(os.path.join(nicom, "philips_mprage.dcm.gz")) as f, open(os.path.join(d, "mprage.dcm"), "wb") as g:
    shutil.copyfileobj(f, g)
  out.append(("nibabel philips_mprage (blank pixels)", d,
              dict(sequence="T1", plane="SAG", contrast="no", band="brain", modality="MR")))
  img = nib.load(os.path.join(tests, "example4d.nii.gz"))
  p = os.path.join(tmp, "example4d_frame0.nii.gz")
  nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., 0], img.affine), p)
  # BOLD fMRI is never acquired after gadolinium.
  out.append(("nibabel example4d (real EPI, axial)", p, dict(plane="AX", contrast="no", band="brain", modality="MR")))
  out.append(("nibabel anatomical (real T1 crop, axial)", os.path.join(tests, "anatomical.nii"),
              dict(sequence="T1", plane="AX", band="brain", modality="MR")))
  try:
    import dipy  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("dipy is not installed: its real head scan is left out (pip install -r bench/requirements.txt)")
  else:
    files = os.path.join(os.path.dirname(dipy.__file__), "data", "files")
    out.append(("dipy aniso_vox (real b0 EPI, oblique axial)", os.path.join(files, "aniso_vox.nii.gz"),
                dict(plane="AX", contrast="no", band="brain", modality="MR")))
    src = nib.load(os.path.join(files, "S0_10slices.nii.gz"))
    aff = np.diag([2.0, 2.0, 4.0, 1.0])
    aff[:3, 3] = src.affine[:3, 3]
    p = os.path.join(tmp, "S0_10slices.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj, np.float32)[..., 0], aff), p)
    out.append(("dipy S0_10slices (real b0 EPI slab, axial)", p,
                dict(plane="AX", contrast="no", band="brain", modality="MR")))
  return out


def main(argv=None) -> None:
  ap = flags.Parser(description=__doc__.split("\n")[0])
  ap.add_argument("workdir", help="pretraining run workdir (or checkpoint)")
  ap.add_argument("--inputs-png", default="")
  ap.add_argument("--phantom", default="", help="phantom corpus folder for the side-by-side inputs")
  args = ap.parse_args(argv)
  loaded = radnet_jax.load(args.workdir)
  rows, arrays = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for name, path, truth in real_inputs(tmp):
      rep = radnet_jax.predict(loaded, path, keep_inputs=True, modality=truth.get("modality"))
      if not rep.rows:
        rows.append((name, truth, None, rep.skipped[0].reason if rep.skipped else "no stack"))
        continue
      r = rep.rows[0]
      arrays.append((name, next(iter(rep.inputs.values()))))
      rows.append((name, truth, r, ""))
  print(f"checkpoint {args.workdir}")
  print("| scan | truth | sequence | plane | contrast | coverage bands | brain p |")
  print("|---|---|---|---|---|---|---|")
  hits = {"plane": [0, 0], "sequence": [0, 0], "contrast": [0, 0], "band": [0, 0]}
  for name, truth, r, why in rows:
    t = ", ".join(f"{k} {v}" for k, v in truth.items() if k != "modality")
    if r is None:
      print(f"| {name} | {t} | skipped: {why} | | | | |")
      continue
    get = lambda k: r.get(f"pred_{k}", "")
    prob = lambda k: r.get(f"prob_{k}", float("nan"))
    bands = str(r.get("pred_coverage", ""))
    print(f"| {name} | {t} | {get('sequence')} ({prob('sequence'):.2f}) | {get('plane')} ({prob('plane'):.2f}) | "
          f"{get('contrast')} ({prob('contrast'):.2f}) | {bands} | {float(r.get('p_coverage_brain', float('nan'))):.2f} |")
    for k in ("plane", "sequence", "contrast"):
      if k in truth:
        hits[k][1] += 1
        hits[k][0] += get(k) == truth[k]
    hits["band"][1] += 1
    hits["band"][0] += truth["band"] in bands.split("|")
  print("correct: " + ", ".join(f"{k} {a}/{b}" for k, (a, b) in hits.items()))
  if args.inputs_png:
    _figure(arrays, args.phantom, args.inputs_png, loaded)


def _figure(arrays, phantom: str, out: str, loaded) -> None:
  items = list(arrays)
  if phantom:
    rep = radnet_jax.predict(loaded, os.path.join(phantom, "dicom"), keep_inputs=True)
    want = [("SAG", "T1"), ("AX", "T1"), ("AX", "T2-FLAIR"), ("COR", "T2")]
    for pl, seq in want:
      for r in rep.rows:
        if r.get("label_plane") == pl and r.get("label_sequence") == seq and "brain" in str(r.get("label_coverage")):
          items.append((f"phantom {seq} {pl}", rep.inputs[r["stack_key"]]))
          break
  draw_inputs(items, out)


def draw_inputs(items: list, out: str) -> None:
  """Mid-slices of D, H and W of each (name, model input) as one PNG row."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(len(items), 3, figsize=(6.6, 2.3 * len(items)), squeeze=False)
  for row, (name, v) in enumerate(items):
    for a, img in enumerate((v[v.shape[0] // 2], v[:, v.shape[1] // 2], v[:, :, v.shape[2] // 2])):
      ax[row, a].imshow(img, cmap="gray", vmin=0, vmax=max(float(v.max()), 1e-6), aspect="auto")
      ax[row, a].set_title(f"{name[:34]} {'DHW'[a]} mid", fontsize=6)
      ax[row, a].axis("off")
  fig.tight_layout()
  fig.savefig(out, dpi=80)

if __name__ == "__main__":
  main()
