"""A VQ-KD run as users start it, SIGKILLed and resumed.

The state of a VQ-KD run adds its EMA codebook (cluster sizes, embeddings, `initted`) to
the params and Adam moments: both must survive a kill. (Its step on 8 devices equals 1
device: tests/test_vqkd_trainer.py.)
"""

import subprocess
import sys

import pytest

from beit_jax import params as params_lib
from tests import runs
from tests.runs import ROOT


def _cli(workdir, steps, *flags):
  return [
    sys.executable,
    "-m",
    "beit_jax.main",
    "--config=tests/tiny_vqkd_config.py",
    f"--workdir={workdir}",
    f"--config.total_steps={steps}",
    "--config.checkpoint.every_steps=2",
    "--config.checkpoint.keep=10",
    *flags,
  ]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical_ema_codebook_included(tmp_path):
  env, steps = runs.cpu_env(1), 12
  subprocess.run(
    _cli(tmp_path / "straight", steps),
    cwd=ROOT,
    env=env,
    check=True,
    capture_output=True,
    timeout=600,
  )
  crashed = tmp_path / "crashed"
  last = runs.kill_mid_run(_cli(crashed, steps), crashed, at_step=6, total_steps=steps, env=env)
  rerun = subprocess.run(
    _cli(crashed, steps), cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=600
  )
  assert f"Resumed from step {last}" in rerun.stderr
  assert bool(params_lib.read(str(crashed))["codebook"]["initted"])
  runs.assert_same_params(tmp_path / "straight", crashed)
