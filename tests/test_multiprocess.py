"""Two processes (as two hosts, jax.distributed on 127.0.0.1) train like one process."""

import subprocess

import jax
import numpy as np
import pytest

from beit_jax import params as params_lib
from tests import runs
from tests.runs import ROOT, cpu_env, free_port


@pytest.mark.slow
def test_two_processes_in_fsdp_and_tensor_layout_match_one_process_across_a_kill(tmp_path):
  """Two hosts hold each weight in shards over fsdp x tensor, save them collectively, are
  killed, restore collectively and end where one process on 8 devices does."""
  tok = runs.random_tokenizer(tmp_path / "tok")
  steps = 9
  layout = [
    "--config.mesh.fsdp=2",
    "--config.mesh.tensor=2",
    "--config.sharding.min_size=0",
    "--config.checkpoint.every_steps=3",
    "--config.checkpoint.keep=5",
  ]
  subprocess.run(
    runs.main_command(tmp_path / "one", tok, steps, *layout),
    cwd=ROOT,
    env=cpu_env(8),
    check=True,
    capture_output=True,
    timeout=600,
  )

  two = tmp_path / "two"

  def processes():
    port = free_port()
    return [
      runs.main_command(
        two,
        tok,
        steps,
        *layout,
        f"--coordinator=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      )
      for i in range(2)
    ]

  last = runs.kill_mid_run(processes(), two, at_step=3, total_steps=steps, env=cpu_env(4))
  procs = [
    subprocess.Popen(
      c, cwd=ROOT, env=cpu_env(4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    for c in processes()
  ]
  errs = [p.communicate(timeout=600)[1] for p in procs]
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-3000:]
  assert f"Resumed from step {last}" in errs[0]

  one = params_lib.read(str(tmp_path / "one"))
  two = params_lib.read(str(two))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one), jax.tree.leaves(two)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
