"""Labelled data: the sources, labels that stay with their images, evaluation, RandAugment."""

import ml_collections
import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest
import skimage.data
import tensorflow as tf
import tensorflow_datasets as tfds

from beit_jax import trainers
from beit_jax.data import classification as cp
from beit_jax.data import embedded as embedded_data
from beit_jax.data import randaugment as ra
from beit_jax.data import sources
from beit_jax.data import views
from beit_jax.errors import ConfigError
from tests.tiny_config import tiny_finetune_config

MEAN, STD = np.asarray(views.IMAGENET_MEAN), np.asarray(views.IMAGENET_STD)


def make_config(dataset="embedded:digits", **overrides) -> ml_collections.ConfigDict:
  """No augmentation at all: a training image is its source image, normalised."""
  cfg = dict(
    dataset=dataset,
    split="train",
    eval_dataset="",
    eval_split="validation",
    data_dir=None,
    batch_size=8,
    eval_batch_size=64,
    image_size=32,
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    flip=False,
    color_jitter=0.0,
    randaugment="",
    random_erase=0.0,
    eval_crop_pct=1.0,
    shuffle_buffer=16,
  )
  cfg.update(overrides)
  return ml_collections.ConfigDict({"input": cfg})


def normalised(images) -> np.ndarray:
  return (np.asarray(images, np.float32) / 255.0 - MEAN) / STD


# --------------------------------------------------------------------------- embedded sets


def test_embedded_sets_are_disjoint_splits_with_every_class():
  for name, classes in (("digits", 10), ("photos", 20)):
    train, train_labels, names = embedded_data.load_labelled(name, "train")
    val, val_labels, _ = embedded_data.load_labelled(name, "validation")
    assert len(names) == classes
    assert set(train_labels) == set(val_labels) == set(range(classes))
    assert 0.15 < len(val) / (len(train) + len(val)) < 0.3
    assert not {x.tobytes() for x in train} & {x.tobytes() for x in val}, name
  digits, labels, _ = embedded_data.load_labelled("digits", "validation")
  assert digits[0].shape == (32, 32, 3) and len(digits) == 364
  # The 8x8 originals, upsampled: block means keep the digit (a 0 has a dark centre).
  assert labels[0] == 0 and digits[0][12:20, 12:20].mean() < digits[0][4:28, 4:28].mean()


def test_split_slices_are_those_of_tfds():
  train, labels, _ = embedded_data.load_labelled("digits", "train")
  for split, window in (
    ("train[:10%]", slice(0, 143)),
    ("train[100:]", slice(100, None)),
    ("train[-50:]", slice(-50, None)),
    ("train[:200]", slice(0, 200)),
  ):
    images, sliced, _ = embedded_data.load_labelled("digits", split)
    np.testing.assert_array_equal(sliced, labels[window])
    np.testing.assert_array_equal(np.stack(images), np.stack(train[window]))
  # The sets cycle through their classes, so a prefix keeps every class.
  assert set(embedded_data.load_labelled("digits", "train[:10%]")[1]) == set(range(10))
  assert set(embedded_data.load_labelled("photos", "train[:10%]")[1]) == set(range(20))
  info = cp.dataset_info(make_config(split="train[:10%]"))
  assert (info.num_train, info.num_eval) == (143, 364)


def test_training_images_carry_their_labels_and_resume(tmp_path):
  config = make_config()
  images, labels, _ = embedded_data.load_labelled("digits", "train")
  it = cp.make_train_iterator(config, seed=3)
  batches = []
  for _ in range(4):
    batch = next(it)
    ids = it.last_ids
    batches.append(batch)
    np.testing.assert_array_equal(batch["label"], labels[ids])
    np.testing.assert_allclose(
      batch["image"], normalised(np.stack([images[i] for i in ids])), atol=1e-5
    )
  resumed = cp.make_train_iterator(config, seed=3, start_step=2)
  for want in batches[2:]:
    got = next(resumed)
    for k in ("image", "label"):
      np.testing.assert_array_equal(got[k], want[k])


def test_evaluation_covers_each_image_once_split_over_processes():
  config = make_config()
  images, labels, _ = embedded_data.load_labelled("digits", "validation")
  data = cp.EvalData(config)
  batches = list(data)
  assert data.num_batches == len(batches) == 6  # 364 images, batches of 64
  got = {k: np.concatenate([b[k] for b in batches]) for k in ("image", "label", "valid")}
  assert got["valid"].sum() == 364 and not got["valid"][364:].any()
  np.testing.assert_array_equal(got["label"][:364], labels)
  np.testing.assert_allclose(got["image"][:364], normalised(np.stack(images)), atol=1e-4)

  halves = [cp.EvalData(config, process_index=p, process_count=2) for p in (0, 1)]
  assert halves[0].num_batches == halves[1].num_batches == 6  # 182 each, batches of 32
  for p, half in enumerate(halves):
    seen = np.concatenate([b["label"][b["valid"]] for b in half])
    np.testing.assert_array_equal(seen, labels[p::2])


def test_eval_resizes_the_shorter_side_then_crops_the_centre():
  config = make_config("embedded:photos", image_size=16, eval_crop_pct=0.5)
  batch = next(iter(cp.EvalData(config)))
  tiles, _, _ = embedded_data.load_labelled("photos", "validation")
  # 32 -> 32 (16 / 0.5): no resize; the centre 16x16 of the tile.
  np.testing.assert_allclose(batch["image"][0], normalised(tiles[0][8:24, 8:24]), atol=1e-4)


def test_augmentations_change_images_not_labels():
  config = make_config(crop_scale=(0.3, 1.0), randaugment="rand-m9-mstd0.5-inc1", random_erase=1.0)
  augmented = next(cp.make_train_iterator(config, seed=1))
  plain = next(cp.make_train_iterator(make_config(), seed=1))
  np.testing.assert_array_equal(plain["label"], augmented["label"])
  changed = np.abs(augmented["image"] - plain["image"]).mean(axis=(1, 2, 3))
  assert np.all(changed > 0.05)


# --------------------------------------------------------------------------- folders, TFDS


def _png(path, colour):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((20, 24, 3), colour, np.uint8)).save(path)


def test_folder_classes_are_subfolders(tmp_path):
  colours = {"cat": 30, "dog": 220}
  for split in ("train", "val"):
    for name, colour in colours.items():
      for i in range(3):
        _png(tmp_path / split / name / f"{i}.png", colour + i)
  config = make_config(
    f"folder:{tmp_path}/train",
    eval_dataset=f"folder:{tmp_path}/val",
    batch_size=2,
    eval_batch_size=4,
    image_size=8,
  )
  info = cp.dataset_info(config)
  assert (info.num_train, info.num_eval, info.class_names) == (6, 6, ("cat", "dog"))
  batch = next(cp.make_train_iterator(config, seed=0))
  pixel = (batch["image"][:, 0, 0, 0] * STD[0] + MEAN[0]) * 255
  np.testing.assert_array_equal(batch["label"], (pixel > 128).astype(int))
  labels = np.concatenate([b["label"][b["valid"]] for b in cp.EvalData(config)])
  np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1])

  _png(tmp_path / "val" / "loose.png", 0)
  sources.list_image_folder.cache_clear()
  with pytest.raises(ConfigError, match="one subfolder per class; 1 image files lie"):
    cp.dataset_info(config)
  _png(tmp_path / "other" / "bird" / "0.png", 0)
  config.input.eval_dataset = f"folder:{tmp_path}/other"
  with pytest.raises(ConfigError, match="do not have the same classes"):
    cp.dataset_info(config)


def test_tfds_labels_come_with_their_images(tmp_path):
  with tfds.core.registered.skip_registration():

    class BeitTestLabelled(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")
      __module__ = "beit_test_labelled"

      def _info(self):
        return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict(
            {
              "image": tfds.features.Image(encoding_format="png"),
              "label": tfds.features.ClassLabel(names=["dark", "mid", "light"]),
            }
          ),
        )

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(12), "validation": self._generate_examples(5)}

      def _generate_examples(self, n):  # pylint: disable=arguments-differ
        for i in range(n):
          yield i, {"image": np.full((10, 12, 3), 40 + 80 * (i % 3), np.uint8), "label": i % 3}

  BeitTestLabelled(data_dir=str(tmp_path)).download_and_prepare()
  config = make_config(
    "tfds:beit_test_labelled", data_dir=str(tmp_path), batch_size=4, eval_batch_size=4, image_size=8
  )
  info = cp.dataset_info(config)
  assert (info.num_train, info.num_eval, info.num_classes) == (12, 5, 3)
  batch = next(cp.make_train_iterator(config, seed=0))
  pixel = np.round((batch["image"][:, 0, 0, 0] * STD[0] + MEAN[0]) * 255)
  np.testing.assert_array_equal(pixel, 40 + 80 * batch["label"])
  evaluated = list(cp.EvalData(config))
  assert len(evaluated) == 2 and sum(b["valid"].sum() for b in evaluated) == 5
  config.input.split = "train[:50%]"
  assert cp.dataset_info(config).num_train == 6


@pytest.mark.parametrize(
  "field, overrides",
  [
    ("input.dataset", {"dataset": "embedded"}),
    ("input.eval_crop_pct", {"eval_crop_pct": 0.0}),
    ("input.random_erase", {"random_erase": 1.5}),
    ("input.randaugment", {"randaugment": "rand-m12"}),
    ("input split", {"eval_split": "test"}),
    ("input split", {"eval_split": "validation[:ten]"}),
    (
      "input split 'validation\\[5:5\\]' of embedded:digits holds no images",
      {"eval_split": "validation[5:5]"},
    ),
  ],
)
def test_bad_config_names_the_field(field, overrides):
  """At start-up (`trainers.validate_config`, the field rules of a fine-tuning run; the
  pipeline does not check them again) or where the pipeline meets the data."""
  config = tiny_finetune_config()
  with config.input.ignore_type():
    config.input.update(overrides)
  with pytest.raises(ConfigError, match=field):
    trainers.validate_config(config)
    cp.EvalData(make_config(**overrides))


# --------------------------------------------------------------------------- RandAugment


@pytest.fixture(scope="module")
def photo():
  return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((40, 32)))


@pytest.mark.parametrize(
  "name, ours, pil",
  [
    ("autocontrast", ra.auto_contrast, ImageOps.autocontrast),
    ("equalize", ra.equalize, ImageOps.equalize),
    ("posterize", lambda x: ra.posterize(x, tf.constant(2)), lambda p: ImageOps.posterize(p, 2)),
    ("solarize", lambda x: ra.solarize(x, 100.0), lambda p: ImageOps.solarize(p, 100)),
    ("color", lambda x: ra.color(x, 0.3), lambda p: ImageEnhance.Color(p).enhance(0.3)),
    ("contrast", lambda x: ra.contrast(x, 1.7), lambda p: ImageEnhance.Contrast(p).enhance(1.7)),
    (
      "brightness",
      lambda x: ra.brightness(x, 1.7),
      lambda p: ImageEnhance.Brightness(p).enhance(1.7),
    ),
    ("sharpness", lambda x: ra.sharpness(x, 0.2), lambda p: ImageEnhance.Sharpness(p).enhance(0.2)),
    (
      "translate",
      lambda x: ra.affine(x, tf.constant([1, 0, 5.0, 0, 1, -3.0]), (1, 2, 3)),
      lambda p: p.transform(p.size, Image.AFFINE, (1, 0, 5, 0, 1, -3), fillcolor=(1, 2, 3)),
    ),
  ],
)
def test_pixel_ops_match_pil(photo, name, ours, pil):
  got = ours(tf.constant(photo, tf.float32)).numpy()
  want = np.asarray(pil(Image.fromarray(photo)), np.float32)
  # PIL's autocontrast computes its scale in double: a rare value lands one lower.
  np.testing.assert_allclose(got, want, atol=1 if name == "autocontrast" else 0, err_msg=name)


def test_rotation_follows_pil(photo):
  got = ra.rotate(tf.constant(photo, tf.float32), tf.constant(-7.0), (124, 116, 104)).numpy()
  want = np.asarray(
    Image.fromarray(photo).rotate(-7, resample=Image.BILINEAR, fillcolor=(124, 116, 104)),
    np.float32,
  )
  assert np.abs(got - want).mean() < 2.0  # bilinear vs PIL's edge handling only


def test_randaugment_policy():
  assert ra.parse("rand-m9-mstd0.5-inc1") == ra.Spec(
    num_ops=2, magnitude=9, magnitude_std=0.5, increasing=True
  )
  assert ra.parse("") is None and ra.parse("rand-n3-m5-p1").num_ops == 3
  for bad in ("auto-m9", "rand-m11", "rand-x3", "rand-inc2"):
    with pytest.raises(ConfigError, match="input.randaugment"):
      ra.parse(bad)
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (16, 16, 3)), tf.float32)
  spec = ra.parse("rand-m9-mstd0.5-inc1-p1")
  outs = [ra.randaugment(image, tf.constant([s, 0], tf.int64), spec).numpy() for s in range(8)]
  np.testing.assert_array_equal(
    outs[0], ra.randaugment(image, tf.constant([0, 0], tf.int64), spec).numpy()
  )
  assert all(o.min() >= 0 and o.max() <= 255 and np.array_equal(o, np.round(o)) for o in outs)
  assert sum(not np.array_equal(o, image.numpy()) for o in outs) >= 7


def test_random_erasing_fills_one_rectangle():
  image = tf.fill([20, 30, 3], 7.0)
  assert np.all(ra.random_erasing(image, tf.constant([1, 2], tf.int64), 0.0).numpy() == 7.0)
  for s in range(5):
    out = ra.random_erasing(image, tf.constant([s, 2], tf.int64), 1.0).numpy()
    rows, cols = np.nonzero(np.any(out != 7.0, axis=-1))
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert box == len(rows)  # a filled rectangle
    assert 0.02 * 600 * 0.5 <= box <= 600 / 3 * 1.5
