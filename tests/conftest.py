"""Test set-up: 8 fake CPU devices (so sharding tests run anywhere), quiet TF, and the
optional PyTorch packages as fixtures (their tests skip without them)."""
import os

import pytest

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def transformers(torch):
  del torch
  return pytest.importorskip("transformers")
