"""Ahead-of-time plans (beit_jax/plan.py) on the 8 fake CPU devices of conftest.py: the
exact train step is compiled, not run, and its memory follows the batch and the sharding."""

import dataclasses
import pathlib
import re
import subprocess
import sys

import jax
import pytest

from beit_jax.training import planning as plan
from beit_jax.errors import ConfigError
from tests.tiny_config import tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _config(batch=8, mesh=None):
  c = tiny_config()
  c.model.depth = 1
  c.tokenizer.n_blk_per_group = 1
  c.input.batch_size = batch
  c.mesh = mesh or dict(data=8, fsdp=1)
  c.sharding.min_size = 0  # the tiny model's weights are all below the default
  return c


def _plan(config):
  target = plan.parse_topology("cpu:8")
  return plan.make_plan(
    config, target, jax.devices("cpu")[:8], compiler="XLA:CPU", stand_in=False, memory_gib=1.0
  )


@pytest.fixture(scope="module")
def base():
  return _plan(_config())


def test_memory_grows_with_the_batch(base):
  big = _plan(_config(batch=32))
  assert big.batch_bytes == 4 * base.batch_bytes
  assert big.temp_bytes > base.temp_bytes
  assert big.total_bytes > base.total_bytes
  assert big.flops > 2 * base.flops  # the step does 4x the per-device work
  assert big.params_bytes == base.params_bytes  # the state does not depend on the batch


def test_fsdp_shards_parameters_and_optimizer_state(base):
  fsdp = _plan(_config(mesh=dict(data=1, fsdp=8)))
  assert fsdp.mesh == {"slice": 1, "data": 1, "fsdp": 8, "tensor": 1}
  state = lambda p: p.params_bytes + p.opt_state_bytes
  assert state(fsdp) < state(base) / 4  # most leaves split 8 ways, small ones replicated
  assert fsdp.opt_state_bytes < base.opt_state_bytes
  # XLA agrees: the step's inputs (state, batch, tokenizer) take less room per device.
  assert fsdp.argument_bytes < base.argument_bytes
  # A device's share of the state is part of what XLA counts as its arguments (unused
  # tokenizer params, the decoder's, are pruned from the program: no frozen bytes here).
  for p in (base, fsdp):
    assert state(p) <= p.argument_bytes


def test_tensor_parallelism_splits_the_state_and_each_device_s_model_flops(base):
  tensor = _plan(_config(mesh=dict(data=4, tensor=2)))
  assert tensor.data_parallel == 4 and base.data_parallel == 8
  state = lambda p: p.params_bytes + p.opt_state_bytes
  assert state(tensor) < 0.8 * state(base)  # the block matrices and the MIM head halve
  # Twice the images per shard, each split over 2 devices: the same FLOPs per device.
  assert tensor.model_flops == pytest.approx(base.model_flops)


def _printed(text):
  total, memory = map(int, re.search(r"\((\d+) bytes\) of .*\((\d+) bytes", text).groups())
  verdict = re.search(r"^verdict: (fits|does not fit)", text, re.M).group(1)
  return total, memory, verdict


@pytest.mark.parametrize("margin", [-1, 0, 1])
def test_the_verdict_matches_the_printed_numbers(base, margin):
  p = dataclasses.replace(base, memory_bytes=base.total_bytes + margin)
  text = plan.format_plan(p)
  total, memory, verdict = _printed(text)
  assert total == p.argument_bytes + p.output_bytes - p.alias_bytes + p.temp_bytes + p.code_bytes
  assert memory == p.memory_bytes
  assert verdict == ("fits" if total <= memory else "does not fit")
  assert verdict == ("does not fit" if margin < 0 else "fits")


def test_step_time_and_mfu_at_peak(base):
  p = dataclasses.replace(base, peak_flops=1e12)
  text = plan.format_plan(p)
  ms = float(re.search(r"step ([\d.]+) ms", text).group(1))
  assert ms == pytest.approx(p.flops / 1e12 * 1e3, abs=0.06)
  mfu = float(re.search(r"MFU ([\d.]+)%", text).group(1))
  assert mfu == pytest.approx(100 * p.model_flops / p.flops, abs=0.06)
  assert 0 < p.model_flops < p.flops  # XLA counts the tokenizer and the elementwise work too


@pytest.mark.parametrize(
  "name,devices,topology",
  [
    ("v4-32", 16, "v4:2x2x4"),
    ("v5e-64", 64, "v5e:8x8"),
    ("v5p-128", 64, "v5:4x4x4"),
    ("v5e:4x4", 16, "v5e:4x4"),
    ("v5p:2x2x1", 4, "v5:2x2x1"),
  ],
)
def test_tpu_names(name, devices, topology):
  t = plan.parse_topology(name)
  assert (t.num_devices, t.tpu["topology_name"]) == (devices, topology)


@pytest.mark.parametrize("name", ["v5e-3", "v4-7", "v9-8", "tpu", "v5e:8x8x8", "h100:0", ""])
def test_bad_topology_names(name):
  with pytest.raises(ConfigError, match="accepted: "):
    plan.parse_topology(name)


def test_a_bad_topology_is_a_one_line_error():
  out = subprocess.run(
    [sys.executable, "-m", "beit_jax.plan", "--config=tests/tiny_config.py", "--topology=v5e-3"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 1
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert lines == [
    f"beit_jax: error: --topology='v5e-3' is not a known target; accepted: {plan.ACCEPTED}"
  ], out.stderr[-2000:]


def test_an_mim_config_is_needed():
  c = _config()
  c.trainer = "dvae"
  with pytest.raises(ConfigError, match="trainer='dvae'"):
    _plan(c)


@pytest.mark.skipif(
  plan.libtpu_version() is None,
  reason="libtpu is not installed (requirements-tpu.txt, in a venv of its own)",
)
def test_compiles_for_a_tpu_slice_with_libtpu():
  target = plan.parse_topology("v5e-4")
  p = plan.make_plan(
    _config(batch=8, mesh=dict(data=4, fsdp=1)),
    target,
    plan.tpu_devices(target),
    compiler="libtpu",
    stand_in=False,
  )
  assert p.mesh == {"slice": 1, "data": 4, "fsdp": 1, "tensor": 1}
  assert p.memory_bytes == 16 * plan.GIB and p.peak_flops == 197e12
  assert p.flops > 0 and p.temp_bytes > 0


def test_a_program_the_compiler_refuses_is_a_does_not_fit_verdict(monkeypatch):
  """The TPU compiler itself fails a program larger than HBM (seen with libtpu for L/16 at
  batch 2048 without FSDP or remat); the plan reports that as its verdict, not a traceback.
  XLA:CPU never refuses, so its refusal is simulated here with libtpu's message."""
  message = (
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
    "HLO temporaries (20.81G) exceeds available HBM (15.75G)."
  )

  def refuse(self, *args, **kwargs):
    raise jax.errors.JaxRuntimeError(message)

  monkeypatch.setattr(jax.stages.Lowered, "compile", refuse)
  p = _plan(_config())
  assert not p.fits and p.params_bytes > 0 and p.temp_bytes == 0
  text = plan.format_plan(p)
  assert text.splitlines()[-1] == (
    "verdict: does not fit (the compiler refused it: Ran out "
    "of memory on HBM, the total memory required for HLO "
    "temporaries (20.81G) exceeds available HBM (15.75G).)"
  )
  assert "parameters" in text and "FLOPs" not in text

  def fail(self, *args, **kwargs):
    raise jax.errors.JaxRuntimeError("INTERNAL: something else")

  monkeypatch.setattr(jax.stages.Lowered, "compile", fail)
  with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
    _plan(_config())


def test_accumulation_holds_activations_of_one_micro_batch(base):
  config = _config(batch=32)
  config.optim.accum_steps = 4  # micro-batches of 8: base's batch
  p = _plan(config)
  whole = p.unaccumulated
  assert p.accum_steps == 4 and whole is not None and whole.accum_steps == 1
  assert p.batch_bytes == whole.batch_bytes == 4 * base.batch_bytes  # the whole batch comes in
  assert p.temp_bytes < whole.temp_bytes  # activations of 8 images, not 32
  assert p.flops == pytest.approx(whole.flops, rel=0.2)  # XLA's loop body, counted 4 times
  text = plan.format_plan(p)
  assert "(4 per data-parallel shard, in 4 micro-batches of 1)" in text
  line = re.search(
    r"^  without accumulation \(optim.accum_steps=1\): total (.*), "
    r"temporaries (.*)$",
    text,
    re.M,
  )
  assert line, text
