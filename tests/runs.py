"""Helpers of the end-to-end tests that start `python -m beit_jax.main` subprocesses on
tests/tiny_config.py and compare what their workdirs hold."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from beit_jax import benchmark
from beit_jax.training import checkpoint
from beit_jax import params as params_lib
from beit_jax import tokenizers
from tests.tiny_config import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_command(workdir, tokenizer, steps: int, *flags: str) -> list[str]:
  """A tiny MIM run against the tokenizer checkpoint `tokenizer`, as a command line."""
  return [
    sys.executable,
    "-m",
    "beit_jax.main",
    "--config=tests/tiny_config.py",
    f"--workdir={workdir}",
    f"--config.tokenizer.init_from={tokenizer}",
    f"--config.total_steps={steps}",
    *flags,
  ]


def cpu_env(devices: int) -> dict[str, str]:
  """The environment of a subprocess on `devices` (fake) CPU devices, with the tests' other
  XLA flags (conftest.py)."""
  flags = re.sub(
    r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
  ).split()
  return dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
  )


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def random_tokenizer(path) -> str:
  """A checkpoint of tiny_config's dVAE with random weights: a frozen tokenizer for MIM runs
  that test the run, not the tokens (no stage 1 to train)."""
  config = tiny_config()
  tokenizer = tokenizers.build(config.tokenizer)
  size = tokenizers.view(config).size
  shapes = jax.eval_shape(lambda k: tokenizer.init(k, size), jax.random.key(0))
  return checkpoint.save_params(str(path), benchmark.host_random(shapes))


def assert_same_params(workdir_a, workdir_b) -> None:
  """The latest checkpoints of two runs hold the same params, bit for bit."""
  a = params_lib.read(str(workdir_a))
  b = params_lib.read(str(workdir_b))
  leaves_a = jax.tree_util.tree_leaves_with_path(a)
  assert len(leaves_a) == len(jax.tree.leaves(b))
  for (path, x), y in zip(leaves_a, jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def scalars(logdir, tag) -> list[tuple[int, float]]:
  """(step, value) of a scalar clu wrote (TF2 summaries are stored as tensors), all of them
  (by default the accumulator keeps a sample of 10)."""
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
  acc.Reload()
  if tag not in acc.Tags()["tensors"]:
    return []
  return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]


class Watched:
  """A subprocess whose stderr is read as it comes, to act when a line appears."""

  def __init__(self, cmd: list[str], env: dict[str, str]):
    self.proc = subprocess.Popen(
      cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    self.lines: list[str] = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def __enter__(self) -> "Watched":
    return self

  def __exit__(self, *exc) -> None:
    if self.proc.poll() is None:  # a failed test: do not leave it running
      self.proc.kill()
      self.proc.wait()

  def _read(self) -> None:
    for line in self.proc.stderr:
      self.lines.append(line)

  def wait_for(self, pattern: str, timeout: float = 600) -> re.Match:
    """The first match of `pattern` in a line; fails if the process ends first."""
    deadline = time.time() + timeout
    seen = 0
    while True:
      ended = not self._reader.is_alive()  # before counting: no line comes after that
      for line in self.lines[seen:]:
        m = re.search(pattern, line)
        if m:
          return m
        seen += 1
      assert not ended, (
        f"ended (rc {self.proc.poll()}) without a line matching "
        f"{pattern!r}:\n" + "".join(self.lines[-30:])
      )
      assert time.time() < deadline, f"no line matching {pattern!r} in {timeout} s"
      time.sleep(0.01)

  def finish(self, timeout: float = 600) -> tuple[int, str]:
    """(return code, all of stderr)."""
    self.proc.wait(timeout=timeout)
    self._reader.join(timeout=60)
    return self.proc.returncode, "".join(self.lines)


def kill_mid_run(
  command: list[str] | list[list[str]], workdir, *, at_step: int, total_steps: int, env
) -> int:
  """Starts `command` (or the processes of one run: a list of commands), SIGKILLs it once
  checkpoint `at_step` exists in `workdir`; returns the newest checkpoint left (asserted to
  be mid-run)."""
  commands = command if isinstance(command[0], list) else [command]
  procs = [
    subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for c in commands
  ]
  deadline = time.time() + 600
  while not (workdir / "checkpoints" / str(at_step)).exists():
    assert all(p.poll() is None for p in procs) and time.time() < deadline, (
      f"run ended before step {at_step}"
    )
    time.sleep(0.05)
  for proc in procs:
    proc.send_signal(signal.SIGKILL)
  for proc in procs:
    proc.wait()
  ckpts = checkpoint.make_manager(str(workdir), every_steps=2, keep=10).all_steps()
  assert 0 < max(ckpts) < total_steps, f"the kill did not land mid-run: {ckpts}"
  return max(ckpts)
