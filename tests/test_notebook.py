"""launch/colab.ipynb, executed headless on the CPU in a kernel of its own (nbclient): its
parameter cell's values are overridden by a cell injected after it (papermill's way) that
shrinks the run to seconds (tests/notebook_run.py), skips the install (the kernel runs inside
this checkout) and TensorBoard; a cell that raises fails the test. A second test, opt-in as it
installs from the package index, runs the install cell in a kernel that holds nothing else."""

import os
import subprocess
import sys

import pytest

from tests.runs import ROOT, cpu_env

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")  # the kernel nbclient starts
from tests import notebook_run  # noqa: E402  (needs nbclient)


def _outputs(cell, kind: str) -> list:
  return [o for o in cell.outputs if kind in o.get("data", {}) or o.get("name") == kind]


@pytest.mark.slow
def test_the_notebook_runs_headless_on_the_cpu(tmp_path, monkeypatch):
  tags = {
    t for c in nbformat.read(notebook_run.NOTEBOOK, 4).cells for t in c.metadata.get("tags", [])
  }
  assert {"parameters", "install"} <= tags
  for key, value in cpu_env(1).items():  # the kernel inherits this process's environment
    monkeypatch.setenv(key, value)
  nb = notebook_run.execute(str(tmp_path / "run"))  # a cell that raises fails the test

  cells = {c.get("id"): c for c in nb.cells}
  assert (tmp_path / "run" / "tokenizer" / "checkpoints").is_dir()
  assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
  trained = "".join(o.get("data", {}).get("text/plain", "") for o in cells["train"].outputs)
  assert "'loss'" in trained and "'mim_accuracy'" in trained, trained
  # The run's pictures and every experiment's picture are shown inline.
  assert len(_outputs(cells["pictures"], "image/png")) >= 2
  for name in ("mask", "attention", "features"):
    assert len(_outputs(cells[name], "image/png")) == 1, name
  printed = "".join(o.get("text", "") for o in _outputs(cells["mask"], "stdout"))
  assert "4 patches masked" in printed, printed


def _pins(*names: str) -> list[str]:
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    pins = [line.split("#")[0].strip() for line in f]
  return [p for p in pins if p.split("==")[0] in names]


@pytest.mark.skipif(
  not os.environ.get("BEIT_JAX_TEST_INSTALL"),
  reason="installs beit-jax from the package index into a new virtualenv "
  "(minutes); set BEIT_JAX_TEST_INSTALL=1",
)
def test_the_install_cell_installs_beit_jax_into_a_bare_kernel(tmp_path):
  """The notebook as Colab runs it: a kernel that has none of beit-jax's requirements; its
  install cell (`%pip`, the kernel's own interpreter) installs them and the checkout."""
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  subprocess.run(
    [python, "-m", "pip", "install", "-q", *_pins("nbclient", "nbformat", "ipykernel")], check=True
  )
  env = {k: v for k, v in cpu_env(1).items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
  env["PATH"] = os.pathsep.join(
    p for p in env["PATH"].split(os.pathsep) if not p.startswith(os.path.dirname(sys.executable))
  )
  run = subprocess.run(
    [python, os.path.join(ROOT, "tests", "notebook_run.py"), str(tmp_path / "run"), "--install"],
    env=env,
    capture_output=True,
    text=True,
    check=False,
  )
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert "no TPU: the run uses the CPU" in run.stdout, run.stdout[-3000:]
  assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
  installed = subprocess.run(
    [python, "-c", "import beit_jax, jax; print(beit_jax.__file__)"],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert installed.strip().startswith(ROOT), installed
