"""Two processes (as two hosts, jax.distributed on 127.0.0.1) train like one process."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from beit_jax import checkpoint
from beit_jax.trainers import dvae
from tests.tiny_config import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  tok = tmp_path / "tok"
  dvae.train_and_evaluate(tiny_config(), str(tok))
  flags = ["--config=tests/tiny_config.py", f"--config.tokenizer.init_from={tok}"]

  def env(devices):
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")

  subprocess.run([sys.executable, "-m", "beit_jax.main", *flags,
                  f"--workdir={tmp_path / 'one'}"], cwd=ROOT, env=env(8), check=True,
                 capture_output=True, timeout=600)
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "beit_jax.main", *flags, f"--workdir={tmp_path / 'two'}",
       f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=env(4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]

  one = checkpoint.load_params(str(tmp_path / "one"))
  two = checkpoint.load_params(str(tmp_path / "two"))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one), jax.tree.leaves(two)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
