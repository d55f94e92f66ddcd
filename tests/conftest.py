"""Test set-up: 8 fake CPU devices (so sharding tests run anywhere), quiet TF, one XLA
compilation cache for the session, the optional PyTorch packages as fixtures (their tests
skip without them), and a pretraining checkpoint the fine-tuning and segmentation tests
start from."""

import os
import tempfile

import pytest

# Must happen before jax is imported anywhere. LLVM's optimisations off: they double the
# compile time of the tests' tiny programs (most of a run's time) and change no result a
# test compares (the runs it compares are compiled alike); `runs.cpu_env` passes them on.
os.environ.setdefault(
  "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The end-to-end tests start dozens of runs of the same tiny configs, each compiling the same
# steps (a third of a run's time): every worker and every run it starts shares JAX's
# persistent cache (keyed by the program, the flags and the versions, so a hit is the same
# executable; an unreadable entry is recompiled).
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "beit_jax_tests_xla_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def pytest_collection_modifyitems(items):
  """Files with end-to-end (slow) tests first: with `--dist loadfile` and no reordering by
  test count (pytest.ini), the two workers then do not end on one long file each."""
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def transformers(torch):
  del torch
  return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A MIM checkpoint of tests/tiny_config.py's model (32 px, 4x4 patches) with every weight
  away from any init: (its path, its params flattened to 'a/b/c' keys)."""
  # pylint: disable=g-import-not-at-top: jax only after XLA_FLAGS above
  import json
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import traverse_util
  from beit_jax.training import checkpoint
  from beit_jax.training import mim_objective  # pylint: disable=g-import-not-at-top
  from tests.tiny_config import tiny_config

  config = tiny_config()
  model = mim_objective.make_model(config)
  shapes = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), bool)
  )["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32) + 3.0, shapes)
  path = str(tmp_path_factory.mktemp("pretrained"))
  checkpoint.save_params(path, params, json.loads(config.to_json_best_effort()))
  return path, traverse_util.flatten_dict(params, sep="/")
