"""How many of dcm2niix's 3D volumes the project reproduces, per folder.

  python bench/vs_dcm2niix.py DIR... [--phantoms OUT] [--project ROOT] \
      [--min-slices 3] [--json OUT.json]

For every DIR: ``dcm2niix -z n -b n -p n`` (the DICOM standard's rescale, as
ours) and, in a fresh process, ``radnet_jax.dicom.scan`` + ``load_volume`` on
every stack; each of dcm2niix's 3D volumes (each volume of a 4D file; a
``_Tilt`` / ``_Eq`` companion replaces the file it corrects) is matched
against our volumes with ``radnet_jax.dicom.reference.compare``: the same
grid up to axis order and flips, voxels equal, or within interpolation error
for tilt / equidistant resampling (see that module for ``fence_post`` and
``origin``). dcm2niix volumes with fewer than ``--min-slices`` along every
axis are counted apart (2D images, localizers, 2-slice stacks: the project
skips those by design, with a reason), as are RGB files (screenshots,
colour secondary captures: not grey-level cross-sections) and non-image
objects and localizers that dcm2niix converts anyway (SEG, RT dose, ...;
the project reads SEGs as labels, ``dicom.seg``): dcm2niix names each volume
after its first file (``-f %b_%s``), and the project's skip reason for that
file tells.

Prints per folder: dcm2niix's volumes, reproduced (how), not reproduced with
the nearest mismatch, what the project skipped and why (reason counts), the
wall time of both whole commands; then a total.

``--phantoms OUT`` first writes the phantom's layouts (CT geometry and
anonymised headers from ``radnet_jax.phantom.geometry_layouts``; the
multi-volume MR layouts from ``radnet_jax.phantom.layouts`` where that
module exists) under OUT, one folder per style, and adds them to DIR...
``--project ROOT`` runs the project's conversion from another checkout (for a
before / after figure); the comparison always uses this checkout's
``radnet_jax.dicom.reference``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

# Skip reasons (prefixes) of files the project leaves out on purpose.
DESIGN_SKIPS = ("non-image object", "localizer", "DICOMDIR")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if "--worker" not in sys.argv:  # a worker converts with --project's checkout
  sys.path.insert(0, ROOT)


def _worker(src: str, out: str) -> None:
  """In a fresh process (PYTHONPATH = the project): scan + load every stack
  of ``src``; volumes to ``out/vol_<k>.npz``, the rest to summary.json."""
  import warnings
  warnings.simplefilter("ignore")
  from radnet_jax import dicom  # pylint: disable=import-outside-toplevel
  os.makedirs(out, exist_ok=True)
  res = dicom.scan(src, salt="bench")
  errors, n = [], 0
  for stack in res.stacks:
    try:
      vol = dicom.load_volume(stack)
    except dicom.DicomError as e:
      errors.append(e.reason)
      continue
    except Exception as e:  # noqa: BLE001 - a crash is what we want to count
      errors.append(f"CRASH {type(e).__name__}: {e}")
      continue
    np.savez(os.path.join(out, f"vol_{n}.npz"), voxels=vol.voxels, affine=vol.affine)
    n += 1
  json.dump({"volumes": n, "load_errors": errors,
             "skipped": [k.reason for k in res.skipped],
             "skipped_files": [(k.path, k.reason) for k in res.skipped]},
            open(os.path.join(out, "summary.json"), "w"))


def _ours(src: str, out: str, project: str) -> tuple[dict, float, list]:
  env = dict(os.environ, PYTHONPATH=project, OMP_NUM_THREADS="1",
             OPENBLAS_NUM_THREADS="1")
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", src, out],
                        env=env, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    return ({"volumes": 0, "load_errors": [f"CRASH: {proc.stderr.strip()[-300:]}"],
             "skipped": [], "skipped_files": []}, wall, [])
  summary = json.load(open(os.path.join(out, "summary.json")))
  vols = []
  for k in range(summary["volumes"]):
    z = np.load(os.path.join(out, f"vol_{k}.npz"))
    vols.append((z["voxels"], z["affine"]))
  return summary, wall, vols


def _short(reason: str) -> str:
  """A skip reason without the per-file details (numbers, paths)."""
  import re  # pylint: disable=import-outside-toplevel
  text = re.sub(r"\(\d[^)]*\)", "(..)", reason)
  text = re.sub(r"\d+(\.\d+)?", "N", text)
  return text[:110]


def compare_folder(src: str, work: str, project: str, min_slices: int) -> dict:
  from radnet_jax.dicom import reference  # pylint: disable=import-outside-toplevel
  nii = os.path.join(work, "nii")
  t0 = time.perf_counter()
  proc = reference.run_dcm2niix(src, nii)
  d_wall = time.perf_counter() - t0
  refs = reference.reference_volumes(nii)
  summary, o_wall, vols = _ours(src, os.path.join(work, "ours"), project)
  # dcm2niix names each volume after its first DICOM file (-f %b_%s): a
  # volume from a file the project skips on purpose (non-image objects such
  # as SEG or RT dose, localizers) is counted apart, with the reason.
  skipped_by_name = {os.path.basename(p): why for p, why in summary["skipped_files"]}
  by_design, kept = collections.Counter(), []
  for r in refs:
    src_name = max((b for b in skipped_by_name if r.name.startswith(b + "_")),
                   key=len, default=None)
    why = skipped_by_name.get(src_name, "")
    if why.startswith(DESIGN_SKIPS):
      by_design[_short(why)] += 1
    else:
      kept.append(r)
  refs = kept
  colour = [r for r in refs if r.colour]
  grey = [r for r in refs if not r.colour]
  flat = [r for r in grey if min(r.voxels.shape) < min_slices]
  three_d = [r for r in grey if min(r.voxels.shape) >= min_slices]
  used: set[int] = set()
  how = collections.Counter()
  missed = []
  for ref in three_d:
    chosen, nearest = None, None
    for k, (vox, aff) in enumerate(vols):
      if k in used:
        continue
      m = reference.compare(vox, aff, ref)
      if m.reproduced:
        chosen = (k, m)
        break
      if m.status == "origin" and chosen is None:
        chosen = (k, m)
      # The nearest miss: same axes (a grid or voxel difference) first.
      if nearest is None or (nearest.detail.startswith("different axes") and
                             not m.detail.startswith("different axes")):
        nearest = m
    if chosen is not None:
      used.add(chosen[0])
      how[chosen[1].status] += 1
    else:
      missed.append((ref.name, list(ref.voxels.shape),
                     nearest.detail if nearest else "no volume from the project"))
  return {
      "folder": src, "dcm2niix_volumes": len(refs), "dcm2niix_3d": len(three_d),
      "dcm2niix_2d": len(flat), "dcm2niix_colour": len(colour),
      "dcm2niix_by_design": by_design,
      "dcm2niix_rc": proc.returncode,
      "reproduced": sum(how[s] for s in reference.REPRODUCED), "how": dict(how),
      "missed": missed, "ours_volumes": summary["volumes"],
      "load_errors": collections.Counter(_short(e) for e in summary["load_errors"]),
      "skipped": collections.Counter(_short(e) for e in summary["skipped"]),
      "crashes": sum(e.startswith("CRASH") for e in summary["load_errors"]),
      "dcm2niix_s": d_wall, "ours_s": o_wall,
  }


def make_phantoms(out: str) -> list[str]:
  from radnet_jax.phantom import geometry_layouts  # pylint: disable=import-outside-toplevel
  folders = []
  geo = os.path.join(out, "geometry")
  geometry_layouts.make_geometry_layouts(geo)
  folders += [os.path.join(geo, s) for s in geometry_layouts.STYLES]
  try:
    from radnet_jax.phantom import layouts  # pylint: disable=import-outside-toplevel
  except ImportError:
    return folders
  mv = os.path.join(out, "multivolume")
  layouts.make_layouts(mv)
  root = os.path.join(mv, "dicom") if os.path.isdir(os.path.join(mv, "dicom")) else mv
  folders += sorted(os.path.join(root, d) for d in os.listdir(root)
                    if os.path.isdir(os.path.join(root, d)))
  return folders


def main() -> None:
  # Here, not at the top: a --worker process imports the checkout --project
  # names, which may predate radnet_jax.cli.flags.
  from radnet_jax.cli import flags  # pylint: disable=import-outside-toplevel
  p = flags.Parser(description=__doc__.split("\n\n")[0])
  p.add_argument("dirs", nargs="*")
  p.add_argument("--phantoms", default=None, help="write the phantom layouts here and add them")
  p.add_argument("--project", default=ROOT, help="checkout whose radnet_jax converts")
  p.add_argument("--min-slices", type=int, default=3)
  p.add_argument("--json", default=None)
  p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.worker:
    _worker(*a.worker)
    return
  if shutil.which("dcm2niix") is None:
    sys.exit("dcm2niix not found (apt-get install dcm2niix)")
  dirs = list(a.dirs)
  if a.phantoms:
    dirs += make_phantoms(a.phantoms)
  if not dirs:
    sys.exit("no folders given")
  proc = subprocess.run(["dcm2niix", "-v"], capture_output=True, text=True, check=False)
  version = (proc.stdout.splitlines() or ["?"])[0]
  print(f"{version}\nproject: {os.path.abspath(a.project)}\n")
  rows = []
  for i, src in enumerate(dirs):
    work = tempfile.mkdtemp(prefix="vs_dcm2niix_")
    try:
      r = compare_folder(src, work, a.project, a.min_slices)
    finally:
      shutil.rmtree(work, ignore_errors=True)
    rows.append(r)
    how = ", ".join(f"{k} {v}" for k, v in sorted(r["how"].items())) or "-"
    print(f"[{i + 1}/{len(dirs)}] {src}: dcm2niix {r['dcm2niix_3d']} 3D volume(s) "
          f"(+{r['dcm2niix_2d']} with < {a.min_slices} slices, +{r['dcm2niix_colour']} "
          f"colour, +{sum(r['dcm2niix_by_design'].values())} from files skipped by "
          f"design), reproduced "
          f"{r['reproduced']}/{r['dcm2niix_3d']} ({how}); ours {r['ours_volumes']} "
          f"volume(s); wall dcm2niix {r['dcm2niix_s']:.2f} s, ours {r['ours_s']:.2f} s")
    if r["dcm2niix_rc"]:
      print(f"    dcm2niix exit status {r['dcm2niix_rc']} (negative: killed by that "
            "signal; the counts are what it wrote)")
    for why, n in sorted(r["dcm2niix_by_design"].items()):
      print(f"    not compared x{n}: dcm2niix converts a file the project skips: {why}")
    for name, shape, why in r["missed"]:
      print(f"    not reproduced: {name} {shape}: {why}")
    for why, n in sorted(r["load_errors"].items()):
      print(f"    load error x{n}: {why}")
    for why, n in sorted(r["skipped"].items(), key=lambda kv: -kv[1])[:8]:
      print(f"    skipped x{n}: {why}")
  tot3 = sum(r["dcm2niix_3d"] for r in rows)
  rep = sum(r["reproduced"] for r in rows)
  origin = sum(r["how"].get("origin", 0) for r in rows)
  crashes = sum(r["crashes"] for r in rows)
  print("\n| folder | dcm2niix 3D | reproduced | same voxels, dcm2niix origin off | "
        "2D (< min slices) | ours | crashes | dcm2niix s | ours s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {os.path.relpath(r['folder'])} | {r['dcm2niix_3d']} | {r['reproduced']} | "
          f"{r['how'].get('origin', 0)} | {r['dcm2niix_2d']} | {r['ours_volumes']} | "
          f"{r['crashes']} | {r['dcm2niix_s']:.2f} | {r['ours_s']:.2f} |")
  pct = 100.0 * rep / tot3 if tot3 else 100.0
  print(f"\ntotal: {rep}/{tot3} of dcm2niix's 3D volumes reproduced ({pct:.1f}%); "
        f"{origin} more with the same voxels where dcm2niix's origin is off; "
        f"{crashes} crash(es)")
  if a.json:
    json.dump(rows, open(a.json, "w"), indent=1, default=list)


if __name__ == "__main__":
  main()
