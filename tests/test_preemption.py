"""SIGTERM (a preemption notice) mid-run: every process saves a checkpoint at the same step,
the run exits 0 with one line saying so, and the same command resumes to the parameters of
a run never interrupted, bit for bit. That uninterrupted run also shows the MFU a run logs."""

import functools
import re
import signal
import subprocess

import pytest

from beit_jax.training import checkpoint
from tests import runs

LINE = (
  r"^beit_jax: MIM preempted at step (\d+); checkpoint saved in (\S+); rerun the same "
  r"command to resume$"
)
REPORT = r"\] \[(\d+)\] grad_norm="  # a step's metrics, as the log writer prints them
STEPS = 60
# Checkpoints only at step 1 (orbax's first) and at the end: any other is the preemption's.
FLAGS = ("--config.checkpoint.every_steps=1000", "--config.images_every_steps=1000")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return runs.random_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def uninterrupted(tokenizer, tmp_path_factory):
  """() -> (workdir, stderr) of the tiny run the preempted one must end equal to; it runs
  while the test that needs it runs its own."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  log = workdir.parent / f"{workdir.name}.stderr"
  with open(log, "w") as f:
    proc = subprocess.Popen(
      runs.main_command(workdir, tokenizer, STEPS, *FLAGS),
      cwd=runs.ROOT,
      env=runs.cpu_env(1),
      stdout=subprocess.DEVNULL,
      stderr=f,
    )

  @functools.cache
  def result():
    proc.wait(timeout=600)
    stderr = log.read_text()
    assert proc.returncode == 0, stderr[-3000:]
    return workdir, stderr

  yield result
  if proc.poll() is None:  # a test failed before waiting for it
    proc.kill()
    proc.wait()


def _preempted_step(stderr: str, workdir) -> int:
  lines = [m for m in (re.match(LINE, line) for line in stderr.splitlines()) if m]
  assert len(lines) == 1, stderr[-3000:]
  assert lines[0].group(2) == str(workdir)
  return int(lines[0].group(1))


def _checkpoints(workdir) -> list[int]:
  return sorted(checkpoint.make_manager(str(workdir), every_steps=1, keep=10).all_steps())


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_resumes_bit_identical(tokenizer, uninterrupted, tmp_path):
  env = runs.cpu_env(1)
  workdir = tmp_path / "preempted"
  cmd = runs.main_command(workdir, tokenizer, STEPS, *FLAGS)
  with runs.Watched(cmd, env) as run:
    run.wait_for(REPORT.replace(r"(\d+)", "4"))
    run.proc.send_signal(signal.SIGTERM)
    run.wait_for("SIGTERM: saving a checkpoint")
    # While it saves: must change nothing. On a quiet machine the tiny run may have saved
    # and exited already; then there is no second signal to ignore.
    alive = run.proc.poll() is None
    run.proc.send_signal(signal.SIGTERM)
    rc, stderr = run.finish()
  assert rc == 0, stderr[-3000:]
  assert "SIGTERM again: ignored" in stderr or not alive, stderr[-3000:]
  step = _preempted_step(stderr, workdir)
  assert 4 <= step < STEPS, "the SIGTERM did not land mid-run"
  assert max(int(s) for s in re.findall(REPORT, stderr)) <= step  # it stopped there
  assert _checkpoints(workdir)[-1] == step

  rerun = subprocess.run(cmd, cwd=runs.ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"Resumed from step {step}" in rerun.stderr
  assert not re.search(LINE, rerun.stderr, re.M)
  assert _checkpoints(workdir)[-1] == STEPS
  runs.assert_same_params(uninterrupted()[0], workdir)


@pytest.mark.slow
def test_a_run_logs_flops_per_step_once_and_mfu_in_0_1(uninterrupted):
  workdir, stderr = uninterrupted()
  flops = runs.scalars(workdir, "flops_per_step")
  assert len(flops) == 1 and flops[0][0] == 1 and flops[0][1] > 0, flops
  mfu = runs.scalars(workdir, "mfu")
  reports = sorted({int(s) for s in re.findall(REPORT, stderr)})
  assert [s for s, _ in mfu] == reports and len(reports) == STEPS // 2
  assert all(0 < v <= 1 for _, v in mfu), mfu
  assert "peak" in stderr and "matmul measured here" in stderr


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tokenizer, tmp_path):
  steps = 2000  # a notice takes up to a second to reach the coordination service
  workdir = tmp_path / "two"
  port = runs.free_port()
  cmds = [
    runs.main_command(
      workdir,
      tokenizer,
      steps,
      "--config.checkpoint.every_steps=5000",
      "--config.images_every_steps=5000",
      f"--coordinator=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={i}",
    )
    for i in range(2)
  ]
  with (
    runs.Watched(cmds[0], runs.cpu_env(1)) as first,
    runs.Watched(cmds[1], runs.cpu_env(1)) as second,
  ):
    first.wait_for(REPORT.replace(r"(\d+)", "4"))
    second.proc.send_signal(signal.SIGTERM)
    results = [first.finish(), second.finish()]
  for rc, stderr in results:
    assert rc == 0, stderr[-3000:]
  step_0, step_1 = (_preempted_step(stderr, workdir) for _, stderr in results)
  assert step_0 == step_1
  assert 4 <= step_0 < steps, "the SIGTERM did not land mid-run"
  assert _checkpoints(workdir)[-1] == step_0
