"""Per-machine autotuning of the CPU conv lowering, and its cache.

The rules of `conv_lowering.rule_lowering` were set from sweeps on one CPU; on
another (an AVX-512 Intel Xeon with a faster oneDNN) the best lowering of the
same conv differs. With autotuning on, the first trace of each conv shape that
is big enough (>= AUTOTUNE_MIN_FLOPS forward) times every candidate lowering
(forward + input and weight gradients, jitted, on random data of the same shape
and dtype, best of AUTOTUNE_REPEATS) and keeps the fastest; the rule's choice
is kept unless another is faster by more than AUTOTUNE_MARGIN. The choice is
static per shape, so a jitted step is traced once as before. Choices are cached
per machine in a JSON file under `$RADNET_CACHE/conv_autotune/` (else
`~/.cache/radnet_jax/...`), keyed by CPU model and flags, jax / jaxlib version,
XLA_FLAGS, usable cores and the lowering settings of `conv_lowering`; one file
per such machine key, entries keyed by shape, strides, padding, dilation and
dtype; written atomically (temporary file + rename). Every candidate is tested
equal to `lax.conv_general_dilated` (tests/test_conv.py), so the choice changes
speed, not results (beyond float32 rounding).

Off: `RADNET_CONV_AUTOTUNE=0` (the test suite sets it), or
`CONV_AUTOTUNE = False`; then, and when the cache directory cannot be
written, the rules decide (deterministic). Only on the CPU backend, and
not for a batch split over several devices.

What lives here: `choose_lowering` (what `layers.conv3d_taps` asks),
`candidate_lowerings`, `_time_lowering`, the cache (`autotune_cache_path`,
`_read_cache`, `_write_cache`, keyed by `cpu_id` and `_machine_key`) and
this process's log (`autotune_log`). The lowerings themselves are
`radnet_jax.models.conv_lowering`.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from radnet_jax.models import conv_lowering
from radnet_jax.models.conv_lowering import Array

CONV_AUTOTUNE: bool | None = None     # None: $RADNET_CONV_AUTOTUNE, default on
AUTOTUNE_ENV = "RADNET_CONV_AUTOTUNE"
AUTOTUNE_MIN_FLOPS = 2e8
AUTOTUNE_REPEATS = 3
AUTOTUNE_MARGIN = 0.05
# Full im2col is a candidate for output planes up to this many voxels when
# its patch tensor holds at most AUTOTUNE_IM2COL_MAX_ELEMS elements.
AUTOTUNE_IM2COL_MAX_PLANE = 64
AUTOTUNE_IM2COL_MAX_ELEMS = 2 ** 24
_AUTOTUNE_VERSION = 1
_TUNED: dict[str, str] = {}            # this process's choices, by entry key
_TUNE_LOG: dict[str, dict] = {}        # ... with the measured times
_CACHE_STATE: dict[str, Any] = {}      # path, writable


def autotune_enabled() -> bool:
  """CONV_AUTOTUNE if set, else $RADNET_CONV_AUTOTUNE (default on)."""
  if CONV_AUTOTUNE is not None:
    return bool(CONV_AUTOTUNE)
  v = os.environ.get(AUTOTUNE_ENV, "1").strip().lower()
  return v not in ("0", "off", "false", "no", "")


@functools.lru_cache(maxsize=1)
def cpu_id() -> str:
  """CPU model name plus a digest of its feature flags (Linux /proc/cpuinfo)."""
  info = {}
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      for line in f:
        key, _, val = line.partition(":")
        info.setdefault(key.strip(), val.strip())   # the first CPU's values
  except OSError:
    pass
  model = (info.get("model name") or info.get("Processor")
           or platform.processor() or platform.machine() or "unknown")
  flags = " ".join(sorted((info.get("flags") or info.get("Features") or
                           "").split()))
  digest = hashlib.sha1(flags.encode()).hexdigest()[:10] if flags else "noflags"
  return f"{model} [{digest}]"


def _machine_key() -> dict[str, Any]:
  import jaxlib  # pylint: disable=g-import-not-at-top  (light, jax has it)
  cl = conv_lowering     # its settings read at call time (benches set them)
  settings = (cl.CONV_SPLIT, cl.CONV_SPLIT_MIN_FLOPS, cl.FFT_TILE,
              cl.FFT_MIN_TILES, AUTOTUNE_REPEATS, AUTOTUNE_MARGIN)
  return {"cpu": cpu_id(), "jax": jax.__version__,
          "jaxlib": getattr(jaxlib, "__version__", "?"),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "cores": cl.usable_cores(), "settings": repr(settings),
          "version": _AUTOTUNE_VERSION}


def autotune_cache_path() -> str:
  """The JSON file holding this machine key's choices."""
  root = os.environ.get("RADNET_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "radnet_jax")
  digest = hashlib.sha1(json.dumps(_machine_key(), sort_keys=True).encode()
                        ).hexdigest()[:16]
  return os.path.join(root, "conv_autotune", f"{digest}.json")


def _read_cache(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    if isinstance(data, dict) and isinstance(data.get("entries"), dict):
      return data
  except (OSError, ValueError):
    pass
  return {"machine": _machine_key(), "entries": {}}


def _write_cache(path: str, key: str, entry: dict) -> bool:
  """Merges one entry into the cache file atomically; False if unwritable."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = _read_cache(path)       # other processes may have added entries
    data["entries"][key] = entry
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
    return True
  except OSError as e:
    logging.getLogger(__name__).warning(
        "conv autotune: cannot write the cache %s (%s); using the fixed "
        "rules", path, e)
    return False


def _cache_writable(path: str) -> bool:
  """Whether the cache directory can be written (probed once per path)."""
  if _CACHE_STATE.get("path") != path:
    ok = True
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      fd, tmp = tempfile.mkstemp(prefix=".probe-", dir=os.path.dirname(path))
      os.close(fd)
      os.unlink(tmp)
    except OSError as e:
      ok = False
      logging.getLogger(__name__).warning(
          "conv autotune off: cache directory of %s not writable (%s)", path, e)
    _CACHE_STATE.update(path=path, writable=ok)
  return _CACHE_STATE["writable"]


def candidate_lowerings(x: Array, kernel: Array, strides: Sequence[int],
                        padding: Sequence[tuple[int, int]],
                        dilation: Sequence[int],
                        out_size: Sequence[int]) -> list[str]:
  """Lowerings that apply to this conv and may be the fastest somewhere.

  depth_taps always; out_taps at depth stride 1 with C >= O; full im2col for
  small output planes; the Fourier path for stride-1, undilated convs with
  >= FFT_MIN_TAPS taps (channel and size limits are the tuner's business).
  The rule's choice is always among them.
  """
  b, c = x.shape[0], kernel.shape[3]
  o = kernel.shape[4]
  taps = math.prod(kernel.shape[:3])
  out = ["depth_taps"]
  if strides[0] == 1 and kernel.shape[0] > 1 and o <= c:
    out.append("out_taps")
  if (out_size[1] * out_size[2] <= AUTOTUNE_IM2COL_MAX_PLANE
      and b * math.prod(out_size) * taps * c <= AUTOTUNE_IM2COL_MAX_ELEMS):
    out.append("im2col")
  if (tuple(strides) == (1, 1, 1) and tuple(dilation) == (1, 1, 1)
      and all(p >= 0 for pair in padding for p in pair)
      and taps >= conv_lowering.FFT_MIN_TAPS
      and conv_lowering._batch_devices(x) == 1):
    out.append("fft")
  rule = conv_lowering.rule_lowering(x, kernel, strides, padding, dilation,
                                     out_size)
  if rule not in out:
    out.append(rule)
  return out


def _entry_key(x, kernel, strides, padding, dilation) -> str:
  return (f"x{'x'.join(map(str, x.shape))}_k{'x'.join(map(str, kernel.shape))}"
          f"_s{'x'.join(map(str, strides))}"
          f"_p{'x'.join(f'{lo}-{hi}' for lo, hi in padding)}"
          f"_d{'x'.join(map(str, dilation))}_{jnp.dtype(x.dtype).name}")


def _time_lowering(name: str, x: Array, kernel: Array,
                   out_size: Sequence[int], strides: Sequence[int],
                   padding: Sequence[tuple[int, int]],
                   dilation: Sequence[int],
                   give_up: float = float("inf")) -> float:
  """Best wall seconds of one jitted forward + input and weight gradients.

  Stops repeating once a run takes more than `give_up` seconds (a candidate
  already 2x slower than the best so far is not timed further).
  """
  fn = conv_lowering._LOWERINGS[name]
  with jax.ensure_compile_time_eval():
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal(x.shape, np.float32), x.dtype)
    ws = jnp.asarray(rng.standard_normal(kernel.shape, np.float32) * 0.05,
                     kernel.dtype)

    @jax.jit
    def step(xs, ws):
      y, vjp = jax.vjp(lambda a, k: fn(a, k, out_size, strides, padding,
                                       dilation), xs, ws)
      return vjp(y)
    jax.block_until_ready(step(xs, ws))          # compile + first run
    best = float("inf")
    for _ in range(AUTOTUNE_REPEATS):
      t = time.perf_counter()
      jax.block_until_ready(step(xs, ws))
      best = min(best, time.perf_counter() - t)
      if best > give_up:
        break
  return best


def choose_lowering(x: Array, kernel: Array, strides: Sequence[int],
                    padding: Sequence[tuple[int, int]],
                    dilation: Sequence[int],
                    out_size: Sequence[int]) -> str:
  """The lowering `conv3d_taps` uses: the rules, or the tuned choice."""
  rule = conv_lowering.rule_lowering(x, kernel, strides, padding, dilation,
                                     out_size)
  b, c, o = x.shape[0], kernel.shape[3], kernel.shape[4]
  flops = 2.0 * b * math.prod(out_size) * math.prod(kernel.shape[:3]) * c * o
  if (not autotune_enabled() or flops < AUTOTUNE_MIN_FLOPS
      or conv_lowering._batch_devices(x) > 1 or jax.default_backend() != "cpu"):
    return rule
  cands = candidate_lowerings(x, kernel, strides, padding, dilation, out_size)
  if len(cands) == 1:
    return rule
  key = _entry_key(x, kernel, strides, padding, dilation)
  path = autotune_cache_path()
  mem_key = f"{path}|{key}"
  if mem_key in _TUNED:
    return _TUNED[mem_key]
  entry = _read_cache(path)["entries"].get(key)
  if not (isinstance(entry, dict) and entry.get("choice") in cands):
    if not _cache_writable(path):
      return rule
    t0 = time.perf_counter()
    times = {}
    for n in sorted(cands, key=lambda n: n != rule):     # the rule's first
      times[n] = _time_lowering(n, x, kernel, out_size, strides, padding,
                                dilation, 2.0 * min(times.values(),
                                                    default=float("inf")))
    best = min(times, key=times.get)
    if times[best] > (1.0 - AUTOTUNE_MARGIN) * times[rule]:
      best = rule
    entry = {"choice": best, "rule": rule,
             "ms": {n: round(1e3 * t, 3) for n, t in times.items()},
             "tune_s": round(time.perf_counter() - t0, 2)}
    logging.getLogger(__name__).info("conv autotune %s: %s (rule %s) %s",
                                     key, best, rule, entry["ms"])
    if not _write_cache(path, key, entry):
      _CACHE_STATE.update(path=path, writable=False)
      return rule
  _TUNED[mem_key] = entry["choice"]
  _TUNE_LOG[key] = entry
  return entry["choice"]


def autotune_log() -> dict[str, dict]:
  """This process's tuned convs: entry key -> choice, rule, times (ms)."""
  return dict(_TUNE_LOG)
