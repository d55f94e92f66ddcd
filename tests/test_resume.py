"""Kill a run with SIGKILL mid-way, rerun the same command: bit-identical to no crash."""

import subprocess

import pytest

from tests import runs
from tests.runs import ROOT
from tests.tiny_config import tiny_config


def _cli(workdir, tokenizer, steps):
  # With gradient accumulation: no state lives across steps, so no stop falls mid-window.
  return runs.main_command(
    workdir,
    tokenizer,
    steps,
    "--config.checkpoint.every_steps=2",
    "--config.checkpoint.keep=10",
    "--config.model.drop_path_rate=0.1",
    "--config.optim.accum_steps=2",
  )


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
  env = runs.cpu_env(1)
  # Stage 1 once; both runs predict the same frozen tokenizer.
  tok = tmp_path / "tok"
  from beit_jax.trainers import dvae  # pylint: disable=g-import-not-at-top

  dvae.train_and_evaluate(tiny_config().tokenizer.recipe, str(tok))

  steps = 12
  subprocess.run(
    _cli(tmp_path / "straight", tok, steps),
    cwd=ROOT,
    env=env,
    check=True,
    capture_output=True,
    timeout=600,
  )

  crashed = tmp_path / "crashed"
  last = runs.kill_mid_run(
    _cli(crashed, tok, steps), crashed, at_step=6, total_steps=steps, env=env
  )
  rerun = subprocess.run(
    _cli(crashed, tok, steps),
    cwd=ROOT,
    env=env,
    check=True,
    capture_output=True,
    text=True,
    timeout=600,
  )
  # It continued from the checkpoint (a restart from 0 would also end identical).
  assert f"Resumed from step {last}" in rerun.stderr

  runs.assert_same_params(tmp_path / "straight", crashed)
