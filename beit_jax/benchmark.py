r"""Throughput of the MIM train step and of the input pipeline, on this machine.

  python -m beit_jax.benchmark --config=configs/beit_tiny_local.py --batch=32 --steps=10

Prints the step's images/s, its FLOP/s (XLA's count of the compiled step) and that as
a fraction of a matmul ceiling measured in the same run on the same device (a large
square matmul in the model's compute dtype), then the input pipeline's images/s.
The step runs on synthetic batches with a randomly initialised tokenizer: it
measures compute, not data loading.
"""
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
_BATCH = flags.DEFINE_integer("batch", None, "Global batch (default: the config's).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step).")
_PIPELINE_BATCHES = flags.DEFINE_integer("pipeline_batches", 40,
                                         "Batches timed from the input pipeline (0: skip).")
# Batches drawn before timing: start-up, and the buffers the pipeline fills ahead.
_PIPELINE_WARMUP = 10
_MATMUL = flags.DEFINE_integer("matmul_size", 2048, "Side of the ceiling's square matmul.")


def matmul_ceiling(size: int, dtype, repeats: int = 5) -> float:
  """Achieved FLOP/s of a [size, size] @ [size, size] matmul on the default device."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jnp.ones((size, size), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(repeats):
    out = f(a)
  out.block_until_ready()
  return 2 * size**3 * repeats / (time.perf_counter() - t)


def synthetic_batch(config, batch_size: int, seed: int = 0) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from beit_jax import masking  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  s, t = config.input.image_size, config.input.tokenizer_image_size
  grid = (s // config.input.patch_size,) * 2
  spec = masking.mask_spec_from_config(config.input.mask, grid)
  return {"image": rng.normal(size=(batch_size, s, s, 3)).astype(np.float32),
          "tokenizer_image": rng.uniform(size=(batch_size, t, t, 3)).astype(np.float32),
          "mask": np.stack([masking.make_mask_np(spec, rng) for _ in range(batch_size)])}


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from beit_jax import runner  # pylint: disable=g-import-not-at-top
  from beit_jax import sharding  # pylint: disable=g-import-not-at-top
  from beit_jax import tokenizers  # pylint: disable=g-import-not-at-top
  from beit_jax import trainers  # pylint: disable=g-import-not-at-top
  from beit_jax.data import pretrain  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  if _BATCH.value:
    config.input.batch_size = _BATCH.value
  batch_size = config.input.batch_size
  trainers.validate_config(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(batch_size, mesh)
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}, mesh "
        f"{dict(mesh.shape)}, model {config.model.variant}, batch {batch_size}")

  tokenizer = tokenizers.build(config.tokenizer)
  tok_params = tokenizer.init(jax.random.key(0), tokenizers.view(config).size)
  task = trainers.make_task(config, tokenizer=tokenizer, tok_params=tok_params)
  built = runner.setup(config, task, mesh)
  state, step, tok_params = built.state, built.step, built.frozen
  batch = sharding.host_to_global(synthetic_batch(config, batch_size), mesh)

  t0 = time.perf_counter()
  compiled = step.lower(state, batch, tok_params).compile()
  print(f"compile: {time.perf_counter() - t0:.1f} s")
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0))  # per device: the partitioned program

  state, metrics = compiled(state, batch, tok_params)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = compiled(state, batch, tok_params)
  jax.block_until_ready(metrics)
  dt = (time.perf_counter() - t0) / _STEPS.value
  achieved = flops / dt
  ceiling = matmul_ceiling(_MATMUL.value, jnp.dtype(config.model.dtype))
  print(f"train step: {dt * 1e3:.1f} ms, {batch_size / dt:.1f} images/s "
        f"({batch_size / dt / jax.device_count():.1f} per device)")
  print(f"  {flops / 1e9:.2f} GFLOP per step per device (XLA count), "
        f"{achieved / 1e9:.2f} GFLOP/s per device")
  print(f"  matmul ceiling ({_MATMUL.value}^2, {config.model.dtype}): {ceiling / 1e9:.2f} "
        f"GFLOP/s -> step at {100 * achieved / ceiling:.1f}% of ceiling")

  if _PIPELINE_BATCHES.value:
    it = pretrain.make_pretrain_iterator(
        config, tokenizers.pretrain_views(config), seed=0, process_count=jax.process_count(),
        process_index=jax.process_index())
    for _ in range(_PIPELINE_WARMUP):
      next(it)
    t0 = time.perf_counter()
    for _ in range(_PIPELINE_BATCHES.value):
      next(it)
    rate = _PIPELINE_BATCHES.value * batch_size / jax.process_count() / (time.perf_counter() - t0)
    print(f"input pipeline ({config.input.dataset}): {rate:.1f} images/s on this host")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
