"""Runs launch/colab.ipynb headless with its parameters shrunk to seconds (nbclient).

Imports only nbformat and nbclient, so that it also runs from a bare virtualenv holding just
those and ipykernel: `python tests/notebook_run.py WORKDIR --install` then checks the
notebook's install cell, which installs beit-jax into that kernel (tests/test_notebook.py).
"""

import argparse
import os
import sys
import time

import nbclient
import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "colab.ipynb")

# The demo's config at the size of tests/tiny_config.py: two steps of each stage.
SHRUNK = {
  "TOKENIZER_STEPS": 2,
  "STEPS": 2,
  "BATCH": 8,
  "INSTALL": False,
  "TENSORBOARD": False,
  "OVERRIDES": {
    "model.width": 32,
    "model.depth": 2,
    "model.num_heads": 2,
    "model.mlp_dim": 64,
    "input.image_size": 32,
    "input.tokenizer_image_size": 32,
    "input.embedded_epoch_size": 64,
    "input.shuffle_buffer": 64,
    "input.mask.num_masking_patches": 6,
    "input.mask.min_num_patches": 2,
    "tokenizer.recipe.input.embedded_epoch_size": 64,
    "tokenizer.recipe.input.shuffle_buffer": 64,
    # Linked to tokenizer.recipe.tokenizer.* (configs/common.py: set_tokenizer).
    "tokenizer.vocab_size": 64,
    "tokenizer.n_hid": 8,
    "tokenizer.n_init": 16,
  },
}


def with_parameters(nb, values: dict):
  """`nb` with a cell setting `values` right after the cell tagged 'parameters'."""
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, "the notebook needs one cell tagged 'parameters'"
  source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
  cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
  nb.cells.insert(tagged[0] + 1, cell)
  return nb


def execute(workdir: str, *, install: bool = False, timeout: int = 300):
  """The executed notebook (cells raise nbclient's CellExecutionError, naming the cell)."""
  nb = with_parameters(
    nbformat.read(NOTEBOOK, as_version=4), dict(SHRUNK, WORKDIR=workdir, INSTALL=install)
  )
  client = nbclient.NotebookClient(
    nb,
    timeout=timeout,
    kernel_name="python3",
    resources={"metadata": {"path": os.path.join(ROOT, "launch")}},
  )
  start = time.time()
  client.execute()
  print(f"the notebook ran in {time.time() - start:.0f} s")
  return nb


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir")
  parser.add_argument("--install", action="store_true", help="run the install cell too")
  args = parser.parse_args()
  executed = execute(args.workdir, install=args.install, timeout=1800)
  for cell in executed.cells:
    for out in cell.get("outputs", []):
      if out.get("name") == "stdout" and cell.get("id") in ("install", "load"):
        sys.stdout.write(f"[{cell.get('id')}] {out['text']}")
