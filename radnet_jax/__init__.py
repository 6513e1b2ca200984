"""RadNet-JAX: self-supervised-by-metadata pretraining of 3D CNNs on DICOM.

``radnet_jax.load``, ``radnet_jax.predict`` and ``radnet_jax.embed`` (see
``radnet_jax.api``) are imported lazily, so ``import radnet_jax`` stays cheap
(no jax import).
"""
__version__ = "0.1.0"

_API = ("load", "predict", "embed", "Loaded")


def __getattr__(name):
  if name in _API:
    if name == "predict":
      # The ``radnet_jax.predict`` submodule (the CLI) is callable and replaces
      # this attribute once imported; return it so both spellings agree.
      import importlib  # pylint: disable=g-import-not-at-top
      return importlib.import_module("radnet_jax.predict")
    from radnet_jax import api  # pylint: disable=g-import-not-at-top
    return getattr(api, name)
  raise AttributeError(f"module 'radnet_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_API))
