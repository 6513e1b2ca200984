r"""Few-shot study: liver Dice vs number of training volumes, scratch vs pretrained vs control.

  python bench/fewshot.py --init-from PRETRAIN_WORKDIR [--control-from CONTROL_WORKDIR] \
      [--sizes 1,2,5,10,0] [--seeds 0,1,2] [--variants scratch,pretrained,control] \
      [--steps 300] [--patch 32,64,64] [--spacing 5,3,3] [--batch 4] \
      [--out bench/fewshot] [--proposal]

Runs ``radnet_jax.tasks.segment.train_and_evaluate`` with
``experiments/transfer_liver.py:<variant>,n=<size>,seed=<seed>`` for every
combination (size 0 = all training volumes), each in
``<out>/runs/<variant>-n<size>-s<seed>`` (a finished run, i.e. one with
results.json, is reused, so the study resumes; several processes on one
``--out`` share the cells through claim files, and ``--wait`` keeps a process
polling for cells whose trunk is still training). Variants: ``scratch``
(random init), ``pretrained`` (trunk from ``--init-from``) and ``control``
(the same transfer from ``--control-from``: a trunk pretrained with the same
schedule on shards whose train labels were shuffled across volumes,
bench/shuffled_labels.py), which separates what the metadata labels teach from
what any pretraining on these volumes does. Writes ``<out>/fewshot.md`` (test
liver Dice, global over the held-out volumes: mean and 95% t-interval over
seeds, per-seed values), ``<out>/fewshot.png`` (Dice vs training volumes with
the intervals) and ``<out>/overlays/`` (prediction overlays of the
smallest-size runs). Seeds change the training subset, the initialisation of
the new layers and the data order. The order of runs is size-major, so a
study stopped early has whole rows.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import time

import numpy as np
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from radnet_jax.cli import flags  # noqa: E402  pylint: disable=wrong-import-position


def _config(arg: str):
  spec = importlib.util.spec_from_file_location(
      "transfer_liver_cfg", os.path.join(ROOT, "experiments", "transfer_liver.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def interval(d: np.ndarray, level: float = 0.95) -> tuple:
  """Student-t interval of the mean of ``d`` (the mean itself for one value)."""
  if len(d) < 2:
    return float(d.mean()), float(d.mean())
  h = stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
  return float(d.mean() - h), float(d.mean() + h)


def _claim(wd: str) -> bool:
  """Claims a run for this process (``<run>.claim`` holds the pid); False if a live process has it.

  Several ``fewshot.py`` processes on one ``--out`` share the cells: each runs
  the unclaimed ones, a claim of a dead process is taken over.
  """
  path = wd + ".claim"
  os.makedirs(os.path.dirname(path), exist_ok=True)
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      os.write(fd, str(os.getpid()).encode())
      os.close(fd)
      return True
    except FileExistsError:
      try:
        with open(path) as f:
          pid = int(f.read() or 0)
        os.kill(pid, 0)
        return pid == os.getpid()
      except (ProcessLookupError, ValueError):
        os.remove(path)   # the claiming process died: take the run over
  return False


def _init_ready(workdir: str) -> bool:
  """A pretraining workdir is usable once it finished (results.json) or was stopped with a checkpoint."""
  return os.path.exists(os.path.join(workdir, "results.json")) or os.path.exists(
      os.path.join(workdir, "STOPPED"))


def run_one(variant: str, n: int, seed: int, a) -> dict | None:
  """Result of one cell: cached, or trained now; None when another process has it or its trunk is not ready."""
  from radnet_jax.tasks import segment  # pylint: disable=g-import-not-at-top
  wd = os.path.join(a.out, "runs", f"{variant}-n{n}-s{seed}")
  res_path = os.path.join(wd, "results.json")
  if os.path.exists(res_path):
    with open(res_path) as f:
      return json.load(f)
  init = {"pretrained": a.init_from, "control": a.control_from}.get(variant, "")
  if variant == "control" and not init:
    raise SystemExit("variant control needs --control-from (a pretraining workdir on shuffled labels)")
  if init and not _init_ready(init):
    return None
  if not _claim(wd):
    return None
  c = _config(f"{'scratch' if variant == 'scratch' else 'pretrained'},n={n},seed={seed}")
  c.num_steps = a.steps
  c.checkpoint_every = a.steps
  c.eval_every = a.steps
  if a.patch:
    c.input_shape = tuple(int(x) for x in a.patch.split(","))   # also the eval window
  if a.spacing:
    c.data.spacing = tuple(float(x) for x in a.spacing.split(","))
  if a.batch:
    c.batch_size = a.batch
  c.eval.save_nifti = False
  c.eval.assd = a.assd
  c.proposal.enabled = a.proposal
  c.tensorboard = False
  if variant != "scratch":
    c.init_from = init or "auto"
  if a.shards_dir:
    c.data.shards_dir = a.shards_dir
  if a.lits_dir:
    c.data.lits_dir = a.lits_dir
  shutil.rmtree(wd, ignore_errors=True)  # an unfinished run starts over
  segment.train_and_evaluate(c, wd)
  os.remove(wd + ".claim")
  with open(res_path) as f:
    return json.load(f)


def main():
  p = flags.Parser()
  p.add_argument("--init-from", default="", help="pretraining workdir ('' = auto)")
  p.add_argument("--sizes", default="1,2,5,10,0")
  p.add_argument("--control-from", default="", help="pretraining workdir on shuffled labels")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--variants", default="scratch,pretrained,control")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--patch", default="", help="D,H,W training patch / eval ROI ('' = config)")
  p.add_argument("--spacing", default="", help="D,H,W mm of the training grid ('' = config)")
  p.add_argument("--batch", type=int, default=0, help="batch size (0 = config)")
  p.add_argument("--shards-dir", default="")
  p.add_argument("--skip-missing", action="store_true", help="tabulate finished runs only (train nothing)")
  p.add_argument("--wait", action="store_true", help="keep polling for cells held by other processes / trunks")
  p.add_argument("--lits-dir", default="", help="a LiTS-layout folder instead of the phantom set")
  p.add_argument("--assd", action="store_true", help="also compute ASSD (slow on CPU)")
  p.add_argument("--proposal", action="store_true", help="also train/use the slab proposal")
  p.add_argument("--out", default=os.path.join(ROOT, "bench", "fewshot"))
  a = p.parse_args()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  sizes = [int(s) for s in a.sizes.split(",")]
  seeds = [int(s) for s in a.seeds.split(",")]
  variants = a.variants.split(",")
  os.makedirs(a.out, exist_ok=True)
  t0 = time.time()
  cells = [(n, sd, v) for n in sizes for sd in seeds for v in variants]   # size-major, then seed
  done: dict = {}
  while True:
    for cell in cells:
      if cell in done or (a.skip_missing and not os.path.exists(
          os.path.join(a.out, "runs", f"{cell[2]}-n{cell[0]}-s{cell[1]}", "results.json"))):
        continue
      r = run_one(cell[2], cell[0], cell[1], a)
      if r is not None:
        done[cell] = r
        logging.info("%s n=%d seed=%d: test liver Dice %.4f", cell[2], cell[0], cell[1],
                     r["test"]["liver/dice_global"])
    waiting = [c for c in cells if c not in done]
    if a.skip_missing or not waiting or not a.wait:
      break
    logging.info("%d run(s) held by other processes or waiting for a trunk; checking again in 60 s", len(waiting))
    time.sleep(60)
  table: dict = {}
  n_all = None
  for (n, _, v), r in sorted(done.items()):
    table.setdefault((v, n), []).append(r["test"]["liver/dice_global"])
    if n == 0:
      n_all = r["n_train"]

  label = lambda n: (f"all ({n_all})" if n_all else "all") if n == 0 else str(n)
  lines = [f"| training volumes | " + " | ".join(variants) + " |",
           "|---|" + "---|" * len(variants)]
  for n in sizes:
    cells = []
    for v in variants:
      d = np.array(table.get((v, n), []), float)
      if not d.size:
        cells.append("not run")
        continue
      lo, hi = interval(d)
      cells.append(f"{d.mean():.3f} [{lo:.3f}, {hi:.3f}] ({', '.join(f'{x:.3f}' for x in d)})")
    lines.append(f"| {label(n)} | " + " | ".join(cells) + " |")
  # Cells may have been trained by other processes or earlier invocations:
  # the cost is the sum of each run's own wall time (results.json).
  run_s = sum(float(r.get("total_seconds", 0.0)) for r in done.values())
  md = (f"Test liver Dice (global over held-out volumes): mean [95% t-interval over seeds {seeds}] "
        f"(per-seed values); {a.steps} steps per run; {len(done)} runs took {run_s:.0f} s of wall time "
        f"in all (this table: {time.time() - t0:.0f} s).\n\n"
        + "\n".join(lines) + "\n")
  with open(os.path.join(a.out, "fewshot.md"), "w") as f:
    f.write(md)
  print(md)

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  # One evenly spaced slot per training-set size (a log axis puts 10 and
  # "all (12)" on top of each other).
  xs = {n: i for i, n in enumerate(sizes)}
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for i, v in enumerate(variants):
    ns = [n for n in sizes if table.get((v, n))]
    if not ns:
      continue
    d = [np.array(table[(v, n)], float) for n in ns]
    iv = np.array([interval(x) for x in d])
    mean = np.array([x.mean() for x in d])
    x = np.array([xs[n] for n in ns], float) + 0.08 * (i - (len(variants) - 1) / 2)   # dodge the error bars
    ax.errorbar(x, mean, yerr=[mean - iv[:, 0], iv[:, 1] - mean], marker="o", capsize=3, label=v)
  ax.set_xticks([xs[n] for n in sizes])
  ax.set_xticklabels([label(n) for n in sizes])
  ax.set_xlabel("training volumes")
  ax.set_ylabel("test liver Dice (95% interval)")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(a.out, "fewshot.png"), dpi=100)
  # Overlays of the smallest training set, first seed.
  ov = os.path.join(a.out, "overlays")
  os.makedirs(ov, exist_ok=True)
  for v in variants:
    plots = os.path.join(a.out, "runs", f"{v}-n{sizes[0]}-s{seeds[0]}", "plots")
    if os.path.isdir(plots):
      for f in sorted(os.listdir(plots))[:2]:
        shutil.copy(os.path.join(plots, f), os.path.join(ov, f"{v}-n{sizes[0]}-{f}"))
  print(f"wrote {a.out}/fewshot.md, fewshot.png, overlays/")


if __name__ == "__main__":
  main()
