"""Segmentation data: the embedded digits-on-photos set, training batches, the image-folder
source and its bad inputs (a one-line ConfigError or a counted skip)."""

import numpy as np
import pytest
from PIL import Image

from beit_jax.evaluation import segmentation
from beit_jax.data import embedded
from beit_jax.data import segmentation as data
from beit_jax.errors import ConfigError
from configs import seg_tiny_local


def _config(**input_overrides):
  c = seg_tiny_local.get_config("steps=4,batch=8")
  c.input.update(dict(image_size=32, shuffle_buffer=64))
  c.input.update(input_overrides)
  return c


# --------------------------------------------------------------------------- embedded set


def test_paste_digit_labels_its_stroke_in_its_colour():
  digit = np.zeros((8, 8), np.uint8)
  digit[2:6, 3:5] = 255  # a bar
  image, label = np.zeros((20, 20, 3), np.uint8), np.zeros((20, 20), np.uint8)
  colour = np.array([250.0, 20.0, 90.0])
  new_image, new_label = data.paste_digit(
    image, label, digit, 7, top=4, left=6, side=8, colour=colour
  )
  assert not label.any() and not image.any()  # copies
  np.testing.assert_array_equal(new_label[4:12, 6:14], np.where(digit >= 128, 7, 0))
  assert new_label.sum() == 7 * 8
  np.testing.assert_array_equal(new_image[new_label == 7], np.tile([250, 20, 90], (8, 1)))
  assert not new_image[new_label == 0].any()


def test_the_embedded_set_is_deterministic_and_labelled_by_its_pastes():
  images, labels = data.digits_on_photos("validation")
  again = data.digits_on_photos.__wrapped__("validation")  # not the cached arrays
  np.testing.assert_array_equal(images, again[0])
  np.testing.assert_array_equal(labels, again[1])
  other = data.digits_on_photos.__wrapped__("validation", seed=1)
  assert not np.array_equal(labels, other[1])
  assert images.shape == (120, 96, 96, 3) and labels.shape == (120, 96, 96)
  assert labels.max() == 10 and all(np.any(l > 0) for l in labels)  # a digit in every image
  # The layout is drawn from (seed, split): replay it, pasting onto black, and the labels are
  # those of the set; the digits are those of the digits' validation split.
  digits, classes, _ = embedded.load_labelled("digits", "validation")
  rng = np.random.default_rng([0, 1])
  photos = embedded.load_embedded_images(max_side=384)
  for i in range(3):
    data._background(rng, photos[i], True)  # pylint: disable=protected-access
    label = np.zeros((96, 96), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
      k, side = int(rng.integers(len(digits))), int(rng.integers(28, 57))
      top, left = (int(x) for x in rng.integers(0, 96 - side + 1, size=2))
      rng.uniform(), rng.uniform()  # the colour's hue and saturation
      _, label = data.paste_digit(
        np.zeros((96, 96, 3), np.uint8),
        label,
        digits[k][..., 0],
        int(classes[k]) + 1,
        top,
        left,
        side,
        np.zeros(3),
      )
    np.testing.assert_array_equal(label, labels[i], err_msg=f"image {i}")


def test_training_batches_are_crops_with_ignored_padding():
  # The validation images (the same pipeline; 120 images are quicker to make than 800).
  batch = next(data.make_train_iterator(_config(split="validation"), seed=0))
  assert batch["image"].shape == (8, 32, 32, 3) and batch["label"].shape == (8, 32, 32)
  assert set(np.unique(batch["label"])) <= set(range(11)) | {255}
  assert np.any((batch["label"] > 0) & (batch["label"] < 255))
  # Shrunk (ratio 0.25: 24 px at scale (384, 96)) below the crop: padded with 255 and 0.
  small = next(
    data.make_train_iterator(_config(split="validation", ratio_range=(0.25, 0.25)), seed=0)
  )
  assert (small["label"][:, 24:, :] == 255).all() and (small["label"][:, :24, :24] != 255).all()
  assert (small["image"][:, 24:] == 0).all()


# --------------------------------------------------------------------------- folder source


def _write_pair(root, split, stem, size, label_size=None, value=1):
  (root / "images" / split).mkdir(parents=True, exist_ok=True)
  (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(len(stem))
  Image.fromarray(rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)).save(
    root / "images" / split / f"{stem}.jpg"
  )
  label = np.zeros(label_size or size, np.uint8)
  label[: label.shape[0] // 2] = value
  Image.fromarray(label).save(root / "annotations" / split / f"{stem}.png")


def _folder_config(root, **overrides):
  fields = dict(
    dataset=f"folder:{root}",
    split="training",
    eval_split="validation",
    num_classes=3,
    reduce_zero_label=True,
  )
  return _config(**{**fields, **overrides})


def test_a_folder_of_pairs_is_evaluated_with_bad_pairs_counted(tmp_path):
  for i in range(8):
    _write_pair(tmp_path, "training", f"t{i}", (40, 50), value=2)
  _write_pair(tmp_path, "validation", "a", (40, 60), value=1)
  _write_pair(tmp_path, "validation", "b", (30, 30), label_size=(31, 30))  # another size
  _write_pair(tmp_path, "validation", "c", (30, 30), value=9)  # 9 - 1: no class of 3
  config = _folder_config(tmp_path)
  data.check(config)
  eval_data = data.EvalData(config)
  examples = {eval_data.source.describe(int(e["id"])).rpartition("/")[2]: e for e in eval_data}
  assert sorted(examples) == ["a.jpg", "b.jpg", "c.jpg"]
  a = examples["a.jpg"]
  assert int(a["problem"]) == 0 and a["image"].shape == (40, 60, 3)
  # reduce_zero_label: 0 -> 255 (ignored), 1 -> class 0.
  assert set(np.unique(a["label"])) == {0, 255}
  assert a["views"][0].shape == (96, 144, 3)  # scale (384, 96): short side 96
  assert data.PROBLEMS[int(examples["b.jpg"]["problem"])] == "its label map has another size"
  assert "no class" in data.PROBLEMS[int(examples["c.jpg"]["problem"])]

  mesh_predict = lambda params, windows: windows[..., :1].repeat(3, -1) * params
  evaluator = segmentation.Evaluator(
    mesh_predict,
    mesh=_mesh(),
    params_sharding=None,
    crop=32,
    stride=21,
    window_batch=8,
    num_classes=3,
    flip=False,
  )
  confusion, pictures, skipped = evaluator.evaluate(np.float32(1.0), eval_data)
  assert dict(skipped) == {
    "its label map has another size": 1,
    "its label map has a value that is no class": 1,
  }
  assert confusion.sum() == 20 * 60  # the top half of a's label; the rest is ignored
  assert len(pictures) == 1 and pictures[0][1].shape == (40, 60)


def _mesh():
  from beit_jax.training import sharding  # pylint: disable=g-import-not-at-top

  return sharding.make_mesh({"data": -1})


def test_training_skips_and_counts_pairs_that_do_not_fit(tmp_path):
  for i in range(6):
    _write_pair(tmp_path, "training", f"good{i}", (40, 50), value=2)
  _write_pair(tmp_path, "training", "bad_size", (40, 50), label_size=(40, 51))
  _write_pair(tmp_path, "training", "bad_value", (40, 50), value=200)
  _write_pair(tmp_path, "validation", "v", (40, 50))
  it = data.make_train_iterator(_folder_config(tmp_path, batch_size=8), seed=0)
  batch = next(it)
  assert batch["label"].shape == (8, 32, 32)
  assert set(np.unique(batch["label"])) <= {1, 255}  # 2 - 1, and the ignored 0s
  assert it.skipped_counts() == {"undecodable": 2}  # both refilled from the good ones


@pytest.mark.parametrize(
  "make, message",
  [
    (
      lambda root: (root / "annotations" / "training" / "t1.png").unlink(),
      r"^input.dataset='folder:.*': 1 images have no annotation \(e.g. .*t1.jpg: expected "
      r".*annotations/training/t1.png\)$",
    ),
    (
      lambda root: None,
      r"^input.eval_split='val' is not a split of .*: images/ holds "
      r"\['training', 'validation'\]$",
    ),
  ],
)
def test_folder_errors_are_one_line(tmp_path, make, message):
  for i in range(2):
    _write_pair(tmp_path, "training", f"t{i}", (20, 20))
  _write_pair(tmp_path, "validation", "v", (20, 20))
  make(tmp_path)
  with pytest.raises(ConfigError, match=message):
    data.check(_folder_config(tmp_path, eval_split="val"))


def test_embedded_set_checks():
  with pytest.raises(ConfigError, match=r"^input.num_classes=150 but embedded:digits has 11"):
    data.check(_config(num_classes=150))
  with pytest.raises(ConfigError, match=r"^input.eval_split='test' of embedded:digits: split"):
    data.check(_config(eval_split="test"))
  with pytest.raises(
    ConfigError,
    match=r"^input.dataset='embedded:photos' is not a "
    r"segmentation data set",
  ):
    data.check(_config(dataset="embedded:photos"))
