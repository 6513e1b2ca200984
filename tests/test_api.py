"""radnet_jax.api, the facade: cheap to import, the names re-exported."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_radnet_jax_is_cheap():
  code = ("import sys, radnet_jax; assert 'jax' not in sys.modules, 'jax imported'; "
          "assert callable(radnet_jax.load); print(sorted(m for m in sys.modules "
          "if m.startswith('radnet_jax')))")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  # radnet_jax.load exists without importing jax until it is called.
  code2 = ("import sys, radnet_jax; f = radnet_jax.load; assert 'jax' not in sys.modules; "
           "import radnet_jax.cli.predict; from radnet_jax import api; assert radnet_jax.predict is api.predict")
  res = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]


def test_facade_names_come_from_their_inference_module():
  from radnet_jax import api
  from radnet_jax.inference import header_qa, inputs, load, segment
  assert api.Loaded is load.Loaded and api.qa_row is header_qa.qa_row
  assert api.preprocess is inputs.preprocess and api.SegPredictor is segment.SegPredictor
  assert api.DEFAULT_THRESHOLD == header_qa.DEFAULT_THRESHOLD
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    api.nope  # pylint: disable=pointless-statement
