"""Gradient accumulation (`optim.accum_steps`): k micro-batches inside one step are the step
of one batch k times their size (to float32 rounding), on 8 devices too; a bad value is a
one-line ConfigError. (tests/test_resume.py kills and resumes a run that accumulates.)"""

import jax
import numpy as np
import pytest

from beit_jax.training import runner
from beit_jax.training import sharding
from beit_jax import trainers
from beit_jax.errors import ConfigError
from beit_jax.trainers import finetune
from tests import mim_step
from tests.tiny_config import tiny_config
from tests.tiny_config import tiny_finetune_config

BATCH = 32


def _one_device():
  return sharding.make_mesh({"data": 1}, jax.devices()[:1])


def _mim_config(accum_steps=1):
  c = tiny_config()
  c.model.update(dict(depth=1, drop_path_rate=0.0))  # no randomness that depends on the batch
  c.tokenizer.update(dict(n_blk_per_group=1, vocab_size=4))  # some right guesses at init
  c.input.batch_size = BATCH
  c.optim.accum_steps = accum_steps
  c.sharding.min_size = 0
  return c


def _steps(built, mesh, batches, step=None):
  """(params, per-step metrics) after `batches`, from the built initial state."""
  state, metrics, step = built.state, [], step or built.step
  for batch in batches:
    state, m = step(state, sharding.host_to_global(batch, mesh), built.frozen)
    metrics.append(jax.device_get(m))
  return jax.device_get(state.params), metrics


def _mim_built(accum_steps, mesh):
  return mim_step.setup(_mim_config(accum_steps), mesh)


def _assert_same_step(expected, got, keys):
  (p1, m1), (p2, m2) = expected, got
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  for a, b in zip(m1, m2):
    for key in keys:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7, err_msg=key)


MIM_METRICS = (
  "loss",
  "mim_accuracy",
  "grad_norm",
  "majority_baseline",
  "masked_per_image",
  "param_norm",
)


@pytest.fixture(scope="module")
def mim_batches():
  return [mim_step.batch(_mim_config(), seed) for seed in range(2)]


def test_mim_4_micro_batches_on_8_devices_are_one_batch_on_one(mim_batches):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  one = _one_device()
  whole = _steps(_mim_built(1, one), one, mim_batches)
  mesh = sharding.make_mesh({"data": 8})
  built = _mim_built(4, mesh)  # 4 images per device, one in each micro-batch
  batch = sharding.host_to_global(mim_batches[0], mesh)
  compiled = built.step.lower(built.state, batch, built.frozen).compile()
  hlo = compiled.as_text()
  # The strided split is local: no collective moves images; the gradient's all-reduce stays.
  assert "all-to-all" not in hlo and "all-gather" not in hlo and "collective-permute" not in hlo
  assert "all-reduce" in hlo
  params, metrics = _steps(built, mesh, mim_batches, compiled)
  _assert_same_step(whole, (params, metrics), MIM_METRICS)
  # The loss is a mean over masked patches, whose count differs between micro-batches: the
  # plain mean of the micro-batches' losses is another number.
  assert len({int(b["mask"][i::4].sum()) for b in mim_batches for i in range(4)}) > 1
  assert any(m["mim_accuracy"] > 0 for m in metrics)  # the accuracy is compared, not 0 = 0


def test_fine_tuning_2_micro_batches_are_one_batch():
  """Mixup pairs the whole batch; the loss and train accuracy are the whole batch's."""
  config = tiny_finetune_config()
  config.model.update(dict(depth=1, drop_path_rate=0.0))
  config.total_steps, config.optim.warmup_steps = 5, 0
  config.mixup.prob = 1.0
  rng = np.random.default_rng(0)
  batches = [
    {
      "image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
      "label": rng.integers(0, 10, 8).astype(np.int32),
    }
    for _ in range(2)
  ]
  mesh = _one_device()
  results = []
  for accum_steps in (1, 2):
    config.optim.accum_steps = accum_steps
    results.append(_steps(runner.setup(config, finetune.make_task(config), mesh), mesh, batches))
  _assert_same_step(*results, keys=("loss", "train_accuracy", "grad_norm", "param_norm"))


@pytest.mark.parametrize(
  "accum_steps,message",
  [
    (0, r"^optim.accum_steps=0 is invalid; accepted: an integer >= 1"),
    (3, r"^input.batch_size=32 must be divisible by optim.accum_steps=3 "),
  ],
)
def test_a_bad_accum_steps_is_a_one_line_config_error(accum_steps, message):
  config = _mim_config(accum_steps)
  with pytest.raises(ConfigError, match=message) as e:
    trainers.validate_config(config)
  assert "\n" not in str(e.value)


def test_each_device_s_share_must_split_into_the_micro_batches():
  mesh = sharding.make_mesh({"data": 8})
  sharding.check_batch_size(16, mesh, accum_steps=2)
  with pytest.raises(
    ConfigError,
    match=r"^input.batch_size=16 must be divisible by the 8 "
    r"data-parallel devices times optim.accum_steps=4 and 1 processes$",
  ):
    sharding.check_batch_size(16, mesh, accum_steps=4)
