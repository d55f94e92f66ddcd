"""Two processes (as two hosts, jax.distributed on 127.0.0.1) train like one process."""
import subprocess
import sys

import jax
import numpy as np
import pytest

from beit_jax import checkpoint
from beit_jax.trainers import dvae
from tests.runs import ROOT, cpu_env, free_port
from tests.tiny_config import tiny_config


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  tok = tmp_path / "tok"
  dvae.train_and_evaluate(tiny_config(), str(tok))
  flags = ["--config=tests/tiny_config.py", f"--config.tokenizer.init_from={tok}"]

  subprocess.run([sys.executable, "-m", "beit_jax.main", *flags,
                  f"--workdir={tmp_path / 'one'}"], cwd=ROOT, env=cpu_env(8), check=True,
                 capture_output=True, timeout=600)
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "beit_jax.main", *flags, f"--workdir={tmp_path / 'two'}",
       f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=cpu_env(4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]

  one = checkpoint.load_params(str(tmp_path / "one"))
  two = checkpoint.load_params(str(tmp_path / "two"))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one), jax.tree.leaves(two)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
