"""RadNet-JAX: self-supervised-by-metadata pretraining of 3D CNNs on DICOM.

``radnet_jax.load``, ``radnet_jax.predict``, ``radnet_jax.embed`` and
``radnet_jax.segment`` (see ``radnet_jax.api``, a facade over
``radnet_jax.inference``) are imported lazily, so ``import radnet_jax`` stays
cheap (no jax import).
"""
import os

__version__ = "0.1.0"

# XLA:CPU (jaxlib 0.10) sends 2D convolutions to YNNPACK, which runs each one
# on a single thread; its Eigen convolution uses the whole intra-op pool. The
# CPU conv lowering here (models/conv_lowering.py) is 2D convolutions, and
# on 2 cores the Eigen path made the ResNet-18 64^3 train step ~10% and the
# VNet step ~5-10% faster (bench/RESULTS.md). The flag only takes effect if
# set before jax creates its CPU backend, and only jaxlib versions known to
# accept it get it (XLA aborts on unknown flags). A user's own
# `ynn_fusion_type` setting wins; RADNET_KEEP_XLA_FLAGS=1 leaves XLA_FLAGS
# untouched.
CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
_FLAG_JAXLIB = ("0.10.",)


def _jaxlib_version() -> str | None:
  """jaxlib's version without importing it: from its ``version.py`` (as
  written by its build), else the installed distribution's metadata.
  (``importlib.metadata`` alone costs ~0.1 s of every start-up, which a
  command like build_shards on a small archive notices.)"""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  try:
    spec = importlib.util.find_spec("jaxlib")
  except (ImportError, ValueError):
    return None
  if spec is None:
    return None
  for folder in spec.submodule_search_locations or ():
    try:
      with open(os.path.join(folder, "version.py"), encoding="utf-8") as f:
        m = re.search(r'^_version\s*=\s*"([^"]+)"', f.read(), re.MULTILINE)
    except OSError:
      continue
    if m:
      return m.group(1)
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return metadata.version("jaxlib")
  except Exception:  # pylint: disable=broad-except
    return None


def _configure_xla_cpu() -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  if os.environ.get("RADNET_KEEP_XLA_FLAGS") or "ynn_fusion_type" in flags:
    return
  jaxlib_version = _jaxlib_version()
  if jaxlib_version and jaxlib_version.startswith(_FLAG_JAXLIB):
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_CONV_FLAG}".strip()


_configure_xla_cpu()

_API = ("load", "predict", "embed", "segment", "Loaded")


def __getattr__(name):
  if name in _API:
    from radnet_jax import api  # pylint: disable=g-import-not-at-top
    return getattr(api, name)
  raise AttributeError(f"module 'radnet_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_API))
