r"""Throughput of the MIM train step and of the input pipeline, on this machine.

  python -m beit_jax.benchmark --config=configs/beit_tiny_local.py --batch=32 --steps=10

Prints the step's images/s, its FLOP/s (XLA's count of the compiled step) and that as
a fraction of a matmul ceiling measured in the same run on the same device (a large
square matmul in the model's compute dtype) and of the device's peak when it is a known
accelerator, then the input pipeline's images/s, in all and per CPU core. The step runs on
synthetic batches with random tokenizer weights: it measures compute, not data loading, so
it runs on any MIM config; when the config's data set is not on this machine, the pipeline
part is skipped with a note.
"""
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from beit_jax.errors import ConfigError

# Batches drawn before timing: start-up, and the buffers the pipeline fills ahead.
_PIPELINE_WARMUP = 10


def synthetic_batch(config, batch_size: int, seed: int = 0) -> dict:
  """A host batch shaped like the MIM pipeline's: one image per view, a mask."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from beit_jax import masking  # pylint: disable=g-import-not-at-top
  from beit_jax import tokenizers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  grid = (config.input.image_size // config.input.patch_size,) * 2
  spec = masking.mask_spec_from_config(config.input.mask, grid)
  out = {name: rng.uniform(size=(batch_size, view.size, view.size, 3)).astype(np.float32)
         for name, view in tokenizers.pretrain_views(config).items()}
  out["mask"] = np.stack([masking.make_mask_np(spec, rng) for _ in range(batch_size)])
  return out


def host_random(shapes, seed: int = 0):
  """Normal(0, 0.02) arrays of `shapes` (ShapeDtypeStructs) drawn by NumPy: stand-in
  weights for a frozen model without compiling its init (over a minute for the dVAE's on
  CPU); the step does the same work whatever their values."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(s.dtype), shapes)


def benchmark(config, *, steps: int = 10, pipeline_batches: int = 40,
              matmul_size: int = 2048) -> dict[str, float]:
  """Times `config`'s MIM step (and its input pipeline if its data are here); prints the
  figures and returns them."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from beit_jax import hardware  # pylint: disable=g-import-not-at-top
  from beit_jax import runner  # pylint: disable=g-import-not-at-top
  from beit_jax import sharding  # pylint: disable=g-import-not-at-top
  from beit_jax import tokenizers  # pylint: disable=g-import-not-at-top
  from beit_jax import trainers  # pylint: disable=g-import-not-at-top
  from beit_jax.data import pretrain  # pylint: disable=g-import-not-at-top

  if config.get("trainer") != "mim":
    raise ConfigError(f"trainer={config.get('trainer')!r}: the benchmark times MIM "
                      "pretraining configs (trainer='mim') only")
  trainers.validate_config(config)
  batch_size = config.input.batch_size
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(batch_size, mesh)
  try:
    pretrain.num_train_examples(config)
    missing = None
  except ConfigError as e:  # the step needs the data only for its schedule's epoch length
    missing = str(e)
    config = config.copy_and_resolve_references()
    config.input.dataset = "embedded"
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}, mesh "
        f"{dict(mesh.shape)}, model {config.model.variant}, batch {batch_size}")

  tokenizer = tokenizers.build(config.tokenizer)
  size = tokenizers.view(config).size
  tok_params = host_random(jax.eval_shape(lambda k: tokenizer.init(k, size), jax.random.key(0)))
  task = trainers.make_task(config, tokenizer=tokenizer, tok_params=tok_params)
  built = runner.setup(config, task, mesh)
  state, step, tok_params = built.state, built.step, built.frozen
  batch = sharding.host_to_global(synthetic_batch(config, batch_size), mesh)

  t0 = time.perf_counter()
  compiled = step.lower(state, batch, tok_params).compile()
  print(f"compile: {time.perf_counter() - t0:.1f} s")
  flops = hardware.xla_flops(compiled)  # per device: the partitioned program

  state, metrics = compiled(state, batch, tok_params)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch, tok_params)
  jax.block_until_ready(metrics)
  dt = (time.perf_counter() - t0) / steps
  achieved = flops / dt
  ceiling = hardware.matmul_ceiling(matmul_size, jnp.dtype(config.model.dtype))
  out = dict(step_seconds=dt, images_per_sec=batch_size / dt, flops_per_step=flops,
             ceiling_flops=ceiling)
  print(f"train step: {dt * 1e3:.1f} ms, {batch_size / dt:.1f} images/s "
        f"({batch_size / dt / jax.device_count():.1f} per device)")
  print(f"  {flops / 1e9:.2f} GFLOP per step per device (XLA count), "
        f"{achieved / 1e9:.2f} GFLOP/s per device")
  print(f"  matmul ceiling ({matmul_size}^2, {config.model.dtype}): {ceiling / 1e9:.2f} "
        f"GFLOP/s -> step at {100 * achieved / ceiling:.1f}% of ceiling")
  known = hardware.known_device(jax.devices()[0].device_kind)
  if known is not None:
    out["mfu"] = achieved / (known.peak_tflops * 1e12)
    print(f"  {known.kind} peak {known.peak_tflops:g} TFLOP/s (bf16, {known.source}) -> "
          f"MFU {100 * out['mfu']:.1f}%")

  if not pipeline_batches:
    return out
  if missing:
    print(f"input pipeline: skipped, its data are not here ({missing})")
    return out
  it = pretrain.make_pretrain_iterator(
      config, tokenizers.pretrain_views(config), seed=0, process_count=jax.process_count(),
      process_index=jax.process_index())
  for _ in range(_PIPELINE_WARMUP):
    next(it)
  t0 = time.perf_counter()
  for _ in range(pipeline_batches):
    next(it)
  rate = pipeline_batches * batch_size / jax.process_count() / (time.perf_counter() - t0)
  # tf.data's threads run on the cores this process may use (its thread pools' default).
  cores = len(os.sched_getaffinity(0))
  out.update(pipeline_images_per_sec=rate, pipeline_images_per_sec_per_core=rate / cores)
  print(f"input pipeline ({config.input.dataset}): {rate:.1f} images/s on this host, "
        f"{rate / cores:.1f} per CPU core ({cores} cores) -- the step takes "
        f"{batch_size / jax.process_count() / dt:.1f} images/s per host")
  return out


def main(argv):
  del argv
  config = _CONFIG.value
  if _BATCH.value:
    config.input.batch_size = _BATCH.value
  try:
    benchmark(config, steps=_STEPS.value, pipeline_batches=_PIPELINE_BATCHES.value,
              matmul_size=_MATMUL.value)
  except ConfigError as e:
    sys.exit(f"beit_jax.benchmark: error: {e}")


if __name__ == "__main__":
  # Flags only when run as a program: tests import `benchmark` beside `main`'s flags.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
  _BATCH = flags.DEFINE_integer("batch", None, "Global batch (default: the config's).")
  _STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step).")
  _PIPELINE_BATCHES = flags.DEFINE_integer(
      "pipeline_batches", 40, "Batches timed from the input pipeline (0: skip).")
  _MATMUL = flags.DEFINE_integer("matmul_size", 2048, "Side of the ceiling's square matmul.")
  flags.mark_flag_as_required("config")
  app.run(main)
