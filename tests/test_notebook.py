"""launch/colab.ipynb, executed headless on the CPU in a kernel of its own (nbclient): its
parameter cell's values are overridden by a cell injected after it (papermill's way) that
shrinks the run to seconds, skips the install (the kernel runs inside this checkout) and
TensorBoard; a cell that raises fails the test."""
import os
import time

import pytest

from tests.runs import ROOT, cpu_env

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")  # the kernel nbclient starts

NOTEBOOK = os.path.join(ROOT, "launch", "colab.ipynb")

# The demo's config at the size of tests/tiny_config.py: two steps of each stage.
SHRUNK = {
    "TOKENIZER_STEPS": 2, "STEPS": 2, "BATCH": 8, "INSTALL": False, "TENSORBOARD": False,
    "OVERRIDES": {
        "model.width": 32, "model.depth": 2, "model.num_heads": 2, "model.mlp_dim": 64,
        "input.image_size": 32, "input.tokenizer_image_size": 32,
        "input.embedded_epoch_size": 64, "input.shuffle_buffer": 64,
        "input.mask.num_masking_patches": 6, "input.mask.min_num_patches": 2,
        "tokenizer.vocab_size": 64, "tokenizer.n_hid": 8, "tokenizer.n_init": 16},
}


def with_parameters(nb, values: dict):
  """`nb` with a cell setting `values` right after the cell tagged 'parameters'."""
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, "the notebook needs one cell tagged 'parameters'"
  source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
  cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
  nb.cells.insert(tagged[0] + 1, cell)
  return nb


def _outputs(cell, kind: str) -> list:
  return [o for o in cell.outputs if kind in o.get("data", {}) or o.get("name") == kind]


@pytest.mark.slow
def test_the_notebook_runs_headless_on_the_cpu(tmp_path, monkeypatch):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert {"parameters", "install"} <= {t for c in nb.cells for t in c.metadata.get("tags", [])}
  nb = with_parameters(nb, dict(SHRUNK, WORKDIR=str(tmp_path / "run")))
  for key, value in cpu_env(1).items():  # the kernel inherits this process's environment
    monkeypatch.setenv(key, value)
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.join(ROOT, "launch")}})
  start = time.time()
  client.execute()  # raises CellExecutionError, naming the cell, when one fails
  print(f"the notebook ran in {time.time() - start:.0f} s")

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
