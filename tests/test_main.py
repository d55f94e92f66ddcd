"""End to end through `main`: both stages, resumption, the workdir's contents, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from beit_jax import main
from beit_jax.errors import ConfigError
from tests.tiny_config import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _checkpoints(workdir) -> list[str]:
  return sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _scalars(logdir, tag):
  """(step, value) of a scalar clu wrote (TF2 summaries are stored as tensors)."""
  acc = event_accumulator.EventAccumulator(str(logdir))
  acc.Reload()
  if tag not in acc.Tags()["tensors"]:
    return []
  return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]


@pytest.mark.slow
def test_tiny_run_both_stages_then_resume(tmp_path):
  config = tiny_config()
  workdir = tmp_path / "run"
  metrics = main.run(config, str(workdir))
  assert np.isfinite(metrics["loss"]) and 0 <= metrics["mim_accuracy"] <= 1
  assert (workdir / "tokenizer" / "checkpoints" / "4").exists()
  assert _checkpoints(workdir) == ["3", "6"]
  assert json.loads((workdir / "config.json").read_text())["model"]["depth"] == 2
  pngs = sorted(p.name for p in (workdir / "images").glob("*.png"))
  assert pngs == ["mim_0000006.png"]
  assert list((workdir / "tokenizer" / "images").glob("dvae_reconstructions_*.png"))
  assert [s for s, _ in _scalars(workdir, "loss")] == [2, 4, 6]

  # Same workdir, longer schedule: resumes at step 6 (not 0) and reuses the tokenizer.
  config.total_steps = 8
  main.run(config, str(workdir))
  steps = [s for s, _ in _scalars(workdir, "loss")]
  assert steps == [2, 4, 6, 8]
  assert _checkpoints(workdir) == ["6", "8"]


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("model.variant", "X/16", "model.variant"),
    ("input.batch_size", 12, "input.batch_size=12 must be divisible"),
    ("input.dataset", "tfds:imagenet2012", "imagenet2012"),
    ("trainer", "nope", "trainer='nope' is invalid"),
  ],
)
def test_bad_config_is_a_config_error(tmp_path, field, value, message):
  config = tiny_config()
  section, _, key = field.rpartition(".")
  (config[section] if section else config)[key] = value
  if field == "input.dataset":
    config.input.data_dir = str(tmp_path / "tfds")
  with pytest.raises(ConfigError, match=message):
    main.run(config, str(tmp_path / "run"))


def test_cli_prints_one_line_errors(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  cmd = [
    sys.executable,
    "-m",
    "beit_jax.main",
    "--config=configs/beit_tiny_local.py",
    f"--workdir={blocker}/run",
  ]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("beit_jax: error: workdir=") and "not writable" in last
  assert "Traceback" not in proc.stderr


def _zeros_like_init(module, *args, **kwargs):
  import jax  # pylint: disable=g-import-not-at-top

  shapes = jax.eval_shape(lambda: module.init(*args, **kwargs))["params"]
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def test_tokenizer_vocabulary_must_match_the_config(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from beit_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  from beit_jax import tokenizers

  config = tiny_config()
  model = tokenizers.build(config.tokenizer).model  # 64 codes
  params = _zeros_like_init(
    model,
    {"params": jax.random.key(0), "gumbel": jax.random.key(0)},
    jnp.zeros((1, 32, 32, 3)),
    temperature=1.0,
  )
  checkpoint.save_params(str(tmp_path / "tok"), params)
  config.tokenizer.vocab_size = 32
  config.tokenizer.init_from = str(tmp_path / "tok")
  with pytest.raises(ConfigError, match="tokenizer.vocab_size=32 but the tokenizer at .* has 64"):
    main.run(config, str(tmp_path / "run"))


def test_missing_init_from_is_a_config_error(tmp_path):
  config = tiny_config()
  config.init_from = str(tmp_path / "nowhere")
  with pytest.raises(ConfigError, match="init_from=.*nowhere does not exist"):
    main.run(config, str(tmp_path / "run"))


def test_a_workdir_gives_back_its_exact_config(tmp_path):
  from beit_jax.training import workdir  # pylint: disable=g-import-not-at-top
  from configs import from_workdir  # pylint: disable=g-import-not-at-top

  config = tiny_config()
  workdir.prepare(config, str(tmp_path))
  assert from_workdir.get_config(str(tmp_path)).to_dict() == config.to_dict()
