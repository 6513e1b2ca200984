"""notebooks/quickstart.ipynb runs top to bottom (nbclient, CPU) on a tiny
checkpoint and phantom corpus made here, passed through environment variables."""
import os

import pytest

from tests.test_inference_load import ROOT, make_checkpoint

NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def _text(cell) -> str:
  """A cell's output as a reader sees it: consecutive stream chunks joined as
  written (the kernel may deliver one print in several messages), display
  data on lines of their own."""
  out = []
  for o in cell.get("outputs", []):
    if o.get("output_type") == "stream":
      out.append(o.get("text", ""))
    else:
      out.append("\n" + str(o.get("data", {}).get("text/plain", "")) + "\n")
  return "".join(out)


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  from radnet_jax import phantom
  corpus = str(tmp_path / "corpus")
  phantom.make_corpus(corpus, n=6, seed=3, workers=1, small=True, progress=False)
  wd = str(tmp_path / "run")
  make_checkpoint(wd)
  monkeypatch.setenv("RADNET_CHECKPOINT", wd)
  monkeypatch.setenv("RADNET_DICOM", os.path.join(corpus, "dicom"))
  monkeypatch.setenv("RADNET_SALT", "nb-salt")
  monkeypatch.setenv("PYTHONPATH", ROOT)
  monkeypatch.setenv("XLA_FLAGS", "")          # one CPU device, as in Colab
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("MPLBACKEND", raising=False)   # the kernel's inline backend
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  code = [c for c in nb.cells if c.cell_type == "code"]
  text = "\n".join(_text(c) for c in code)
  assert "checkpoint: " + wd in text
  assert "resnet_tiny, step 3" in text
  assert "6 series" in text and "flagged" in text
  # mean + max of the last three stages (64 + 32 + 16 channels)
  assert "embeddings (6, 224)" in text
  assert "linear probe on sequence" in text and "held-out accuracy" in text
  # The orthogonal-slices figure was drawn.
  assert any("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))
  # The install cell is a no-op here (radnet_jax importable): it printed where from.
  assert os.path.join(ROOT, "radnet_jax") in _text(code[0])
