"""radnet_jax.inference.embed (radnet_jax.embed): shapes, arrays, features, Volumes."""
import numpy as np
import pytest

from tests.test_inference_load import INPUT_SHAPE, SHARD_SHAPE, make_checkpoint


def test_embed_shapes_arrays_and_features(tmp_path):
  import radnet_jax
  wd = str(tmp_path / "run")
  make_checkpoint(wd)
  loaded = radnet_jax.load(wd)
  x = np.random.default_rng(1).normal(size=(3, *INPUT_SHAPE)).astype(np.float32)
  e = radnet_jax.embed(loaded, x, features=True, batch_size=2)
  assert e.keys == ["0", "1", "2"]
  # The demo config pools the last three stages by mean and max ("avgmax",
  # pool_stages=3): 2 x (64 + 32 + 16).
  assert loaded.config.model.kwargs.global_pool == "avgmax"
  assert e.embedding.shape == (3, 224) and e.embedding.dtype == np.float32
  # stem (stride 1x2x2), pool 2, stages strides 1, 2, 2, 2 (radnet layout).
  assert [f.shape for f in e.features] == [
      (3, 8, 8, 8, 8), (3, 4, 4, 4, 8), (3, 2, 2, 2, 16), (3, 1, 1, 1, 32), (3, 1, 1, 1, 64)]
  # The embedding is the mean, then the max, of each of the last three
  # stages, the last stage first, and batching does not change it.
  parts = [g(f, axis=(1, 2, 3)) for f in e.features[:1:-1] for g in (np.mean, np.max)]
  assert [p.shape[1] for p in parts] == [64, 64, 32, 32, 16, 16]
  np.testing.assert_allclose(e.embedding, np.concatenate(parts, axis=1), rtol=1e-5, atol=1e-6)
  one = radnet_jax.embed(loaded, x[1])
  np.testing.assert_allclose(one.embedding[0], e.embedding[1], rtol=1e-5, atol=1e-6)
  # A bare module + variables works too; a bare module without them does not.
  model, variables, _ = loaded
  np.testing.assert_allclose(radnet_jax.embed(model, x, variables=variables).embedding,
                             e.embedding, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="variables="):
    radnet_jax.embed(model, x)


def test_embed_volumes_use_shard_preprocessing(tmp_path):
  """A Volume goes through convert.cache_record + centre crop, as in the shards."""
  import radnet_jax
  from radnet_jax import api
  from radnet_jax.shards import convert
  from radnet_jax.data import pretrain as input_pipeline
  from radnet_jax.dicom.types import Volume
  wd = str(tmp_path / "run")
  make_checkpoint(wd)
  loaded = radnet_jax.load(wd)
  rng = np.random.default_rng(2)
  vox = rng.normal(0, 300, size=(30, 40, 36)).astype(np.float32)
  vol = Volume(vox, np.diag([0.8, 0.7, 2.5, 1.0])[[2, 1, 0, 3]], np.array([2.5, 0.7, 0.8]),
               {"Modality": "CT"})
  x, cached = api.preprocess(vol, SHARD_SHAPE, INPUT_SHAPE)
  ref = convert.cache_record(type("S", (), {"key": "k", "record": {}})(), vol, SHARD_SHAPE)
  ref_x = input_pipeline.to_example({"volume": ref["volume"]}, INPUT_SHAPE)["volume"]
  np.testing.assert_array_equal(x, ref_x)
  assert x.shape == (*INPUT_SHAPE, 1) and cached["normalisation"].startswith("ct_window")
  e = radnet_jax.embed(loaded, [vol, vol])
  np.testing.assert_allclose(e.embedding, radnet_jax.embed(loaded, x[None]).embedding.repeat(2, 0),
                             rtol=1e-5, atol=1e-6)
