r"""Training entry: python run.py --config=experiments/pretrain.py[:variant] [--workdir=DIR]

All logic lives in the library; this file only parses flags. The workdir
defaults to ./workdirs/<config file name>[-<variant>].
"""
import os
import sys

if __name__ == "__main__":
  # Before anything else: glibc reads GLIBC_TUNABLES only at process start
  # (huge pages for malloc, radnet_jax/hostenv.py).
  from radnet_jax import hostenv
  hostenv.reexec_with_hugepage_malloc(sys.orig_argv[1:])

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from radnet_jax.training import distributed  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "experiments/pretrain.py",
                                "experiment config file[:variant]", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs, results)")
distributed.define_flags()


def main(argv):
  del argv
  distributed.initialize_from_flags()
  spec = config_flags.get_config_filename(FLAGS["config"])
  name = os.path.splitext(os.path.basename(str(spec).split(":")[0]))[0]
  variant = str(spec).split(":", 1)[1] if ":" in str(spec) else ""
  workdir = FLAGS.workdir or os.path.join("workdirs", name + (f"-{variant}" if variant else ""))
  config = FLAGS.config
  entry = config.get("entry", "radnet_jax.tasks.pretrain")
  import importlib  # pylint: disable=g-import-not-at-top
  importlib.import_module(entry).train_and_evaluate(config, workdir)


if __name__ == "__main__":
  app.run(main)
