r"""python run.py --config=experiments/transfer_liver.py [--config.init_from=PRETRAIN_WORKDIR]

Liver segmentation transfer (3D-RADNet, LiTS): a ResNet-encoder VNet whose
encoder starts from the metadata-pretrained ResNet3D trunk, trained with
Dice + cross-entropy on foreground-biased patches, evaluated on held-out
volumes with sliding-window inference, slab region proposal and
largest-connected-component post-processing. Writes results.json (liver
Dice, ASSD, proposal recall), predictions/*.nii.gz in the original geometry
and plots/*.png overlays in the workdir.

Variants (comma-separated config argument, e.g. ``:scratch,n=5``):

  pretrained (default)  init_from="auto": the cached pretraining demo run
      (``<cache>/pretrain-demo``, cache = $RADNET_CACHE or
      ~/.cache/radnet_jax), trained first with experiments/pretrain.py:demo
      if absent. Or pass --config.init_from=PRETRAIN_WORKDIR, or
      --config.init_from=medicalnet:resnet_18.pth (MedicalNet weights; the
      depth is read from the file, or :depth=18).
  scratch               same network, random init.
  n=K                   K training volumes (nested subsets by
      data.subset_seed); default all.
  seed=S                training seed (and subset seed).
  tiny                  a few steps on tiny patches (tests, smoke runs).

Data: the phantom LiTS set (radnet_jax.phantom.make_lits), generated and
converted once into the cache; real LiTS with
--config.data.lits_dir=/path/to/LiTS or prebuilt shards with
--config.data.shards_dir=DIR (python -m data_prep.build_seg_shards).
"""
import importlib.util
import os

import ml_collections


def _pretrain_config(variant: str) -> ml_collections.ConfigDict:
  """experiments/pretrain.py's config (used when init_from="auto")."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain.py")
  spec = importlib.util.spec_from_file_location("_radnet_pretrain_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


def parse_arg(arg: str) -> dict:
  """"scratch,n=5,seed=1" -> {"scratch": True, "n": 5, "seed": 1}."""
  out = {}
  for item in (arg or "").split(","):
    item = item.strip().lower()
    if not item:
      continue
    if "=" in item:
      k, v = item.split("=", 1)
      out[k.strip()] = int(v)
    else:
      out[item] = True
  unknown = set(out) - {"pretrained", "scratch", "tiny", "n", "seed"}
  if unknown:
    raise ValueError(f"unknown variant(s) {sorted(unknown)}: use pretrained, "
                     f"scratch, tiny, n=K, seed=S")
  if out.get("pretrained") and out.get("scratch"):
    raise ValueError("choose one of pretrained / scratch")
  return out


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  v = parse_arg(arg)
  tiny = bool(v.get("tiny"))
  c = ml_collections.ConfigDict()
  c.entry = "radnet_jax.tasks.segment"
  c.variant = arg or "pretrained"
  c.seed = int(v.get("seed", 0))
  c.num_devices = 0

  # Model (radnet_jax.models.vnet): ResNet-encoder VNet. Its backbone is the
  # pretraining model, so that the trunk transfers 1:1: "" = taken from the
  # init_from run's contract (or the MedicalNet file, or config.pretrain for
  # a scratch run); a preset name overrides it.
  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet_vnet"
  c.model.backbone = ""
  c.model.dtype = "float32"
  # Decoder widths from deep to shallow (stage3, stage2, stage1, stem, full).
  c.model.kwargs = ml_collections.ConfigDict(
      {"decoder_filters": (64, 32, 16, 16, 8), "decoder_convs": (1, 1, 1, 1, 1),
       # "auto": "taps" on CPU (4.5x less CPU per train step than XLA's
       # native 3D conv there: bench/seg_train_step.py), "xla" on GPU/TPU.
       "conv_impl": "auto"})
  c.num_classes = 2  # 2: background / liver (incl. tumour); 3: + tumour
  # (D, H, W) voxels the network takes: the training patches and the sliding
  # window at evaluation and inference (one shape, one name, as in
  # experiments/pretrain.py); multiples of the net's stride.
  c.input_shape = (32, 64, 64)

  # Data (radnet_jax.shards.seg / segment.ensure_shards).
  c.data = ml_collections.ConfigDict()
  c.data.shards_dir = ""  # prebuilt segmentation shards
  c.data.lits_dir = ""  # a LiTS-format folder to convert (cached)
  c.data.cache_dir = ""
  c.data.phantom_n = 16  # phantom LiTS volumes
  c.data.phantom_seed = 0
  c.data.spacing = (5.0, 3.0, 3.0)  # mm (D, H, W) of the training grid
  # HU window -> range of a scratch run. With a pretraining run as init_from
  # the trunk is fed its own pretraining mapping instead (its contract:
  # -1000..1000 HU -> [-1, 1] and its learnable soft-tissue curve), unless
  # intensity_from = "config" (tasks/segment.resolve_source; logged).
  c.data.window = (-200.0, 250.0)  # HU
  c.data.out_range = (0.0, 1.0)
  c.data.val_fraction = 0.0
  c.data.test_fraction = 0.25
  c.data.split_seed = 0
  c.data.n_train = int(v.get("n", 0))  # 0 = all training volumes
  c.data.subset_seed = int(v.get("seed", 0))
  c.data.fg_prob = 2 / 3  # share of patches centred on a liver voxel
  c.data.threads = 2
  c.data.prefetch = 2

  c.augment = ml_collections.ConfigDict()
  c.augment.enabled = True
  c.augment.scale = 0.1
  c.augment.shift = 0.05
  c.augment.noise_std = 0.02
  c.augment.flip_probs = (0.0, 0.0, 0.0)  # liver laterality is informative

  c.loss = ml_collections.ConfigDict()
  c.loss.dice_weight = 1.0
  c.loss.ce_weight = 1.0

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 20
  c.optim.final_lr_frac = 0.05
  c.optim.weight_decay = 1e-4
  c.optim.grad_clip = 1.0

  c.batch_size = 4
  c.num_steps = 300
  c.log_every = 25
  c.eval_every = 100
  c.checkpoint_every = 100
  c.keep_checkpoints = 1
  c.test_checkpoint = "last"  # "best" needs a val split
  c.tensorboard = True
  # Divergence (radnet_jax.training.loop): a logged training loss above this
  # multiple of the median of the last divergence_window logged losses stops
  # the run (as NaN/Inf does) before the step can be saved or become best.
  c.divergence_factor = 1000.0
  c.divergence_window = 50

  # Transfer: "auto" = cached pretraining demo (run first if missing).
  c.init_from = "" if v.get("scratch") else "auto"
  c.intensity_from = "source"  # "source" (the init_from run's contract) | "config"
  c.pretrain_workdir = ""  # where "auto" looks / trains ("" = <cache>/pretrain-demo)
  c.pretrain = _pretrain_config("tiny" if tiny else "demo")
  c.freeze_encoder_steps = 0 if v.get("scratch") else 30
  c.freeze_patterns = ("trunk/.*",)

  # Sliding windows of input_shape, padded with the low end of the intensity
  # range (air); neither is a separate knob.
  c.eval = ml_collections.ConfigDict()
  c.eval.overlap = 0.25
  c.eval.sw_batch_size = 2
  c.eval.mode = "gaussian"
  c.eval.lcc = True
  c.eval.assd = True
  c.eval.save_nifti = True
  c.eval.save_overlays = True

  c.proposal = ml_collections.ConfigDict()
  c.proposal.enabled = True
  c.proposal.slab_depth = 8
  c.proposal.in_plane = (64, 64)
  c.proposal.steps = 60
  c.proposal.batch_size = 16
  c.proposal.infer_batch = 16
  c.proposal.lr = 2e-3
  c.proposal.threshold = 0.5
  c.proposal.margin = 2
  c.proposal.min_voxels = 1

  if tiny:
    c.input_shape = (16, 32, 32)
    c.data.phantom_n = 4
    c.data.threads = 1
    c.batch_size = 2
    c.num_steps = 2
    c.optim.warmup_steps = 1
    c.log_every = 1
    c.eval_every = 2
    c.checkpoint_every = 2
    c.freeze_encoder_steps = 0 if v.get("scratch") else 1
    c.tensorboard = False
    c.eval.assd = False
    c.eval.save_overlays = False
    c.proposal.steps = 2
    c.proposal.batch_size = 4
    c.proposal.infer_batch = 4
    c.proposal.in_plane = (32, 32)
    c.proposal.slab_depth = 4
  return c
