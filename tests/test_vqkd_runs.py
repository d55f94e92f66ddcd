"""VQ-KD runs as users start them: SIGKILL and resume, and 2 processes against 1.

The state of a VQ-KD run adds its EMA codebook (cluster sizes, embeddings, `initted`) to
the params and Adam moments: both must survive a kill, and both must be the same when the
global batch is split over 2 hosts (`jax.distributed` on 127.0.0.1) instead of one.
"""
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from beit_jax import checkpoint
from tests import runs
from tests.runs import ROOT


def _cli(workdir, steps, *flags):
  return [sys.executable, "-m", "beit_jax.main", "--config=tests/tiny_vqkd_config.py",
          f"--workdir={workdir}", f"--config.tokenizer.train.total_steps={steps}",
          "--config.tokenizer.train.checkpoint.every_steps=2",
          "--config.tokenizer.train.checkpoint.keep=10", *flags]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical_ema_codebook_included(tmp_path):
  env, steps = runs.cpu_env(1), 12
  subprocess.run(_cli(tmp_path / "straight", steps), cwd=ROOT, env=env, check=True,
                 capture_output=True, timeout=600)
  crashed = tmp_path / "crashed"
  proc = subprocess.Popen(_cli(crashed, steps), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while not (crashed / "checkpoints" / "6").exists():
    assert proc.poll() is None and time.time() < deadline, "run ended before step 6"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  ckpts = checkpoint.make_manager(str(crashed), every_steps=2, keep=10).all_steps()
  assert 0 < max(ckpts) < steps, f"the kill did not land mid-run: {ckpts}"
  rerun = subprocess.run(_cli(crashed, steps), cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True, timeout=600)
  assert f"Resumed from step {max(ckpts)}" in rerun.stderr
  assert bool(checkpoint.load_params(str(crashed))["codebook"]["initted"])
  runs.assert_same_params(tmp_path / "straight", crashed)


@pytest.mark.slow
def test_two_processes_update_the_codebook_as_one_process(tmp_path):
  steps = 4
  subprocess.run(_cli(tmp_path / "one", steps), cwd=ROOT, env=runs.cpu_env(8), check=True,
                 capture_output=True, timeout=600)
  port = runs.free_port()
  procs = [subprocess.Popen(
      _cli(tmp_path / "two", steps, f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
           f"--process_id={i}"),
      cwd=ROOT, env=runs.cpu_env(4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  one = checkpoint.load_params(str(tmp_path / "one"))
  two = checkpoint.load_params(str(tmp_path / "two"))
  assert bool(one["codebook"]["initted"]) and float(one["codebook"]["cluster_size"].sum()) > 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one), jax.tree.leaves(two)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
