r"""Plane, contrast and brain band on real head anatomy reformatted into every plane.

  python bench/real_reformats.py WORKDIR [--extra VOL.nii.gz ...] [--out-png reformats.png] [--keep DIR]

The real head scans that packages ship are all axial (``bench/real_heads.py``),
so they cannot say whether the network tells sagittal from coronal on real
anatomy, which is where the phantom-trained networks failed before (the
issue's real heads: axial and sagittal swapped). This script reslices the real
whole-head volumes into 2D stacks the way a scanner would acquire them in each
plane: a slice normal along R-L, A-P or S-I, straight or tilted 20 degrees
(oblique, as AC-PC or hippocampal angulations are), slices of ``--thickness``
mm with a box slice profile, in-plane voxels of ``--pixel`` mm on a 230 mm
field of view, covering the head along the normal. Each stack is written as a
NIfTI file with its true affine and read by ``radnet_jax.predict`` (pixels
only; the plane is never given to the model, the loader only puts the slice
axis first as it does for every series).

These are reformats, not acquisitions: the through-plane resolution of a
sagittal reformat of an axial EPI is the source's 5 mm, not the thin in-plane
resolution of a real sagittal acquisition, and the source's own slice profile
stays in it. What the check isolates is whether the network reads the plane
from real anatomy (profile, skull base, ventricles, brainstem) rather than
from cues only the phantom has.

Sources (whole heads only; a slab or a skull-less crop reformatted would show
anatomy no acquisition in that plane shows):

* dipy ``data/files/aniso_vox.nii.gz``: real diffusion b0 EPI, whole head,
  58 x 58 x 24 voxels of 4 x 4 x 5 mm, no contrast (needs dipy:
  ``pip install -r bench/requirements.txt``).

Truth: the plane of each reformat's slice normal (``dicom.geometry.plane_of``),
contrast "no" and band "brain" from the source.

``--extra`` reformats other volumes the same way, e.g. phantom series
converted with dcm2niix, as a control: an axial phantom stack reformatted to
sagittal or coronal shares the reformats' two differences from a real
acquisition in that plane (the source's through-plane blur along the new
in-plane axis, and an empty band where the source's coverage ends, often
above the neck that a sagittal or coronal field of view would hold), so
where the network fails on those too, the reformat, not the real anatomy, is
what it answers to. Extras are scored on plane only.
"""
from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import radnet_jax  # noqa: E402  pylint: disable=wrong-import-position
from radnet_jax.cli import flags  # noqa: E402  pylint: disable=wrong-import-position
from radnet_jax.dicom import geometry  # noqa: E402  pylint: disable=wrong-import-position

# (plane, slice normal, in-plane row direction, tilt axis) in RAS. A tilt
# turns the normal about the tilt axis, which stays in the slice plane.
_PLANES = {
    "AX": (np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0]), np.array([1.0, 0.0, 0.0])),
    "COR": (np.array([0.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0]), np.array([1.0, 0.0, 0.0])),
    "SAG": (np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0])),
}


def sources() -> list[tuple[str, str, dict]]:
  """(name, NIfTI path, truth) of the real whole-head volumes available."""
  out = []
  try:
    import dipy  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("dipy is not installed: no real whole-head volume (pip install -r bench/requirements.txt)")
  else:
    out.append(("dipy aniso_vox b0 EPI",
                os.path.join(os.path.dirname(dipy.__file__), "data", "files", "aniso_vox.nii.gz"),
                dict(contrast="no", band="brain")))
  return out


def _rotate(v: np.ndarray, axis: np.ndarray, deg: float) -> np.ndarray:
  a = np.deg2rad(deg)
  axis = axis / np.linalg.norm(axis)
  return (v * np.cos(a) + np.cross(axis, v) * np.sin(a) + axis * (axis @ v) * (1 - np.cos(a)))


def reformat(data: np.ndarray, affine: np.ndarray, plane: str, tilt_deg: float, *,
             thickness: float, pixel: float, fov: float = 230.0, profile_samples: int = 5
             ) -> tuple[np.ndarray, np.ndarray]:
  """Reslices a volume (RAS ``affine``) into a stack in ``plane``.

  Returns ``(I, J, K)`` voxels (K = slices) and their RAS affine. The stack is
  centred on the head (voxels above 10% of the 99th percentile) and its
  slices span the head's extent along the normal.
  """
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  normal, row, tilt_axis = (v.copy() for v in _PLANES[plane])
  normal, row = _rotate(normal, tilt_axis, tilt_deg), _rotate(row, tilt_axis, tilt_deg)
  col = np.cross(normal, row)
  head = np.argwhere(data > 0.1 * np.percentile(data, 99))
  world = head @ affine[:3, :3].T + affine[:3, 3]
  centre = world.mean(0)
  along = (world - centre) @ normal
  n_slices = max(int(np.ceil((along.max() - along.min()) / thickness)), 1)
  n_pix = int(round(fov / pixel))
  i = (np.arange(n_pix) - (n_pix - 1) / 2) * pixel
  k0 = (along.max() + along.min()) / 2
  k = k0 + (np.arange(n_slices) - (n_slices - 1) / 2) * thickness
  # Box slice profile: the mean of samples spread over the slice thickness.
  sub = (np.arange(profile_samples) - (profile_samples - 1) / 2) * thickness / profile_samples
  pts = (centre[None, None, None, None] + i[:, None, None, None, None] * row
         + i[None, :, None, None, None] * col
         + (k[None, None, :, None, None] + sub[None, None, None, :, None]) * normal)
  inv = np.linalg.inv(affine)
  vox = pts @ inv[:3, :3].T + inv[:3, 3]
  vals = ndimage.map_coordinates(data.astype(np.float32), vox.reshape(-1, 3).T, order=1,
                                 mode="constant", cval=0.0)
  out = vals.reshape(n_pix, n_pix, n_slices, profile_samples).mean(-1)
  origin = centre + i[0] * row + i[0] * col + k[0] * normal
  aff = np.eye(4)
  aff[:3, 0], aff[:3, 1], aff[:3, 2], aff[:3, 3] = row * pixel, col * pixel, normal * thickness, origin
  return out.astype(np.float32), aff


def main(argv=None) -> None:
  ap = flags.Parser(description=__doc__.split("\n")[0])
  ap.add_argument("workdir", help="pretraining run workdir (or checkpoint)")
  ap.add_argument("--thickness", type=float, default=5.0, help="slice thickness and spacing, mm")
  ap.add_argument("--pixel", type=float, default=3.6, help="in-plane voxel, mm")
  ap.add_argument("--tilts", default="0,20,-20", help="tilts of the slice normal, degrees")
  ap.add_argument("--extra", nargs="*", default=[], help="more NIfTI volumes to reformat (plane only)")
  ap.add_argument("--keep", default="", help="write the reformats here (default: a temporary folder)")
  ap.add_argument("--out-png", default="", help="draw the model inputs of the reformats")
  args = ap.parse_args(argv)
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  loaded = radnet_jax.load(args.workdir)
  tilts = [float(t) for t in args.tilts.split(",")]
  rows, inputs = [], []
  with tempfile.TemporaryDirectory() as tmp:
    out_dir = args.keep or tmp
    os.makedirs(out_dir, exist_ok=True)
    extras = [(os.path.basename(p), p, {}) for p in args.extra]
    for name, path, truth in sources() + extras:
      img = nib.load(path)
      data = np.asarray(img.dataobj, np.float32)
      if data.ndim == 4:   # a multi-volume series: its first volume
        data = data[..., 0]
      for plane in _PLANES:
        for tilt in tilts:
          vox, aff = reformat(data, img.affine, plane, tilt, thickness=args.thickness, pixel=args.pixel)
          true_plane = geometry.plane_of(aff[:3, 2])  # sign-free: RAS or LPS alike
          f = os.path.join(out_dir, f"{len(rows):03d}_{plane}_{tilt:+.0f}.nii.gz")
          nib.save(nib.Nifti1Image(vox, aff), f)
          rep = radnet_jax.predict(loaded, f, keep_inputs=True, modality="MR")
          r = rep.rows[0]
          inputs.append((f"{name[:24]} {plane} {tilt:+.0f}", next(iter(rep.inputs.values()))))
          rows.append((name, plane, tilt, vox.shape, dict(truth, plane=true_plane), r))
  print(f"checkpoint {args.workdir}; slices {args.thickness} mm, pixels {args.pixel} mm")
  print("| source | reformat | voxels (I, J, slices) | truth | plane | sequence | contrast | coverage bands | brain p |")
  print("|---|---|---|---|---|---|---|---|---|")
  hits: dict = {}
  for name, plane, tilt, shape, truth, r in rows:
    bands = str(r.get("pred_coverage", ""))
    ok = {"plane": r.get("pred_plane") == truth["plane"]}
    if "contrast" in truth:
      ok["contrast"] = r.get("pred_contrast") == truth["contrast"]
    if "band" in truth:
      ok["band"] = truth["band"] in bands.split("|")
    for k, v in list(ok.items()) + [(f"plane {truth['plane']}", ok["plane"])]:
      h = hits.setdefault((name, k), [0, 0])
      h[0] += v
      h[1] += 1
    t = ", ".join(truth[k] for k in ("plane", "contrast", "band") if k in truth)
    print(f"| {name} | {plane} tilt {tilt:+.0f} | {shape} | {t} | "
          f"{r.get('pred_plane')} ({r.get('prob_plane', float('nan')):.2f}) | {r.get('pred_sequence')} | "
          f"{r.get('pred_contrast')} ({r.get('prob_contrast', float('nan')):.2f}) | {bands} | "
          f"{float(r.get('p_coverage_brain', float('nan'))):.2f} |")
  for src in dict.fromkeys(n for n, _ in hits):
    print(f"correct, {src}: " + ", ".join(f"{k} {a}/{b}" for (n, k), (a, b) in hits.items() if n == src))
  if args.out_png:
    import real_heads  # pylint: disable=g-import-not-at-top  (bench/ is this script's folder)
    real_heads.draw_inputs(inputs, args.out_png)


if __name__ == "__main__":
  main()
