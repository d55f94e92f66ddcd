"""The compute path without TensorFlow: in a subprocess where importing `tensorflow` (or
`tensorflow_datasets`) raises, the models, tokenizers, trainers, runner, benchmark and plan
tool import, the benchmark times its step on synthetic batches, and the input pipeline --
the part that does need TensorFlow -- fails with an ImportError that names it."""

import re
import subprocess
import sys

import pytest

from tests.runs import ROOT, cpu_env

# Prepended to each subprocess's code: an import system without TensorFlow, as on an
# accelerator image that has JAX, Flax and optax but not TF.
_WITHOUT_TF = """
import sys

class _NoTensorFlow:
  def find_spec(self, name, path=None, target=None):
    if name.partition(".")[0] in ("tensorflow", "tensorflow_datasets"):
      raise ImportError(f"No module named {name!r} (TensorFlow is absent here)", name=name)

sys.meta_path.insert(0, _NoTensorFlow())
"""

COMPUTE_PATH = (
  "beit_jax.models.vit",
  "beit_jax.tokenizers",
  "beit_jax.trainers.mim",
  "beit_jax.training.runner",
  "beit_jax.benchmark",
  "beit_jax.training.planning",
  "beit_jax.plan",
  "beit_jax.trainers",
)


def _run(code: str, timeout: float) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-c", _WITHOUT_TF + code],
    cwd=ROOT,
    env=cpu_env(1),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_the_blocker_blocks():
  out = _run("import tensorflow", timeout=60)
  assert out.returncode == 1 and "TensorFlow is absent here" in out.stderr, out.stderr[-2000:]


def test_the_compute_path_imports_and_the_pipeline_says_it_needs_tensorflow():
  out = _run(
    f"""
import importlib
for name in {COMPUTE_PATH!r}:
  importlib.import_module(name)
from beit_jax import trainers, tokenizers
from beit_jax.data import pretrain
from tests.tiny_config import tiny_config
config = tiny_config()
trainers.validate_config(config)  # every trainer's and pipeline's rules
print("epoch:", pretrain.num_train_examples(config))  # the embedded set's, from the config
try:
  pretrain.make_pretrain_iterator(config, tokenizers.pretrain_views(config), seed=0)
except ImportError as e:
  print("pipeline:", repr(e))
print("loaded:", sorted(m for m in sys.modules if m.startswith("tensorflow")))
""",
    timeout=120,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "epoch: 64\n" in out.stdout  # tiny_config's embedded_epoch_size
  assert re.search(r"^pipeline: .*tensorflow", out.stdout, re.M), out.stdout
  assert "loaded: []" in out.stdout


def test_the_plan_tool_starts_without_tensorflow():
  out = _run(
    """
import runpy
sys.argv = ["plan", "--config=tests/tiny_config.py", "--topology=v5e-3"]
runpy.run_module("beit_jax.plan", run_name="__main__")
""",
    timeout=120,
  )
  assert out.returncode == 1, out.stderr[-3000:]
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "--topology='v5e-3' is not a known target" in lines[0], lines


@pytest.mark.slow
def test_the_benchmark_times_its_step_without_tensorflow():
  out = _run(
    """
import runpy
sys.argv = ["benchmark", "--config=tests/tiny_config.py", "--batch=2", "--steps=1",
            "--matmul_size=64", "--config.model.depth=1", "--config.tokenizer.n_blk_per_group=1"]
runpy.run_module("beit_jax.benchmark", run_name="__main__")
""",
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r"^train step: [\d.]+ ms, [\d.]+ images/s", out.stdout, re.M), out.stdout
  assert re.search(
    r"^input pipeline: skipped, it needs TensorFlow .*tensorflow", out.stdout, re.M
  ), out.stdout
