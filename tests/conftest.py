"""Test setup: 8 simulated CPU devices (set before jax is imported)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Conv lowerings by the fixed rules (deterministic, no per-shape timing);
# tests/test_conv.py turns the autotuner on where it tests it.
os.environ.setdefault("RADNET_CONV_AUTOTUNE", "0")

import pytest  # noqa: E402  (after the environment above)


@pytest.fixture
def stack_loads(monkeypatch):
  """Counts how DICOM stacks get decoded: ``resampled`` = streamed onto the
  shard grid by ``dicom.stream.load_resampled`` (declines not counted),
  ``full`` = full-resolution ``dicom.volume.load_volume`` calls."""
  from radnet_jax.dicom import stream, volume  # pylint: disable=g-import-not-at-top
  calls = {"resampled": 0, "full": 0}
  real_resampled, real_full = stream.load_resampled, volume.load_volume

  def resampled(*a, **k):
    out = real_resampled(*a, **k)
    calls["resampled"] += out is not None
    return out

  def full(*a, **k):
    calls["full"] += 1
    return real_full(*a, **k)

  monkeypatch.setattr(stream, "load_resampled", resampled)
  monkeypatch.setattr(volume, "load_volume", full)
  return calls
