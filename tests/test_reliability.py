"""A bad batch or a bad image must not cost the run (issue: reliability)."""

import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image

from beit_jax.training import checkpoint
from beit_jax import params as params_lib
from beit_jax.training import runner
from beit_jax import tokenizers
from beit_jax.data import pretrain
from beit_jax.errors import TrainingError
from beit_jax.trainers import dvae
from tests.tiny_config import tiny_config


def _dvae_config(config=None, **kw):
  """The tiny MIM config's stage 1 (`tokenizer.recipe`), a checkpoint every step."""
  c = (config or tiny_config()).tokenizer.recipe
  c.update(dict(log_every_steps=1, images_every_steps=100))
  c.checkpoint = dict(every_steps=1, keep=10)
  c.update(kw)
  return c


class _NanAt:
  """A run's batches with those of `steps` replaced by NaNs (float fields only)."""

  def __init__(self, batches, start_step: int, steps):
    self._batches, self._step, self._steps = batches, start_step, set(steps)

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._batches)
    self._step += 1
    if self._step in self._steps:
      batch = {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v for k, v in batch.items()}
    return batch

  def skipped_counts(self):
    return self._batches.skipped_counts()


@pytest.fixture
def nan_batches(monkeypatch):
  """`nan_batches(steps)`: the runs started afterwards (`runner.run`) get NaN batches at
  `steps`, the fault the bad-step guard must absorb. A test hook: no config field."""

  def inject(steps):
    run = runner.run

    def run_with_nans(config, workdir, task):
      batches = lambda start: _NanAt(task.batches(start), start, steps)
      return run(config, workdir, dataclasses.replace(task, batches=batches))

    monkeypatch.setattr(runner, "run", run_with_nans)

  return inject


def _params(workdir, step):
  return params_lib.read(str(workdir / "checkpoints" / str(step)))


def _same(a, b):
  import jax  # pylint: disable=g-import-not-at-top

  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_a_nan_batch_is_skipped_with_params_unchanged(tmp_path, nan_batches):
  nan_batches((2,))
  dvae.train_and_evaluate(_dvae_config(), str(tmp_path))
  assert _same(_params(tmp_path, 1), _params(tmp_path, 2))  # step 2 skipped
  assert not _same(_params(tmp_path, 2), _params(tmp_path, 3))  # training went on


def test_too_many_bad_steps_stop_the_run_with_the_last_good_checkpoint(tmp_path, nan_batches):
  nan_batches((2, 3, 4))
  config = _dvae_config(max_bad_steps=2)
  with pytest.raises(TrainingError, match="2 consecutive steps .* max_bad_steps=2"):
    dvae.train_and_evaluate(config, str(tmp_path))
  manager = checkpoint.make_manager(str(tmp_path), every_steps=1, keep=10)
  assert manager.latest_step() == 2  # step 3 (the second bad one) was not saved
  assert _same(_params(tmp_path, 1), _params(tmp_path, 2))


def _jpeg(array, mode="RGB"):
  buf = io.BytesIO()
  Image.fromarray(array).convert(mode).save(buf, format="JPEG")
  return buf.getvalue()


def test_bad_images_in_a_folder_are_handled_or_skipped_and_counted(tmp_path):
  rng = np.random.default_rng(0)
  data = tmp_path / "images"
  data.mkdir()
  photo = (rng.uniform(size=(48, 64, 3)) * 255).astype(np.uint8)
  for k in range(10):
    (data / f"ok{k}.jpg").write_bytes(_jpeg(np.roll(photo, 5 * k, axis=1)))
  (data / "gray.png").write_bytes(_jpeg(photo[..., 0], "L"))
  (data / "cmyk.jpg").write_bytes(_jpeg(photo, "CMYK"))
  (data / "tiny.jpg").write_bytes(_jpeg(photo[:3, :5]))  # smaller than the 32 px crop
  (data / "huge.jpg").write_bytes(_jpeg(np.full((3000, 4000, 3), 128, np.uint8)))
  (data / "truncated.jpg").write_bytes(_jpeg(photo)[:200])
  (data / "garbage.png").write_bytes(b"not an image at all")
  # The whole folder in each batch (MIM's and the dVAE's): every batch meets every file.
  config = tiny_config(dataset=f"folder:{data}", batch_size=16)

  it = pretrain.make_pretrain_iterator(config, tokenizers.pretrain_views(config), seed=0)
  batch = next(it)
  assert np.isfinite(batch["image"]).all() and batch["image"].shape == (16, 32, 32, 3)
  assert it.skipped_counts()["undecodable"] == 2

  dvae.train_and_evaluate(_dvae_config(config, total_steps=3), str(tmp_path / "run"))
  meta = json.loads((tmp_path / "run" / "checkpoints" / "3" / "meta" / "metadata").read_text())
  assert meta["skipped_images"] == {"undecodable": 2 * 3}  # 2 bad files x 3 steps
