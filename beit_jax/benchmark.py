r"""Throughput of the MIM train step and of the input pipeline, on this machine.

  python -m beit_jax.benchmark --config=configs/beit_tiny_local.py --batch=32 --steps=10

Prints the step's images/s, its FLOP/s (XLA's count of the compiled step) and that as
a fraction of a matmul ceiling measured in the same run on the same device (a large
square matmul in the model's compute dtype) and of the device's peak when it is a known
accelerator, then the input pipeline's images/s, in all and per CPU core. The step runs on
synthetic batches with random tokenizer weights: it measures compute, not data loading, so
it runs on any MIM config, and without TensorFlow; when the config's data set is not on this
machine, or TensorFlow (which the input pipeline needs) is not installed, the pipeline part
is skipped with a note.

  python -m beit_jax.benchmark --config=configs/beit_base.py --batch=8 --steps=3 \
      --compare-pytorch --dtypes=float32,bfloat16

times instead, in one process and alternating step by step (so load from elsewhere hits
both alike), beit-jax's step and the unilm-equivalent PyTorch step
(`beit_jax/torch_reference.py`: DALL-E encoder + HF BEiT, AdamW) on the same batch, once
per `--dtypes` entry (`model.dtype`; torch autocast for bfloat16), and where each one's
time goes. Needs the optional packages of requirements-interop.txt.
"""
import dataclasses
import os
import sys
import time
from typing import Any, NamedTuple

from absl import app
from absl import flags
from ml_collections import config_flags

from beit_jax.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")  # model.dtype's, as --dtypes takes them

# Batches drawn before timing: start-up, and the buffers the pipeline fills ahead.
_PIPELINE_WARMUP = 10
# Matmuls per ceiling sample of --compare-pytorch: about a second at 2048^2, so that load from
# elsewhere averages out as over the steps it sits between.
_CEILING_REPEATS = 10
# Untimed rounds (a JAX step, then a PyTorch step) before --compare-pytorch times: the first
# rounds also grow the host allocator's heaps (page faults a long run pays once).
_WARMUP_ROUNDS = 2


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


@dataclasses.dataclass
class _Built:
  """beit-jax's MIM step compiled for `config`, with what it runs on."""
  config: Any  # with input.dataset 'embedded' when the config's data are not here
  missing: str | None  # why the input pipeline cannot read the config's data here, or None
  tokenizer: Any
  tx: Any
  state: Any
  compiled: Any
  host_batch: dict
  batch: Any  # host_batch on the mesh
  tok_params: Any
  flops: float  # XLA's count per device


def _build(config) -> _Built:
  """Compiles `config`'s MIM step on synthetic batches, random tokenizer weights."""
  import jax  # pylint: disable=g-import-not-at-top
  from beit_jax import runner  # pylint: disable=g-import-not-at-top
  from beit_jax import sharding  # pylint: disable=g-import-not-at-top
  from beit_jax import tokenizers  # pylint: disable=g-import-not-at-top
  from beit_jax import trainers  # pylint: disable=g-import-not-at-top
  from beit_jax import hardware  # pylint: disable=g-import-not-at-top
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
    missing = f"its data are not here ({e})"
  except ImportError as e:  # reading them needs TensorFlow; the step does not
    missing = f"it needs TensorFlow ({e})"
  if missing:
    config = config.copy_and_resolve_references()
    config.input.dataset = "embedded"
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}, mesh "
        f"{dict(mesh.shape)}, model {config.model.variant} ({config.model.dtype}), "
        f"batch {batch_size}")

  tokenizer = tokenizers.build(config.tokenizer)
  size = tokenizers.view(config).size
  tok_params = host_random(jax.eval_shape(lambda k: tokenizer.init(k, size), jax.random.key(0)))
  task = trainers.make_task(config, tokenizer=tokenizer, tok_params=tok_params)
  built = runner.setup(config, task, mesh)
  host_batch = synthetic_batch(config, batch_size)
  batch = sharding.host_to_global(host_batch, mesh)

  t0 = time.perf_counter()
  compiled = built.step.lower(built.state, batch, built.frozen).compile()
  print(f"compile: {time.perf_counter() - t0:.1f} s")
  return _Built(config, missing, tokenizer, task.tx, built.state, compiled, host_batch,
                batch, built.frozen, hardware.xla_flops(compiled))  # per device


def benchmark(config, *, steps: int = 10, pipeline_batches: int = 40,
              matmul_size: int = 2048) -> dict[str, float]:
  """Times `config`'s MIM step (and its input pipeline if its data are here); prints the
  figures and returns them."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from beit_jax import hardware  # pylint: disable=g-import-not-at-top
  from beit_jax import tokenizers  # pylint: disable=g-import-not-at-top
  from beit_jax.data import pretrain  # pylint: disable=g-import-not-at-top

  b = _build(config)
  config, state, compiled, flops = b.config, b.state, b.compiled, b.flops
  batch_size = config.input.batch_size
  state, metrics = compiled(state, b.batch, b.tok_params)
  jax.block_until_ready(metrics)
  def run():
    state_, metrics_ = state, None
    for _ in range(steps):
      state_, metrics_ = compiled(state_, b.batch, b.tok_params)
    return jax.block_until_ready(metrics_)
  cost = HostCost(*(x / steps for x in _host_cost(run)[1]))  # per step
  dt = cost.wall
  achieved = flops / dt
  ceiling = hardware.matmul_ceiling(matmul_size, jnp.dtype(config.model.dtype))
  out = dict(step_seconds=dt, images_per_sec=batch_size / dt, flops_per_step=flops,
             ceiling_flops=ceiling, cpu_seconds_per_step=cost.cpu,
             kernel_seconds_per_step=cost.kernel, page_faults_per_step=cost.faults)
  print(f"train step: {dt * 1e3:.1f} ms, {batch_size / dt:.1f} images/s "
        f"({batch_size / dt / jax.device_count():.1f} per device)")
  print(f"  {flops / 1e9:.2f} GFLOP per step per device (XLA count), "
        f"{achieved / 1e9:.2f} GFLOP/s per device")
  print(f"  host: {_host_line(cost)}")
  print(f"  matmul ceiling ({matmul_size}^2, {config.model.dtype}): {ceiling / 1e9:.2f} "
        f"GFLOP/s -> step at {100 * achieved / ceiling:.1f}% of ceiling")
  known = hardware.known_device(jax.devices()[0].device_kind)
  if known is not None:
    out["mfu"] = achieved / (known.peak_tflops * 1e12)
    print(f"  {known.kind} peak {known.peak_tflops:g} TFLOP/s (bf16, {known.source}) -> "
          f"MFU {100 * out['mfu']:.1f}%")

  if not pipeline_batches:
    return out
  if b.missing:
    print(f"input pipeline: skipped, {b.missing}")
    return out
  try:
    it = pretrain.make_pretrain_iterator(
        config, tokenizers.pretrain_views(config), seed=0, process_count=jax.process_count(),
        process_index=jax.process_index())
  except ImportError as e:  # the embedded set's count needed no TensorFlow, its pipeline does
    print(f"input pipeline: skipped, it needs TensorFlow ({e})")
    return out
  for _ in range(_PIPELINE_WARMUP):
    next(it)
  t0, cpu0 = time.perf_counter(), time.process_time()
  for _ in range(pipeline_batches):
    next(it)
  images = pipeline_batches * batch_size / jax.process_count()
  rate = images / (time.perf_counter() - t0)
  # Images per second of this process's CPU time (all its threads): what one fully used
  # core yields, whatever else the machine runs; x a host's vCPUs: that host's ceiling.
  per_cpu_second = images / max(time.process_time() - cpu0, 1e-9)
  # tf.data's threads run on the cores this process may use (its thread pools' default).
  cores = len(os.sched_getaffinity(0))
  out.update(pipeline_images_per_sec=rate, pipeline_images_per_sec_per_core=rate / cores,
             pipeline_images_per_cpu_second=per_cpu_second)
  print(f"input pipeline ({config.input.dataset}): {rate:.1f} images/s on this host, "
        f"{rate / cores:.1f} per CPU core ({cores} cores), {per_cpu_second:.1f} per "
        f"CPU-second used -- the step takes "
        f"{batch_size / jax.process_count() / dt:.1f} images/s per host")
  return out


def sig3(x: float) -> str:
  """`x` to three significant digits, trailing zeros kept, never in exponent form
  (0.5 -> '0.500', 1234 -> '1230')."""
  import math  # pylint: disable=g-import-not-at-top
  x = float(f"{x:.3g}")
  return f"{x:.{max(2 - math.floor(math.log10(abs(x))), 0)}f}" if x else "0.00"


class HostCost(NamedTuple):
  """A call's wall seconds, and over it the process's CPU seconds (all threads), the
  kernel's part of them and its minor page faults: on CPU, the kernel's part of a step is
  mostly first touches of memory that the allocator handed back to the OS (docs/performance.md,
  "Host memory on CPU: the allocator settings")."""
  wall: float
  cpu: float
  kernel: float
  faults: float


def _host_cost(fn) -> tuple[Any, HostCost]:
  """`fn()` and what the call cost the host."""
  import resource  # pylint: disable=g-import-not-at-top
  r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  out = fn()
  dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
  kernel = r1.ru_stime - r0.ru_stime
  return out, HostCost(dt, r1.ru_utime - r0.ru_utime + kernel, kernel,
                       r1.ru_minflt - r0.ru_minflt)


def _host_line(c: HostCost) -> str:
  return (f"CPU {sig3(c.cpu)} s per step, {100 * c.kernel / max(c.cpu, 1e-9):.0f}% of it in "
          f"the kernel; {c.faults:,.0f} minor page faults per step "
          f"({sig3(c.faults * 4096 / 2**30)} GiB of 4 KiB pages)")


def _import_torch_reference():
  """beit_jax.torch_reference, or a one-line error naming the package that is missing."""
  try:
    from beit_jax import torch_reference  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    raise ConfigError(f"--compare-pytorch needs the {e.name!r} package, not installed here: "
                      "pip install -r requirements-interop.txt (and, for dall_e, "
                      "pip install --no-deps DALL-E==0.1)") from e
  return torch_reference


def _check_comparable(config) -> None:
  """The PyTorch reference is BEiT v1's step: DALL-E tokens, one MIM head."""
  why = []
  if config.get("mim_target", "tokens") != "tokens":
    why.append(f"mim_target={config.mim_target!r}")
  if config.tokenizer.get("kind") != "dvae":
    why.append(f"tokenizer.kind={config.tokenizer.get('kind')!r}")
  if config.model.get("patch_aggregation") is not None:
    why.append("model.patch_aggregation is set")
  if config.model.get("use_rel_pos_bias"):
    why.append("model.use_rel_pos_bias=True")
  if why:
    raise ConfigError(f"--compare-pytorch times BEiT v1's step (mim_target='tokens', "
                      f"tokenizer.kind='dvae', no patch aggregation or per-block relative "
                      f"position bias); this config has {', '.join(why)}")


def _torch_step(torch_reference, config):
  """The PyTorch reference step of the same model, tokenizer and optimizer as `config`."""
  from beit_jax.convert import hf  # pylint: disable=g-import-not-at-top
  from beit_jax.models import vit  # pylint: disable=g-import-not-at-top
  m, tok, opt = config.model, config.tokenizer, config.optim
  kw = dict(vit.size_kwargs(m), image_size=config.input.image_size,
            vocab_size=tok.vocab_size, num_classes=0, use_abs_pos_emb=m.use_abs_pos_emb,
            use_rel_pos_bias=False, use_shared_rel_pos_bias=m.use_shared_rel_pos_bias,
            layer_scale_init=m.layer_scale_init)
  # The tokenizer config has no dtype: the dVAE runs in float32 in both (unilm: outside
  # autocast).
  return torch_reference.build(
      hf.config_json(kw), drop_path_rate=m.drop_path_rate,
      tokenizer=dict(n_hid=tok.n_hid, n_blk_per_group=tok.n_blk_per_group,
                     vocab_size=tok.vocab_size),
      optim=dict(lr=opt.lr, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                 weight_decay=opt.weight_decay, grad_clip=opt.grad_clip),
      autocast=None if m.dtype == "float32" else m.dtype, seed=config.seed)


def _jax_breakdown(b: _Built, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
  """(seconds, XLA FLOPs) of the JAX step's parts, each jitted alone from the functions the
  step calls and timed (blocking, mean of `repeats`) after a warm-up: tokenizer forward,
  ViT forward + loss, backward (forward + backward minus forward), the optimizer update
  (donated, as in the step)."""
  import jax  # pylint: disable=g-import-not-at-top
  from beit_jax import hardware  # pylint: disable=g-import-not-at-top
  from beit_jax import train_state  # pylint: disable=g-import-not-at-top
  from beit_jax import mim_objective as mim  # pylint: disable=g-import-not-at-top
  config = b.config
  model = mim.make_model(config)
  mask = config.input.mask
  max_masked = max(mask.num_masking_patches, mask.get("max_num_patches") or 0)
  rng = jax.random.key(0)

  def loss_fn(params, batch, tokens):
    positions, weights = mim.masked_positions(batch["mask"], max_masked)
    targets = mim.targets_at(batch, positions, tokens, model.patch_size)
    return mim.objective(params, model, batch, positions, targets, weights, rng)[0]

  def timed(fn, *args, donate: bool = False):
    """(mean seconds, XLA FLOPs, last output) of `fn` jitted; `donate`: its first argument
    is donated and each call takes the previous call's output there. Everything is an
    argument: a closed-over array would be a constant XLA folds ahead of time."""
    compiled = jax.jit(fn, donate_argnums=(0,) if donate else ()).lower(*args).compile()
    out = jax.block_until_ready(compiled(*args))
    t0 = time.perf_counter()
    for _ in range(repeats):
      out = jax.block_until_ready(compiled(*((out, *args[1:]) if donate else args)))
    return (time.perf_counter() - t0) / repeats, hardware.xla_flops(compiled), out

  seconds, flops = {}, {}
  images = b.batch["tokenizer_image"]
  seconds["tokenizer"], flops["tokenizer"], tokens = timed(b.tokenizer.tokenize, b.tok_params,
                                                           images)
  seconds["forward"], flops["forward"], _ = timed(loss_fn, b.state.params, b.batch, tokens)
  t, f, (loss, grads) = timed(jax.value_and_grad(loss_fn), b.state.params, b.batch, tokens)
  seconds["backward"], flops["backward"] = t - seconds["forward"], f - flops["forward"]
  seconds["optimizer"], flops["optimizer"], b.state = timed(
      lambda s, g, l: train_state.apply_gradients(s, g, l, b.tx)[0], b.state, grads, loss,
      donate=True)
  return seconds, flops


def compare_pytorch(config, *, steps: int = 3, matmul_size: int = 2048) -> dict[str, float]:
  """Times `config`'s JAX MIM step and the PyTorch reference step in turns, on one batch;
  prints both rates, their ratio, FLOP/s, ceilings and where the time goes; returns them."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from beit_jax import hardware  # pylint: disable=g-import-not-at-top

  torch_reference = _import_torch_reference()
  _check_comparable(config)
  b = _build(config)
  config, compiled, dtype = b.config, b.compiled, config.model.dtype
  batch_size = config.input.batch_size
  ref = _torch_step(torch_reference, config)
  torch_batch = torch_reference.to_torch(b.host_batch)
  print(torch_reference.describe(ref))

  def jax_step():
    b.state, metrics = compiled(b.state, b.batch, b.tok_params)
    return jax.block_until_ready(metrics)

  for _ in range(_WARMUP_ROUNDS):
    jax_step()
    ref(**torch_batch)
  jax_costs, torch_costs, torch_phases, ceilings, torch_ceilings = [], [], [], [], []
  for _ in range(steps):  # in turns, each with its ceiling: load from elsewhere hits all alike
    jax_costs.append(_host_cost(jax_step)[1])
    ceilings.append(hardware.matmul_ceiling(matmul_size, jnp.dtype(dtype), _CEILING_REPEATS))
    phases, cost = _host_cost(lambda: ref(**torch_batch))
    torch_costs.append(cost)
    torch_phases.append(phases)
    torch_ceilings.append(torch_reference.matmul_ceiling(matmul_size, dtype, _CEILING_REPEATS))
  jax_times, torch_times = [c.wall for c in jax_costs], [c.wall for c in torch_costs]

  flops = b.flops * jax.device_count()  # the whole batch's
  jax_dt, torch_dt = float(np.mean(jax_times)), float(np.mean(torch_times))
  ceiling, torch_ceiling = float(np.mean(ceilings)), float(np.mean(torch_ceilings))
  out = dict(jax_images_per_sec=batch_size / jax_dt, torch_images_per_sec=batch_size / torch_dt,
             flops_per_step=flops, jax_flops_per_sec=flops / jax_dt,
             torch_flops_per_sec=flops / torch_dt, ceiling_flops=ceiling,
             torch_ceiling_flops=torch_ceiling)
  out["ratio"] = out["jax_images_per_sec"] / out["torch_images_per_sec"]
  autocast = "" if dtype == "float32" else f", torch autocast {dtype}"
  print(f"{dtype}{autocast}: batch {batch_size}, {steps} steps of each in turns "
        f"(after {_WARMUP_ROUNDS} warm-up rounds)")
  for name, dt, achieved, ceil, whose in (
      ("JAX    ", jax_dt, out["jax_flops_per_sec"], ceiling, "jnp"),
      ("PyTorch", torch_dt, out["torch_flops_per_sec"], torch_ceiling, "torch")):
    print(f"  {name} {sig3(batch_size / dt)} images/s ({sig3(dt)} s per step), "
          f"{sig3(achieved / 1e9)} GFLOP/s = {100 * achieved / ceil:.1f}% of the {whose} "
          f"matmul ceiling ({sig3(ceil / 1e9)} GFLOP/s, {matmul_size}^2 {dtype}, one after "
          f"each step)")
  for name, key, times, costs in (("JAX", "jax", jax_times, jax_costs),
                                  ("PyTorch", "torch", torch_times, torch_costs)):
    mean = HostCost(*map(float, np.mean(costs, axis=0)))
    out.update({f"{key}_cpu_seconds": mean.cpu, f"{key}_kernel_seconds": mean.kernel,
                f"{key}_page_faults": mean.faults})
    print(f"  {name:<7} steps {', '.join(sig3(t) for t in times)} s; {_host_line(mean)}")
  print(f"  JAX/PyTorch: {sig3(out['ratio'])}x")
  print(f"  FLOP/s of both: XLA's count of the compiled JAX step, {sig3(flops / 1e9)} GFLOP "
        f"per step, over each one's step time: the two do the same work")

  jax_parts, part_flops = _jax_breakdown(b, steps)
  part_flops["rest"] = b.flops - sum(part_flops.values())  # per device, as the parts'
  jax_parts["rest"] = jax_dt - sum(jax_parts.values())
  torch_parts = {k: float(np.mean([p[k] for p in torch_phases]))
                 for k in torch_reference.PHASES}
  torch_parts["rest"] = torch_dt - sum(torch_parts.values())
  out.update({f"jax_{k}_seconds": v for k, v in jax_parts.items()})
  out.update({f"torch_{k}_seconds": v for k, v in torch_parts.items()})
  print("  where the time goes, s per step (JAX: each part jitted alone, mean of "
        f"{steps}; rest = step - parts: mask positions, metrics, dispatch, fusion across "
        "parts; PyTorch: timed inside its steps)")
  print("    " + " " * 9 + "".join(f"{k:>11}" for k in jax_parts))
  for name, parts in (("JAX", jax_parts), ("PyTorch", torch_parts)):
    print(f"    {name:<9}" + "".join(f"{sig3(v):>11}" for v in parts.values()))
  print(f"    {'GFLOP':<9}" + "".join(f"{sig3(v / 1e9):>11}" for v in part_flops.values())
        + "  (XLA's count of each JAX part, per device)")
  print(f"    {'JAX %':<9}" + "".join(
      f"{100 * part_flops[k] / jax_parts[k] / ceiling:>10.1f}%" for k in jax_parts
      if k != "rest") + "  (of the jnp matmul ceiling)")
  return out


def main(argv):
  del argv
  config = _CONFIG.value
  if _BATCH.value:
    config.input.batch_size = _BATCH.value
  try:
    bad = [d for d in _DTYPES.value if d not in DTYPES]
    if bad:
      raise ConfigError(f"--dtypes={','.join(_DTYPES.value)}: {', '.join(bad)} not "
                        f"accepted; accepted: comma-separated {', '.join(DTYPES)}")
    for dtype in _DTYPES.value or [config.model.dtype]:
      config.model.dtype = dtype
      if _COMPARE.value:
        compare_pytorch(config, steps=_STEPS.value, matmul_size=_MATMUL.value)
      else:
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
  _COMPARE = flags.DEFINE_bool(
      "compare-pytorch", False, "Time the unilm-equivalent PyTorch step in turns with the "
      "JAX step (needs requirements-interop.txt) instead of the input pipeline.")
  _DTYPES = flags.DEFINE_list(
      "dtypes", [], f"model.dtype values to time one after the other, of {DTYPES} "
      "(default: the config's).")
  flags.mark_flag_as_required("config")
  app.run(main)
