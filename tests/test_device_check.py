"""launch/device_check.sh: its CPU dry run (tiny model, batch 2, 1 step, one test file,
TensorFlow made unimportable) prints each section -- the environment, the wheels, the
benchmark with the PyTorch reference in a process of its own when torch is here, the tests,
the summary table -- and an unknown argument is a one-line error."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "device_check.sh")


def _run(*args, timeout=600, **env):
  return subprocess.run(
    ["bash", SCRIPT, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
    env=dict(os.environ, PYTHON=sys.executable, **env),
  )


@pytest.mark.slow
def test_the_dry_run_prints_every_section(tmp_path):
  out = _run("--dry-run", "--out", str(tmp_path))
  assert out.returncode == 0, (out.stdout[-4000:], out.stderr[-2000:])
  text = out.stdout
  headers = re.findall(r"^== (.+) ==$", text, re.M)
  assert headers == ["environment", "wheels", "benchmark: batch 2", "tests", "summary"], text
  sections = dict(zip(headers, re.split(r"^== .+ ==$", text, flags=re.M)[1:]))
  assert "mode: dry run (CPU)" in sections["environment"]
  assert re.search(r"^tensorflow: absent", sections["environment"], re.M)  # as on the image
  torch_here = all(importlib.util.find_spec(p) for p in ("torch", "transformers", "dall_e"))
  bench = sections["benchmark: batch 2"]
  if torch_here:  # both frameworks, each in a process of its own
    assert re.search(r"^ +jax process: pid \d+$", bench, re.M), bench
    assert re.search(r"^ +torch process: pid \d+$", bench, re.M), bench
    assert re.search(r"^  JAX/PyTorch: \S+x$", bench, re.M), bench
    assert re.search(r"^json: \{", bench, re.M), bench
  else:
    assert re.search(r"^train step: [\d.]+ ms", bench, re.M), bench
  assert re.search(r"^1 passed", sections["tests"], re.M), sections["tests"]
  summary = sections["summary"]
  row = re.search(r"^\| 2 \| ([\d.]+) \| – \| (\S+) \| – \| (\S+) \|$", summary, re.M)
  assert row, summary
  if torch_here:
    assert float(row.group(3).rstrip("x")) > 0
  assert re.search(r"^tests: 1 passed", summary, re.M), summary
  assert re.search(r"^device check: \d+ s", summary, re.M), summary
  logs = set(os.listdir(tmp_path))
  assert {"environment.log", "benchmark_2.log", "tests.log", "summary.txt"} <= logs


def test_an_unknown_argument_is_one_line():
  out = _run("--gpu", timeout=60)
  assert out.returncode == 2 and out.stdout == ""
  assert out.stderr.strip().splitlines() == [
    "device_check.sh: error: unknown argument '--gpu' (see --help)"
  ]


def test_help_says_what_it_prints():
  out = _run("--help", timeout=60)
  assert out.returncode == 0
  for section in (
    "environment",
    "wheels",
    "benchmark: batch 64",
    "tests",
    "summary",
    "--dry-run",
    "--download-wheels",
  ):
    assert section in out.stdout, out.stdout
