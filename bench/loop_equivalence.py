r"""Fixed-seed short training runs whose loss sequences a refactor must keep.

  python bench/loop_equivalence.py --out /tmp/loop-eq [--task pretrain|segment|both]

Pretraining: synthetic shards (``tests/synthetic_shards.py``), ResNetTiny on
8x16x16, 12 steps of batch 8 on 2 simulated CPU devices, validation and
checkpoints every 4 steps. Segmentation: 4 synthetic LiTS cases
(``tests/test_segdata.py``), the tiny ResNetVNet from scratch, 8 steps on one
device, validation and checkpoints every 4 steps. Prints one table row per
logged step (training loss, validation metric) and writes them as JSON
(``<out>/<task>.json``); run it in two checkouts and diff the JSON files.
Only uses the entry points (``train_and_evaluate``), so it runs unchanged on
code before and after a refactor of the loop.
"""
import importlib.util
import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# After the environment above (the device count is read when jax starts).
from experiments import pretrain as pretrain_configs  # noqa: E402
from radnet_jax.cli import flags  # noqa: E402
from radnet_jax.tasks import pretrain as pretrain_task  # noqa: E402
from radnet_jax.tasks import segment as segment_task  # noqa: E402
from tests import synthetic_shards as ss  # noqa: E402
from tests.test_segdata import _write_lits  # noqa: E402


def _rows(workdir, val_key):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
  val = {r["step"]: r[val_key] for r in rows if val_key in r}
  return {"train_loss": train, "val": val, "val_key": val_key}


def pretrain(out):
  c = pretrain_configs.get_config("tiny")
  c.data.shards_dir = ss.write_shards(os.path.join(out, "pretrain-shards"))
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 12, 1, 4, 4
  c.num_devices = 2
  wd = os.path.join(out, "pretrain-wd")
  pretrain_task.train_and_evaluate(c, wd)
  return _rows(wd, "val/mean_accuracy")


def segment(out):
  spec = importlib.util.spec_from_file_location(
      "transfer_liver_cfg", os.path.join(ROOT, "experiments", "transfer_liver.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("tiny,scratch")
  c.data.lits_dir = _write_lits(os.path.join(out, "lits"), n=4)
  c.data.cache_dir = os.path.join(out, "cache")
  c.data.spacing = (2.5, 1.5, 1.5)
  c.model.kwargs.conv_impl = "xla"
  c.proposal.enabled = False
  c.num_devices = 1
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 8, 1, 4, 4
  wd = os.path.join(out, "segment-wd")
  segment_task.train_and_evaluate(c, wd)
  return _rows(wd, "val/liver/dice_global")


def main():
  p = flags.Parser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="empty folder for data, runs and JSON")
  p.add_argument("--task", default="both", choices=("pretrain", "segment", "both"))
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  for name, fn in (("pretrain", pretrain), ("segment", segment)):
    if args.task not in (name, "both"):
      continue
    res = fn(args.out)
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
      json.dump(res, f, indent=1)
    print(f"\n{name}: step | train loss | {res['val_key']}")
    for step, loss in sorted(res["train_loss"].items()):
      val = res["val"].get(step)
      print(f"{step:4d} | {loss:.9g} | {'' if val is None else f'{val:.9g}'}")


if __name__ == "__main__":
  main()
