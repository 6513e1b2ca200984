r"""Segmentation train-step time per conv lowering ("taps" vs "xla").

python bench/seg_train_step.py [--config experiments/transfer_liver.py] \
    [--impls taps,xla] [--steps 5]

Builds the transfer config's network (ResNet-encoder VNet), its optimizer and
the shared jit train step (radnet_jax.training.trainer) on the config's patch and
batch, and times `--steps` steps after a compile step on random data. Prints
a table: compile wall (s), wall and process CPU seconds per step (CPU time is
the fair measure on a shared, loaded machine), and the load average.
"""
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from radnet_jax.models import factory  # noqa: E402
from radnet_jax.tasks import segment  # noqa: E402
from radnet_jax.training import trainer  # noqa: E402
from radnet_jax.cli import flags


def _config(path: str, arg: str):
  spec = importlib.util.spec_from_file_location("_cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def bench(config, impl: str, steps: int) -> dict:
  config = config.copy_and_resolve_references()
  config.model.kwargs.conv_impl = impl
  # An empty backbone is the pretraining model (segment.resolve_source).
  config.model.backbone = config.model.backbone or config.pretrain.model.name
  mesh = trainer.make_mesh(config.num_devices or None)
  patch = tuple(int(s) for s in config.input_shape)
  model = factory.segmentation_model(config)
  tx, schedule = trainer.make_optimizer(config.optim, config.num_steps)
  state = trainer.create_train_state(model, tx, patch + (1,), 0, mesh)

  def loss_fn(out, batch):
    return segment.seg_loss(segment._logits(out), batch["label"],  # pylint: disable=protected-access
                            config.num_classes, 1.0, 1.0)

  step = trainer.make_train_step(model, tx, loss_fn, mesh, schedule)
  rng = np.random.default_rng(0)
  b = config.batch_size
  batch = {"volume": rng.random((b,) + patch + (1,), np.float32),
           "label": (rng.random((b,) + patch) > 0.5).astype(np.int32)}
  t0 = time.time()
  state, m = step(state, trainer.put_batch(batch, mesh))
  jax.block_until_ready(m)
  compile_s = time.time() - t0
  w0, c0 = time.time(), time.process_time()
  for _ in range(steps):
    state, m = step(state, trainer.put_batch(batch, mesh))
  jax.block_until_ready(m)
  return {"impl": impl, "compile_s": compile_s,
          "wall_step_s": (time.time() - w0) / steps,
          "cpu_step_s": (time.process_time() - c0) / steps,
          "load": os.getloadavg()[0]}


def main():
  p = flags.Parser(description=__doc__.split("\n")[2])
  p.add_argument("--config", default="experiments/transfer_liver.py")
  p.add_argument("--variant", default="scratch")
  p.add_argument("--impls", default="taps,xla")
  p.add_argument("--steps", type=int, default=5)
  a = p.parse_args()
  config = _config(a.config, a.variant)
  rows = [bench(config, impl, a.steps) for impl in a.impls.split(",")]
  print(f"\npatch {tuple(config.input_shape)}, batch {config.batch_size}, "
        f"{config.model.name}/{config.model.get('backbone', '')}, "
        f"{jax.device_count()} {jax.default_backend()} device(s)\n")
  print("| conv_impl | compile wall (s) | wall / step (s) | CPU / step (s) | load (1 min) |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['impl']} | {r['compile_s']:.1f} | {r['wall_step_s']:.2f} | "
          f"{r['cpu_step_s']:.2f} | {r['load']:.1f} |")


if __name__ == "__main__":
  main()
