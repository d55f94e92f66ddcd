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

times instead beit-jax's step and the unilm-equivalent PyTorch step
(`beit_jax/convert/torch_reference.py`: DALL-E encoder + HF BEiT, AdamW) as users run them: each
framework in processes of its own, alternating (JAX, PyTorch, JAX, PyTorch, ...: `--rounds`
of each, so that load from elsewhere hits both alike), each process warming up and then
timing `--steps` steps on the same batch, once per `--dtypes` entry (`model.dtype`; torch
autocast for bfloat16). It prints each one's median step time, images/s, share of its own
framework's matmul ceiling, the ratio and where each one's time goes, and ends with one
`json:` line holding all of it. On a GPU the PyTorch step runs on the GPU too (bf16
autocast, scaled_dot_product_attention). Needs the optional packages of
requirements-interop.txt.
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
# Matmuls per ceiling sample of --compare-pytorch (about a second at 2048^2 on a CPU), and the
# samples each process takes after its steps (their median is its ceiling).
_CEILING_REPEATS = 10
_CEILING_SAMPLES = 3
# --compare-pytorch's processes: the framework names it prints, and the prefix of a child's
# one-line ConfigError on its stderr (the parent raises it again).
_NAMES = {"jax": "JAX", "torch": "PyTorch"}
_CHILD_ERROR = "beit_jax.benchmark child error: "


def synthetic_batch(config, batch_size: int, seed: int = 0) -> dict:
  """A host batch shaped like the MIM pipeline's: one image per view, a mask."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from beit_jax.data import masking  # pylint: disable=g-import-not-at-top
  from beit_jax import tokenizers  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  grid = (config.input.image_size // config.input.patch_size,) * 2
  spec = masking.mask_spec_from_config(config.input.mask, grid)
  out = {
    name: rng.uniform(size=(batch_size, view.size, view.size, 3)).astype(np.float32)
    for name, view in tokenizers.pretrain_views(config).items()
  }
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
  frozen: dict  # the step's: {'tokenizer': its params}
  flops: float  # XLA's count per device


def _check_trainer(config) -> None:
  if config.get("trainer") != "mim":
    raise ConfigError(
      f"trainer={config.get('trainer')!r}: the benchmark times MIM "
      "pretraining configs (trainer='mim') only"
    )


def _build(config) -> _Built:
  """Compiles `config`'s MIM step on synthetic batches, random tokenizer weights."""
  import jax  # pylint: disable=g-import-not-at-top
  from beit_jax.training import runner  # pylint: disable=g-import-not-at-top
  from beit_jax.training import sharding  # pylint: disable=g-import-not-at-top
  from beit_jax import tokenizers  # pylint: disable=g-import-not-at-top
  from beit_jax import trainers  # pylint: disable=g-import-not-at-top
  from beit_jax.training import hardware  # pylint: disable=g-import-not-at-top
  from beit_jax.data import pretrain  # pylint: disable=g-import-not-at-top

  _check_trainer(config)
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
  print(
    f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}, mesh "
    f"{dict(mesh.shape)}, model {config.model.variant} ({config.model.dtype}), "
    f"batch {batch_size}"
  )

  tokenizer = tokenizers.build(config.tokenizer)
  size = tokenizers.view(config).size
  tok_params = host_random(jax.eval_shape(lambda k: tokenizer.init(k, size), jax.random.key(0)))
  task = trainers.make_task(config, frozen={"tokenizer": (tokenizer, tok_params)})
  built = runner.setup(config, task, mesh)
  host_batch = synthetic_batch(config, batch_size)
  batch = sharding.host_to_global(host_batch, mesh)

  t0 = time.perf_counter()
  compiled = built.step.lower(built.state, batch, built.frozen).compile()
  print(f"compile: {time.perf_counter() - t0:.1f} s")
  return _Built(
    config,
    missing,
    tokenizer,
    task.tx,
    built.state,
    compiled,
    host_batch,
    batch,
    built.frozen,
    hardware.xla_flops(compiled),
  )  # per device


def benchmark(
  config, *, steps: int = 10, pipeline_batches: int = 40, matmul_size: int = 2048
) -> dict[str, float]:
  """Times `config`'s MIM step (and its input pipeline if its data are here); prints the
  figures and returns them."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from beit_jax.training import hardware  # pylint: disable=g-import-not-at-top
  from beit_jax import tokenizers  # pylint: disable=g-import-not-at-top
  from beit_jax.data import pretrain  # pylint: disable=g-import-not-at-top

  b = _build(config)
  config, state, compiled, flops = b.config, b.state, b.compiled, b.flops
  batch_size = config.input.batch_size
  state, metrics = compiled(state, b.batch, b.frozen)
  jax.block_until_ready(metrics)

  def run():
    state_, metrics_ = state, None
    for _ in range(steps):
      state_, metrics_ = compiled(state_, b.batch, b.frozen)
    return jax.block_until_ready(metrics_)

  cost = HostCost(*(x / steps for x in _host_cost(run)[1]))  # per step
  dt = cost.wall
  achieved = flops / dt
  ceiling = hardware.matmul_ceiling(matmul_size, jnp.dtype(config.model.dtype))
  out = dict(
    step_seconds=dt,
    images_per_sec=batch_size / dt,
    flops_per_step=flops,
    ceiling_flops=ceiling,
    cpu_seconds_per_step=cost.cpu,
    kernel_seconds_per_step=cost.kernel,
    page_faults_per_step=cost.faults,
  )
  print(
    f"train step: {dt * 1e3:.1f} ms, {batch_size / dt:.1f} images/s "
    f"({batch_size / dt / jax.device_count():.1f} per device)"
  )
  print(
    f"  {flops / 1e9:.2f} GFLOP per step per device (XLA count), "
    f"{achieved / 1e9:.2f} GFLOP/s per device"
  )
  print(f"  host: {_host_line(cost)}")
  print(
    f"  matmul ceiling ({matmul_size}^2, {config.model.dtype}): {ceiling / 1e9:.2f} "
    f"GFLOP/s -> step at {100 * achieved / ceiling:.1f}% of ceiling"
  )
  known = hardware.known_device(jax.devices()[0].device_kind)
  if known is not None:
    out["mfu"] = achieved / (known.peak_tflops * 1e12)
    print(
      f"  {known.kind} peak {known.peak_tflops:g} TFLOP/s (bf16, {known.source}) -> "
      f"MFU {100 * out['mfu']:.1f}%"
    )

  if not pipeline_batches:
    return out
  if b.missing:
    print(f"input pipeline: skipped, {b.missing}")
    return out
  try:
    it = pretrain.make_pretrain_iterator(
      config,
      tokenizers.pretrain_views(config),
      seed=0,
      process_count=jax.process_count(),
      process_index=jax.process_index(),
    )
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
  out.update(
    pipeline_images_per_sec=rate,
    pipeline_images_per_sec_per_core=rate / cores,
    pipeline_images_per_cpu_second=per_cpu_second,
  )
  print(
    f"input pipeline ({config.input.dataset}): {rate:.1f} images/s on this host, "
    f"{rate / cores:.1f} per CPU core ({cores} cores), {per_cpu_second:.1f} per "
    f"CPU-second used -- the step takes "
    f"{batch_size / jax.process_count() / dt:.1f} images/s per host"
  )
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
  return out, HostCost(dt, r1.ru_utime - r0.ru_utime + kernel, kernel, r1.ru_minflt - r0.ru_minflt)


def _host_line(c: HostCost) -> str:
  return (
    f"CPU {sig3(c.cpu)} s per step, {100 * c.kernel / max(c.cpu, 1e-9):.0f}% of it in "
    f"the kernel; {c.faults:,.0f} minor page faults per step "
    f"({sig3(c.faults * 4096 / 2**30)} GiB of 4 KiB pages)"
  )


def _import_torch_reference():
  """beit_jax.convert.torch_reference, or a one-line error naming the package that is missing."""
  try:
    from beit_jax.convert import torch_reference  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    what = f"the {e.name!r} package" if e.name else f"what failed to import ({e})"
    raise ConfigError(_needs(what)) from e
  return torch_reference


def _needs(what: str) -> str:
  return (
    f"--compare-pytorch needs {what}, not installed here: pip install -r "
    "requirements-interop.txt (and, for dall_e, pip install --no-deps DALL-E==0.1)"
  )


def _check_torch_packages() -> None:
  """The packages the PyTorch process imports are installed (found, not imported: the
  parent process stays light), else `_import_torch_reference`'s one-line error."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  for name in ("torch", "transformers", "dall_e"):
    try:
      found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: a module without a spec
      found = False
    if not found:
      raise ConfigError(_needs(f"the {name!r} package"))


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
    raise ConfigError(
      f"--compare-pytorch times BEiT v1's step (mim_target='tokens', "
      f"tokenizer.kind='dvae', no patch aggregation or per-block relative "
      f"position bias); this config has {', '.join(why)}"
    )


def _torch_kwargs(config) -> dict[str, Any]:
  """`torch_reference.build`'s arguments for the same model, tokenizer and optimizer as
  `config`: plain values, so that the PyTorch process needs no config and imports no JAX."""
  from beit_jax.convert import hf  # pylint: disable=g-import-not-at-top
  from beit_jax.models import vit  # pylint: disable=g-import-not-at-top

  m, tok, opt = config.model, config.tokenizer, config.optim
  kw = dict(
    vit.size_kwargs(m),
    image_size=config.input.image_size,
    vocab_size=tok.vocab_size,
    num_classes=0,
    use_abs_pos_emb=m.use_abs_pos_emb,
    use_rel_pos_bias=False,
    use_shared_rel_pos_bias=m.use_shared_rel_pos_bias,
    layer_scale_init=m.layer_scale_init,
  )
  # The tokenizer config has no dtype: the dVAE runs in float32 in both (unilm: outside
  # autocast).
  return dict(
    hf_config=hf.config_json(kw),
    drop_path_rate=float(m.drop_path_rate),
    tokenizer=dict(n_hid=tok.n_hid, n_blk_per_group=tok.n_blk_per_group, vocab_size=tok.vocab_size),
    optim={k: float(opt[k]) for k in ("lr", "b1", "b2", "eps", "weight_decay", "grad_clip")},
    autocast=None if m.dtype == "float32" else m.dtype,
    seed=int(config.seed),
  )


def _jax_breakdown(b: _Built, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
  """(seconds, XLA FLOPs) of the JAX step's parts, each jitted alone from the functions the
  step calls and timed (blocking, mean of `repeats`) after a warm-up: tokenizer forward,
  ViT forward + loss, backward (forward + backward minus forward), the optimizer update
  (donated, as in the step)."""
  import jax  # pylint: disable=g-import-not-at-top
  from beit_jax.training import hardware  # pylint: disable=g-import-not-at-top
  from beit_jax.training import train_state  # pylint: disable=g-import-not-at-top
  from beit_jax.training import mim_objective as mim  # pylint: disable=g-import-not-at-top

  config = b.config
  model = mim.make_model(config)
  max_masked = mim.max_masked(config)
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
  seconds["tokenizer"], flops["tokenizer"], tokens = timed(
    b.tokenizer.tokenize, b.frozen["tokenizer"], images
  )
  seconds["forward"], flops["forward"], _ = timed(loss_fn, b.state.params, b.batch, tokens)
  t, f, (loss, grads) = timed(jax.value_and_grad(loss_fn), b.state.params, b.batch, tokens)
  seconds["backward"], flops["backward"] = t - seconds["forward"], f - flops["forward"]
  seconds["optimizer"], flops["optimizer"], b.state = timed(
    lambda s, g, l: train_state.apply_gradients(s, g, l, b.tx)[0], b.state, grads, loss, donate=True
  )
  return seconds, flops


def _fingerprint(batch: dict) -> dict[str, str]:
  """Each array's shape, dtype and SHA-1 of its bytes: the processes of --compare-pytorch
  show that they timed the same batch."""
  import hashlib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  return {
    k: f"{list(v.shape)} {v.dtype} "
    f"sha1 {hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest()[:12]}"
    for k, v in sorted(batch.items())
  }


def _costs(costs: list[HostCost]) -> dict[str, list[float]]:
  return {field: [float(getattr(c, field)) for c in costs] for field in HostCost._fields}


def _time_jax(spec: dict) -> dict[str, Any]:
  """The JAX process of --compare-pytorch: builds the step, warms up, times the steps,
  samples the jnp matmul ceiling, and (if asked) where the step's time goes."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from beit_jax.training import hardware  # pylint: disable=g-import-not-at-top

  b = _build(spec["config"])

  def step():
    b.state, metrics = b.compiled(b.state, b.batch, b.frozen)
    return jax.block_until_ready(metrics)

  for _ in range(spec["warmup"]):
    step()
  costs = [_host_cost(step)[1] for _ in range(spec["steps"])]
  print(f"steps: {', '.join(sig3(c.wall) for c in costs)} s", flush=True)
  dtype = jnp.dtype(spec["dtype"])
  ceiling = float(
    np.median(
      [
        hardware.matmul_ceiling(spec["matmul_size"], dtype, _CEILING_REPEATS)
        for _ in range(_CEILING_SAMPLES)
      ]
    )
  )
  device = jax.devices()[0]
  known = hardware.known_device(device.device_kind)
  out = dict(
    _costs(costs),
    ceiling=ceiling,
    flops=b.flops * jax.device_count(),
    platform=device.platform,
    device_kind=device.device_kind,
    devices=jax.device_count(),
    batch=_fingerprint(b.host_batch),
  )
  if known is not None:
    out.update(
      peak=known.peak_tflops * 1e12 * jax.device_count(),
      peak_source=f"{known.kind}, {known.source}",
    )
  if spec["breakdown"]:
    parts, part_flops = _jax_breakdown(b, spec["steps"])
    out.update(parts=parts, part_flops=part_flops)
  return out


def _time_torch(spec: dict) -> dict[str, Any]:
  """The PyTorch process of --compare-pytorch (no JAX imported): builds the reference step
  on `spec['device']`, warms up, times the steps (each with its phases), samples the torch
  matmul ceiling."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  torch_reference = _import_torch_reference()
  device = spec["device"]
  if device == "cuda" and not torch_reference.torch.cuda.is_available():
    raise ConfigError(
      "the JAX step ran on a GPU but this torch sees no CUDA device "
      f"(torch {torch_reference.torch.__version__}): install a CUDA build "
      "of torch to compare on the GPU"
    )
  ref = torch_reference.build(**spec["torch"], device=device)
  print(torch_reference.describe(ref), flush=True)
  with np.load(spec["batch"]) as f:
    host_batch = {k: f[k] for k in f.files}
  batch = torch_reference.to_torch(host_batch, device)
  for _ in range(spec["warmup"]):
    ref(**batch)
  phases, costs = [], []
  for _ in range(spec["steps"]):
    p, c = _host_cost(lambda: ref(**batch))
    phases.append(p)
    costs.append(c)
  print(f"steps: {', '.join(sig3(c.wall) for c in costs)} s", flush=True)
  ceiling = float(
    np.median(
      [
        torch_reference.matmul_ceiling(spec["matmul_size"], spec["dtype"], _CEILING_REPEATS, device)
        for _ in range(_CEILING_SAMPLES)
      ]
    )
  )
  return dict(
    _costs(costs),
    ceiling=ceiling,
    device_kind=torch_reference.device_kind(device),
    parts={k: [p[k] for p in phases] for k in torch_reference.PHASES},
    batch=_fingerprint(host_batch),
    loaded_jax="jax" in sys.modules,
  )


def _child(role: str, spec_path: str, result_path: str) -> None:
  """A process of --compare-pytorch (`role` 'jax' or 'torch'): times that framework's step
  as the pickled `spec_path` says and writes its figures to `result_path` (JSON). Says its
  role and pid first; a ConfigError is one line on stderr."""
  import json  # pylint: disable=g-import-not-at-top
  import pickle  # pylint: disable=g-import-not-at-top

  print(f"{role} process: pid {os.getpid()}", flush=True)
  with open(spec_path, "rb") as f:
    spec = pickle.load(f)
  try:
    out = (_time_jax if role == "jax" else _time_torch)(spec)
  except ConfigError as e:
    sys.exit(f"{_CHILD_ERROR}{e}")
  out.update(role=role, pid=os.getpid())
  with open(result_path, "w") as f:
    json.dump(out, f)


def _run_child(role: str, spec: dict, tmp: str, index: int) -> dict[str, Any]:
  """Runs `_child` in a new Python process, its output indented into ours; its figures."""
  import json  # pylint: disable=g-import-not-at-top
  import pickle  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top

  spec_path, result_path, err_path = (
    os.path.join(tmp, f"{role}{index}.{ext}") for ext in ("pkl", "json", "err")
  )
  with open(spec_path, "wb") as f:
    pickle.dump(spec, f)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # beit_jax's parent
  env = dict(
    os.environ,
    PYTHONUNBUFFERED="1",
    PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
  )
  code = "import sys; from beit_jax import benchmark; benchmark._child(*sys.argv[1:])"
  with open(err_path, "w+") as err:
    proc = subprocess.Popen(
      [sys.executable, "-c", code, role, spec_path, result_path],
      stdout=subprocess.PIPE,
      stderr=err,
      text=True,
      env=env,
    )
    for line in proc.stdout:
      print(f"    {line.rstrip()}", flush=True)
    status = proc.wait()
    if status:
      err.seek(0)
      lines = err.read().splitlines()
      said = [l[len(_CHILD_ERROR) :] for l in lines if l.startswith(_CHILD_ERROR)]
      if said:
        raise ConfigError(said[-1])
      raise RuntimeError(
        f"the {_NAMES[role]} process of --compare-pytorch (pid {proc.pid}) "
        f"exited with status {status}; its stderr ends:\n" + "\n".join(lines[-40:])
      )
  with open(result_path) as f:
    return json.load(f)


def compare_pytorch(
  config,
  *,
  steps: int = 3,
  rounds: int = 2,
  warmup: int = 1,
  matmul_size: int = 2048,
  breakdown: bool = True,
) -> dict[str, Any]:
  """Times `config`'s JAX MIM step and the PyTorch reference step each in processes of its
  own, in turns (JAX, PyTorch, JAX, PyTorch, ...: `rounds` processes of each), on the same
  batch: each process runs `warmup` untimed steps, times `steps` steps and samples its own
  framework's matmul ceiling. Prints each one's median step time, images/s, FLOP/s and
  share of its ceiling (and MFU on a known accelerator), the ratio, and where the time goes
  (the first JAX process's parts, if `breakdown`); ends with a summary block whose last line
  is `json: {...}`; returns that dict."""
  import json  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from beit_jax.training import hardware  # pylint: disable=g-import-not-at-top
  from beit_jax import trainers  # pylint: disable=g-import-not-at-top

  _check_torch_packages()  # a missing package: one line, before any process starts
  _check_trainer(config)
  _check_comparable(config)
  trainers.validate_config(config)
  if min(steps, rounds) < 1 or warmup < 0:
    raise ConfigError(
      f"--compare-pytorch needs --steps >= 1, --rounds >= 1 and "
      f"--warmup_steps >= 0 (got {steps}, {rounds}, {warmup})"
    )
  dtype, batch_size = config.model.dtype, config.input.batch_size
  autocast = "" if dtype == "float32" else f", torch autocast {dtype}"
  print(
    f"compare-pytorch: {dtype}{autocast}, batch {batch_size}: {rounds} round(s) of a JAX "
    f"process then a PyTorch process; each process: {warmup} warm-up step(s), then "
    f"{steps} timed",
    flush=True,
  )
  results, order = {"jax": [], "torch": []}, []
  with tempfile.TemporaryDirectory(prefix="beit_jax_compare_") as tmp:
    batch_path = os.path.join(tmp, "batch.npz")
    np.savez(batch_path, **synthetic_batch(config, batch_size))
    common = dict(steps=steps, warmup=warmup, matmul_size=matmul_size, dtype=dtype)
    for r in range(rounds):
      for role in ("jax", "torch"):
        if role == "jax":
          spec = dict(common, config=config, breakdown=breakdown and r == 0)
        else:  # on the JAX process's platform
          gpu = results["jax"][-1]["platform"] == "gpu"
          spec = dict(
            common, batch=batch_path, torch=_torch_kwargs(config), device="cuda" if gpu else "cpu"
          )
        print(f"  round {r + 1}/{rounds}: {_NAMES[role]} process", flush=True)
        res = _run_child(role, spec, tmp, r)
        results[role].append(res)
        order.append((role, res["pid"]))

  batches = {json.dumps(res["batch"], sort_keys=True) for res in results["jax"] + results["torch"]}
  if len(batches) != 1:
    raise RuntimeError(f"the processes timed different batches: {sorted(batches)}")
  first = results["jax"][0]
  flops = first["flops"]  # the whole batch's
  out: dict[str, Any] = dict(
    dtype=dtype,
    batch_size=batch_size,
    rounds=rounds,
    steps=steps,
    warmup_steps=warmup,
    flops_per_step=flops,
    order=[list(o) for o in order],
  )
  ceiling_name = {"jax": "jnp", "torch": "torch"}
  for key, res in results.items():
    times = [t for p in res for t in p["wall"]]
    dt = float(np.median(times))
    out.update(
      {
        f"{key}_step_seconds": dt,
        f"{key}_images_per_sec": batch_size / dt,
        f"{key}_flops_per_sec": flops / dt,
        f"{key}_steps": [p["wall"] for p in res],
        f"{key}_ceiling_flops": float(np.median([p["ceiling"] for p in res])),
        f"{key}_cpu_seconds": float(np.mean([x for p in res for x in p["cpu"]])),
        f"{key}_kernel_seconds": float(np.mean([x for p in res for x in p["kernel"]])),
        f"{key}_page_faults": float(np.mean([x for p in res for x in p["faults"]])),
        f"{key}_device": res[0]["device_kind"],
      }
    )
  out["ceiling_flops"] = out["jax_ceiling_flops"]  # the jnp one, as benchmark() names it
  out["torch_process_loaded_jax"] = any(p["loaded_jax"] for p in results["torch"])
  out["ratio"] = out["jax_images_per_sec"] / out["torch_images_per_sec"]
  peaks = {}
  if first.get("peak"):
    peaks["jax"] = (first["peak"], first["peak_source"])
  known = hardware.known_device(results["torch"][0]["device_kind"])
  if known is not None:
    peaks["torch"] = (known.peak_tflops * 1e12, f"{known.kind}, {known.source}")
  for key, (peak, _) in peaks.items():
    out[f"{key}_mfu"] = out[f"{key}_flops_per_sec"] / peak

  devices = (
    f"JAX on {first['devices']} x {first['device_kind']}, PyTorch on "
    f"{results['torch'][0]['device_kind']}"
  )
  print(
    f"summary: JAX vs PyTorch, {dtype}{autocast}, batch {batch_size}, {devices}; each in "
    f"{rounds} process(es) of its own, alternating; medians of {rounds * steps} timed "
    f"steps each"
  )
  for key in ("jax", "torch"):
    dt, achieved = out[f"{key}_step_seconds"], out[f"{key}_flops_per_sec"]
    ceil = out[f"{key}_ceiling_flops"]
    print(
      f"  {_NAMES[key]:<7} {sig3(batch_size / dt)} images/s ({sig3(dt)} s per step), "
      f"{sig3(achieved / 1e9)} GFLOP/s = {100 * achieved / ceil:.1f}% of the "
      f"{ceiling_name[key]} matmul ceiling ({sig3(ceil / 1e9)} GFLOP/s, {matmul_size}^2 "
      f"{dtype}, measured in its processes)"
    )
  print(f"  JAX/PyTorch: {sig3(out['ratio'])}x")
  for key, res in results.items():
    mean = HostCost(*(float(np.mean([x for p in res for x in p[f]])) for f in HostCost._fields))
    steps_text = " | ".join(", ".join(sig3(t) for t in p["wall"]) for p in res)
    print(f"  {_NAMES[key]:<7} steps {steps_text} s (| between processes); {_host_line(mean)}")
  print(
    f"  FLOP/s of both: XLA's count of the compiled JAX step, {sig3(flops / 1e9)} GFLOP "
    f"per step, over each one's median step time: the two do the same work"
  )
  for key, (peak, source) in peaks.items():
    print(
      f"  {_NAMES[key]:<7} MFU {100 * out[f'{key}_mfu']:.1f}% (peak {sig3(peak / 1e12)} "
      f"TFLOP/s bf16 dense: {source})"
    )

  if breakdown:
    jax_parts = dict(first["parts"])
    part_flops = dict(first["part_flops"])
    part_flops["rest"] = first["flops"] / first["devices"] - sum(part_flops.values())
    jax_parts["rest"] = out["jax_step_seconds"] - sum(jax_parts.values())
    torch_parts = {
      k: float(np.median([x for p in results["torch"] for x in p["parts"][k]]))
      for k in results["torch"][0]["parts"]
    }
    torch_parts["rest"] = out["torch_step_seconds"] - sum(torch_parts.values())
    out.update({f"jax_{k}_seconds": v for k, v in jax_parts.items()})
    out.update({f"torch_{k}_seconds": v for k, v in torch_parts.items()})
    print(
      "  where the time goes, s per step (JAX: each part jitted alone in the first JAX "
      f"process, mean of {steps}; rest = median step - parts: mask positions, metrics, "
      "dispatch, fusion across parts; PyTorch: medians of the phases timed inside its "
      "steps)"
    )
    print("    " + " " * 9 + "".join(f"{k:>11}" for k in jax_parts))
    for name, parts in (("JAX", jax_parts), ("PyTorch", torch_parts)):
      print(f"    {name:<9}" + "".join(f"{sig3(v):>11}" for v in parts.values()))
    print(
      f"    {'GFLOP':<9}"
      + "".join(f"{sig3(v / 1e9):>11}" for v in part_flops.values())
      + "  (XLA's count of each JAX part, per device)"
    )
    ceiling = out["jax_ceiling_flops"]  # one device's, as the parts' FLOPs are
    print(
      f"    {'JAX %':<9}"
      + "".join(
        f"{100 * part_flops[k] / jax_parts[k] / ceiling:>10.1f}%" for k in jax_parts if k != "rest"
      )
      + "  (of the jnp matmul ceiling)"
    )
  print("  processes, in order: " + ", ".join(f"{role} pid {pid}" for role, pid in order))
  print("json: " + json.dumps(out, sort_keys=True), flush=True)
  return out


def main(argv):
  del argv
  config = _CONFIG.value
  if _BATCH.value:
    config.input.batch_size = _BATCH.value
  try:
    bad = [d for d in _DTYPES.value if d not in DTYPES]
    if bad:
      raise ConfigError(
        f"--dtypes={','.join(_DTYPES.value)}: {', '.join(bad)} not "
        f"accepted; accepted: comma-separated {', '.join(DTYPES)}"
      )
    for dtype in _DTYPES.value or [config.model.dtype]:
      config.model.dtype = dtype
      if _COMPARE.value:
        compare_pytorch(
          config,
          steps=_STEPS.value,
          rounds=_ROUNDS.value,
          warmup=_WARMUP.value,
          matmul_size=_MATMUL.value,
          breakdown=_BREAKDOWN.value,
        )
      else:
        benchmark(
          config,
          steps=_STEPS.value,
          pipeline_batches=_PIPELINE_BATCHES.value,
          matmul_size=_MATMUL.value,
        )
  except ConfigError as e:
    sys.exit(f"beit_jax.benchmark: error: {e}")


if __name__ == "__main__":
  # Flags only when run as a program: tests import `benchmark` beside `main`'s flags.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
  _BATCH = flags.DEFINE_integer("batch", None, "Global batch (default: the config's).")
  _STEPS = flags.DEFINE_integer(
    "steps",
    10,
    "Timed steps (after one warm-up step; with --compare-pytorch, in each "
    "process, after --warmup_steps).",
  )
  _PIPELINE_BATCHES = flags.DEFINE_integer(
    "pipeline_batches", 40, "Batches timed from the input pipeline (0: skip)."
  )
  _MATMUL = flags.DEFINE_integer("matmul_size", 2048, "Side of the ceiling's square matmul.")
  _COMPARE = flags.DEFINE_bool(
    "compare-pytorch",
    False,
    "Time the unilm-equivalent PyTorch step against the JAX "
    "step, each in processes of its own, alternating (needs requirements-interop.txt), "
    "instead of the input pipeline.",
  )
  _ROUNDS = flags.DEFINE_integer(
    "rounds", 2, "--compare-pytorch: processes of each framework (JAX, PyTorch, JAX, ...)."
  )
  _WARMUP = flags.DEFINE_integer(
    "warmup_steps", 1, "--compare-pytorch: untimed steps each process runs first."
  )
  _BREAKDOWN = flags.DEFINE_bool(
    "breakdown",
    True,
    "--compare-pytorch: time the JAX step's parts (tokenizer, forward, "
    "backward, optimizer) in the first JAX process, after its steps.",
  )
  _DTYPES = flags.DEFINE_list(
    "dtypes",
    [],
    f"model.dtype values to time one after the other, of {DTYPES} (default: the config's).",
  )
  flags.mark_flag_as_required("config")
  app.run(main)
