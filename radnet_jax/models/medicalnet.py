"""Import Tencent MedicalNet / Med3D PyTorch weights into `ResNet3D`.

    model, variables, report = load_medicalnet("resnet_18.pth", depth=18)
    outputs, features = model.apply(variables, x, train=False)
    print(report.summary())

MedicalNet's resnet.py (7^3 stride-2 stem, max-pool, layers 1-4 with strides
1, 2, 1, 1 and dilations 1, 1, 2, 4, shortcut A or B) is `ResNet3D(layout=
"medicalnet")`. The shortcut type is read from the state dict (B has
`downsample` keys). Conv weights `(O, I, kD, kH, kW)` become `(kD, kH, kW, I,
O)`; BatchNorm weight/bias -> params scale/bias, running_mean/var ->
batch_stats mean/var. The segmentation head `conv_seg.*` (and any `fc.*`) is
left out and reported. Volumes keep MedicalNet's axis order: their `(D, H, W)`
tensor axes are our `(D, H, W)`, channel moved last.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from radnet_jax.models.resnet3d import ResNet3D, get_model

DEPTH_PRESETS = {10: "resnet10", 18: "resnet18", 34: "resnet34",
                 50: "resnet50", 101: "resnet101"}
# (block, blocks per stage) -> depth, as MedicalNet's resnet.py builds them.
_DEPTHS = {("basic", (1, 1, 1, 1)): 10, ("basic", (2, 2, 2, 2)): 18,
           ("basic", (3, 4, 6, 3)): 34, ("bottleneck", (3, 4, 6, 3)): 50,
           ("bottleneck", (3, 4, 23, 3)): 101}
PREFIX = "medicalnet:"
_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
       "running_mean": ("batch_stats", "mean"),
       "running_var": ("batch_stats", "var")}


@dataclasses.dataclass
class ImportReport:
  """What was mapped where, and what was left out (with the reason)."""
  mapped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  left_out: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  shortcut_type: str = "B"
  in_channels: int = 1

  def summary(self) -> str:
    lines = [f"MedicalNet import: {len(self.mapped)} tensors mapped, "
             f"{len(self.left_out)} left out (shortcut {self.shortcut_type}, "
             f"{self.in_channels} input channel(s))"]
    lines += [f"  left out {k}: {why}" for k, why in self.left_out]
    return "\n".join(lines)


def _to_numpy(v: Any) -> np.ndarray:
  if hasattr(v, "detach"):
    v = v.detach().cpu().numpy()
  return np.asarray(v)


def _read(path_or_state_dict: str | Mapping[str, Any]) -> dict[str, Any]:
  if isinstance(path_or_state_dict, Mapping):
    sd = dict(path_or_state_dict)
  else:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("reading a .pth file needs torch (CPU build is enough);"
                        " or pass a state dict of numpy arrays") from e
    try:
      sd = torch.load(str(path_or_state_dict), map_location="cpu",
                      weights_only=True)
    except Exception as e:  # torch raises several types for bad files.
      raise ValueError(f"{path_or_state_dict}: not a readable PyTorch "
                       f"checkpoint ({e})") from e
  if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
    sd = dict(sd["state_dict"])
  # DataParallel checkpoints prefix every key with "module.".
  return {k[len("module."):] if k.startswith("module.") else k: v
          for k, v in sd.items()}


def _target(key: str) -> tuple[str, tuple[str, ...]] | str:
  """Torch key -> (collection, flax path) or a reason to leave it out."""
  if key.startswith(("conv_seg.", "fc.")):
    return "segmentation/classification head of MedicalNet (not part of trunk)"
  if key.endswith("num_batches_tracked"):
    return "BatchNorm step counter (unused by Flax)"
  if key == "conv1.weight":
    return "params", ("stem_conv", "kernel")
  m = re.fullmatch(r"bn1\.(\w+)", key)
  if m and m.group(1) in _BN:
    col, leaf = _BN[m.group(1)]
    return col, ("stem_bn", leaf)
  m = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", key)
  if m:
    block = f"stage{m.group(1)}_block{int(m.group(2)) + 1}"
    rest = m.group(3)
    if mm := re.fullmatch(r"(conv\d)\.weight", rest):
      return "params", (block, mm.group(1), "kernel")
    if mm := re.fullmatch(r"(bn\d)\.(\w+)", rest):
      if mm.group(2) in _BN:
        col, leaf = _BN[mm.group(2)]
        return col, (block, mm.group(1), leaf)
    if rest == "downsample.0.weight":
      return "params", (block, "downsample_conv", "kernel")
    if mm := re.fullmatch(r"downsample\.1\.(\w+)", rest):
      if mm.group(1) in _BN:
        col, leaf = _BN[mm.group(1)]
        return col, (block, "downsample_bn", leaf)
  return "not a MedicalNet ResNet trunk key"


def read_state_dict(path_or_state_dict: str | Mapping[str, Any]) -> dict[str, Any]:
  """The (unprefixed) state dict of a MedicalNet ``.pth`` file or mapping."""
  return _read(path_or_state_dict)


def describe(sd: Mapping[str, Any], where: str = "state dict") -> dict[str, Any]:
  """Architecture of a MedicalNet state dict, read from its keys and shapes.

  Returns {"depth", "shortcut_type" ("A" | "B"), "num_filters" (stem width),
  "in_channels", "block" ("basic" | "bottleneck")}; ValueError naming
  ``where`` when the layer layout is not one of MedicalNet's ResNets.
  """
  if "conv1.weight" not in sd:
    raise ValueError(f"{where}: no conv1.weight; not a MedicalNet ResNet")
  blocks = []
  for layer in range(1, 5):
    ids = {int(m.group(1)) for k in sd
           if (m := re.match(rf"layer{layer}\.(\d+)\.", k))}
    blocks.append(max(ids) + 1 if ids else 0)
  block = "bottleneck" if any(re.match(r"layer\d\.\d+\.conv3\.", k) for k in sd) \
      else "basic"
  depth = _DEPTHS.get((block, tuple(blocks)))
  if depth is None:
    raise ValueError(f"{where}: {block} blocks per stage {tuple(blocks)} match no "
                     f"MedicalNet ResNet depth ({sorted(DEPTH_PRESETS)})")
  w = _to_numpy(sd["conv1.weight"]).shape
  return {"depth": depth, "block": block, "num_filters": int(w[0]), "in_channels": int(w[1]),
          "shortcut_type": "B" if any(".downsample." in k for k in sd) else "A"}


def parse_source(source: str) -> tuple[str, int | None]:
  """``medicalnet:PATH[:depth=N]`` -> (PATH, N or the depth in a ``resnet_N``
  file name, or None: then the state dict says it, see ``describe``)."""
  spec = source[len(PREFIX):] if source.startswith(PREFIX) else source
  depth = None
  m = re.fullmatch(r"(.*):depth=(\d+)", spec)
  if m:
    spec, depth = m.group(1), int(m.group(2))
  else:
    named = re.search(r"resnet_?(\d+)", os.path.basename(spec), flags=re.I)
    if named and int(named.group(1)) in DEPTH_PRESETS:
      depth = int(named.group(1))
  if depth is not None and depth not in DEPTH_PRESETS:
    raise ValueError(f"{source}: MedicalNet depth must be one of {sorted(DEPTH_PRESETS)}, "
                     f"got {depth}")
  return spec, depth


def trunk_spec(info: Mapping[str, Any]) -> dict[str, Any]:
  """``vnet.ResNetVNet(trunk=...)`` / ``model.backbone`` of a described file."""
  return {"preset": DEPTH_PRESETS[int(info["depth"])], "layout": "medicalnet",
          "shortcut_type": str(info["shortcut_type"]), "num_filters": int(info["num_filters"])}


def load_source(source: str) -> tuple[dict[str, Any], dict[str, Any], ImportReport]:
  """``medicalnet:PATH[:depth=N]`` -> (variables {"params", "batch_stats"} with
  the trunk under "trunk", ``describe``'s architecture, report).

  The depth is read from the file; a depth in the name (``resnet_18.pth``)
  or given (``:depth=18``) must agree with it.
  """
  path, depth = parse_source(source)
  sd = _read(path)
  info = describe(sd, path)
  if depth is not None and depth != info["depth"]:
    raise ValueError(f"{source}: depth {depth} was asked for, but the file holds a "
                     f"ResNet-{info['depth']} ({info['block']} blocks)")
  _, variables, report = load_medicalnet(sd, info["depth"],
                                         num_filters=info["num_filters"],
                                         source_name=path)
  return variables, info, report


def load_medicalnet(path_or_state_dict: str | Mapping[str, Any], depth: int,
                    source_name: str | None = None, **model_kwargs: Any
                    ) -> tuple[ResNet3D, dict[str, Any], ImportReport]:
  """Builds `ResNet3D(layout="medicalnet")` and fills it from MedicalNet.

  Args:
    path_or_state_dict: a `resnet_{depth}.pth` file (a state dict, or a dict
      with "state_dict"), or the state dict itself (torch tensors or numpy).
    depth: 10, 18, 34, 50 or 101.
    source_name: the file named in errors when a state dict is passed.
    **model_kwargs: extra `ResNet3D` kwargs (heads, dtype, conv_impl, ...);
      new heads stay randomly initialised (reported).

  Returns:
    (model, variables {"params", "batch_stats"}, report).

  Raises:
    ValueError: unknown depth, a shape mismatch, or a trunk tensor the file
      does not have (naming the key).
  """
  if depth not in DEPTH_PRESETS:
    raise ValueError(f"MedicalNet depth must be one of {sorted(DEPTH_PRESETS)}"
                     f", got {depth}")
  src = f"{path_or_state_dict}" if isinstance(path_or_state_dict, str) \
      else (source_name or "state dict")
  sd = _read(path_or_state_dict)
  if "conv1.weight" not in sd:
    raise ValueError(f"{src}: no conv1.weight; not a MedicalNet ResNet")
  shortcut = "B" if any(".downsample." in k for k in sd) else "A"
  in_ch = int(_to_numpy(sd["conv1.weight"]).shape[1])
  model = get_model(DEPTH_PRESETS[depth], layout="medicalnet",
                    shortcut_type=shortcut, **model_kwargs)
  x = jnp.zeros((1, 16, 16, 16, in_ch), jnp.float32)
  # rbg keys: XLA compiles threefry inits of a ResNet ~8x slower, and every
  # trunk tensor is overwritten anyway.
  variables = jax.jit(lambda r: model.init(r, x, False))(
      jax.random.key(0, impl="unsafe_rbg"))
  flat = {col: traverse_util.flatten_dict(jax.device_get(variables[col]))
          for col in variables}
  report = ImportReport(shortcut_type=shortcut, in_channels=in_ch)
  filled = set()
  for key in sorted(sd):
    tgt = _target(key)
    if isinstance(tgt, str):
      report.left_out.append((key, tgt))
      continue
    col, path = tgt
    path = ("trunk",) + path
    if path not in flat[col]:
      raise ValueError(f"{src}: {key} maps to {col}/{'/'.join(path)}, which "
                       f"ResNet-{depth} (shortcut {shortcut}) does not have")
    v = _to_numpy(sd[key]).astype(np.float32)
    if v.ndim == 5:
      v = v.transpose(2, 3, 4, 1, 0)
    if v.shape != flat[col][path].shape:
      raise ValueError(f"{src}: {key} has shape {v.shape} (after transpose), "
                       f"expected {flat[col][path].shape} for ResNet-{depth}")
    flat[col][path] = v
    filled.add((col, path))
    report.mapped.append((key, f"{col}/{'/'.join(path)}"))
  for col, leaves in flat.items():
    for path in leaves:
      if (col, path) in filled:
        continue
      if path[0] == "trunk":
        raise ValueError(f"{src}: trunk tensor {col}/{'/'.join(path)} missing "
                         f"from the MedicalNet state dict")
      report.left_out.append((f"[flax] {col}/{'/'.join(path)}",
                              "new head, randomly initialised"))
  variables = {col: jax.tree_util.tree_map(jnp.asarray,
                                           traverse_util.unflatten_dict(f))
               for col, f in flat.items()}
  return model, variables, report
