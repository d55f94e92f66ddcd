"""Input pipeline: views, determinism, resumption, sharding, the three sources, bad files."""

import io

import ml_collections
import numpy as np
from PIL import Image
import pytest
import skimage.data
import tensorflow as tf
import tensorflow_datasets as tfds

from beit_jax import tokenizers
from beit_jax import trainers
from beit_jax.data import embedded as embedded_data
from beit_jax.data import ops
from beit_jax.data import pretrain
from beit_jax.data import sources
from beit_jax.data import views
from beit_jax.errors import ConfigError
from tests.tiny_config import tiny_config

MEAN, STD = np.asarray(views.IMAGENET_MEAN), np.asarray(views.IMAGENET_STD)
SOLID, CMYK_RGB = (200, 100, 50), (30, 160, 220)
TFDS_NAME, TFDS_SIZE = "beit_test_tiny_images", 23


def make_config(dataset="embedded", **overrides) -> ml_collections.ConfigDict:
  """32px view 1, 16px view 2, a 4x4 patch grid, batch 4, 3 steps per embedded epoch."""
  cfg = dict(
    dataset=dataset,
    split="train",
    data_dir=None,
    batch_size=4,
    image_size=32,
    tokenizer_image_size=16,
    patch_size=8,
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    color_jitter=0.4,
    flip=True,
    shuffle_buffer=8,
    embedded_epoch_size=12,
    mask=dict(
      kind="blockwise",
      num_masking_patches=6,
      min_num_patches=2,
      max_num_patches=None,
      min_aspect=0.3,
      max_aspect=None,
      exact=False,
    ),
  )
  cfg.update(overrides)
  return ml_collections.ConfigDict({"input": cfg})


def dalle_views(config) -> dict:
  """The ViT's view and the DALL-E tokenizer's (Lanczos, [0, 1]) of `config.input`."""
  return {
    "image": views.vit_view(config.input.image_size),
    "tokenizer_image": tokenizers.KINDS["dvae"].view(config.input),
  }


def make_pretrain_iterator(config, **kwargs):
  return pretrain.make_pretrain_iterator(config, dalle_views(config), **kwargs)


def make_eval_batch(config, **kwargs):
  return pretrain.make_eval_batch(config, dalle_views(config), **kwargs)


def run(it, steps: int) -> tuple[list[dict], list[np.ndarray]]:
  batches, ids = [], []
  for _ in range(steps):
    batches.append(next(it))
    ids.append(it.last_ids)
  return batches, ids


def assert_same_batches(got: list[dict], want: list[dict]):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for k in g:
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def unnormalize(image: np.ndarray) -> np.ndarray:
  return image * STD + MEAN


def downsize(images: np.ndarray) -> np.ndarray:
  """[B, 2S, 2S, 3] -> [B, S, S, 3] by 2x2 averaging."""
  b, s, _, c = images.shape
  return images.reshape(b, s // 2, 2, s // 2, 2, c).mean(axis=(2, 4))


# --------------------------------------------------------------------------- embedded source


@pytest.fixture(scope="module")
def embedded_ref():
  """8 steps = 2 2/3 epochs of 3 steps, seed 0, one process."""
  return run(make_pretrain_iterator(make_config(), seed=0), 8)


def test_embedded_images_are_real_photos():
  images = embedded_data.load_embedded_images()
  assert len(images) == 20
  for image in images:
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert min(image.shape[:2]) >= 150
    assert image.std() > 10  # not blank
  # Grayscale sources became RGB with equal channels; colour photos did not.
  assert sum(np.array_equal(x[..., 0], x[..., 1]) for x in images) >= 5
  np.testing.assert_array_equal(images[0], skimage.data.astronaut())


def test_pretrain_batch_shapes_dtypes_ranges(embedded_ref):
  batches, _ = embedded_ref
  for batch in batches:
    assert set(batch) == {"image", "tokenizer_image", "mask"}
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["tokenizer_image"].shape == (4, 16, 16, 3)
    assert batch["tokenizer_image"].dtype == np.float32
    assert batch["mask"].shape == (4, 16) and batch["mask"].dtype == bool
    assert 0.0 <= batch["tokenizer_image"].min() and batch["tokenizer_image"].max() <= 1.0
    pixels = unnormalize(batch["image"])
    assert -1e-5 <= pixels.min() and pixels.max() <= 1 + 1e-5
    counts = batch["mask"].sum(axis=1)
    assert np.all((counts >= 2) & (counts <= 6))
    assert batch["tokenizer_image"].std(axis=(1, 2, 3)).min() > 0.01  # photos, not blanks
  masks = np.concatenate([b["mask"] for b in batches])
  assert len({m.tobytes() for m in masks}) > len(masks) // 2  # masks differ per example


def test_views_show_the_same_flipped_crop(embedded_ref):
  batches, _ = embedded_ref
  view1 = downsize(np.concatenate([unnormalize(b["image"]) for b in batches]))
  view2 = np.concatenate([b["tokenizer_image"] for b in batches])
  same = np.abs(view1 - view2).mean(axis=(1, 2, 3))
  mirrored = np.abs(view1 - view2[:, :, ::-1]).mean(axis=(1, 2, 3))
  shuffled = np.abs(view1 - np.roll(view2, 1, axis=0)).mean(axis=(1, 2, 3))
  assert same.max() < 0.04
  assert same.mean() < 0.3 * mirrored.mean() and same.mean() < 0.3 * shuffled.mean()


def test_epochs_are_permutations_in_new_orders(embedded_ref):
  _, ids = embedded_ref
  epoch0, epoch1 = np.concatenate(ids[0:3]), np.concatenate(ids[3:6])
  np.testing.assert_array_equal(np.sort(epoch0), np.arange(12))
  np.testing.assert_array_equal(np.sort(epoch1), np.arange(12))
  assert not np.array_equal(epoch0, epoch1)


def test_resume_yields_the_same_batches(embedded_ref):
  """A new iterator at step 5 skips epoch 0 and 2 of 3 steps of epoch 1, then enters epoch 2."""
  batches, ids = embedded_ref
  resumed, resumed_ids = run(make_pretrain_iterator(make_config(), seed=0, start_step=5), 3)
  assert_same_batches(resumed, batches[5:8])
  np.testing.assert_array_equal(resumed_ids, ids[5:8])


def test_other_seed_other_batches(embedded_ref):
  batches, ids = embedded_ref
  other, other_ids = run(make_pretrain_iterator(make_config(), seed=1), 2)
  assert not np.array_equal(np.concatenate(other_ids), np.concatenate(ids[:2]))
  for o, b in zip(other, batches):
    assert not np.array_equal(o["image"], b["image"])
    assert not np.array_equal(o["mask"], b["mask"])


def test_two_processes_split_the_global_batch(embedded_ref):
  batches, ids = embedded_ref
  parts = [
    run(make_pretrain_iterator(make_config(), seed=0, process_index=p, process_count=2), 4)
    for p in (0, 1)
  ]
  for step in range(4):
    (b0, i0), (b1, i1) = [(part[0][step], part[1][step]) for part in parts]
    assert b0["image"].shape[0] == 2
    assert not set(i0) & set(i1)
    np.testing.assert_array_equal(np.concatenate([i0, i1]), ids[step])
    for k in b0:
      np.testing.assert_array_equal(np.concatenate([b0[k], b1[k]]), batches[step][k], err_msg=k)


def test_eval_batch_is_fixed_centre_crops():
  config = make_config()
  batch = make_eval_batch(config, n=3, seed=0)
  assert set(batch) == {"image", "tokenizer_image", "mask"}
  assert batch["image"].shape == (3, 32, 32, 3) and batch["mask"].shape == (3, 16)
  other = make_eval_batch(config, n=3, seed=1)
  np.testing.assert_array_equal(other["image"], batch["image"])  # only masks use the seed
  np.testing.assert_array_equal(other["tokenizer_image"], batch["tokenizer_image"])
  assert not np.array_equal(other["mask"], batch["mask"])
  # Photo 0 is the square astronaut: its centre crop is the whole picture, unflipped.
  whole = tf.image.resize(skimage.data.astronaut()[None] / 255.0, [16, 16], "area").numpy()[0]
  # Lanczos is sharper than area averaging: 0.025 apart; mirrored they are 0.28 apart.
  assert np.abs(batch["tokenizer_image"][0] - whole).mean() < 0.04
  assert np.abs(batch["tokenizer_image"][0] - whole[:, ::-1]).mean() > 0.2


# --------------------------------------------------------------------------- image folder

# Sorted listing order = example ids.
HALVES, SOLID_ID, CMYK_ID, GRAY_ID, PHOTO_ID, GARBAGE_ID, TRUNCATED_ID = range(7)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt, **kwargs)
  return buf.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """5 decodable 24x24 images (RGB/gray PNG, RGB/CMYK JPEG), a truncated and a garbage file."""
  root = tmp_path_factory.mktemp("folder")
  for sub in ("a", "b", "bad"):
    (root / sub).mkdir()
  halves = np.zeros((24, 24, 3), np.uint8)
  halves[:, 12:] = 255
  photo = Image.fromarray(skimage.data.chelsea())
  files = {
    "a/halves.png": _encode(Image.fromarray(halves), "PNG"),
    "a/solid.png": _encode(Image.new("RGB", (24, 24), SOLID), "PNG"),
    "b/cmyk.jpg": _encode(Image.new("RGB", (24, 24), CMYK_RGB).convert("CMYK"), "JPEG", quality=95),
    "b/gray.png": _encode(
      Image.fromarray(np.tile(np.linspace(0, 255, 24).astype(np.uint8), (24, 1)), "L"), "PNG"
    ),
    "b/photo.jpg": _encode(photo.resize((24, 24)), "JPEG"),
    "bad/garbage.png": np.random.RandomState(0).bytes(600),
    "bad/truncated.jpg": _encode(photo, "JPEG")[:6000],
    "notes.txt": b"not an image",
  }
  for name, data in files.items():
    (root / name).write_bytes(data)
  return str(root)


def folder_config(root, **overrides):
  """The whole 24x24 image as the crop, no jitter: pixel values are predictable."""
  return make_config(
    f"folder:{root}",
    **{
      "batch_size": 7,
      "crop_scale": (1.0, 1.0),
      "crop_ratio": (1.0, 1.0),
      "color_jitter": 0.0,
      **overrides,
    },
  )


def bright_side(images: np.ndarray) -> np.ndarray:
  """+1 where the right half is brighter, -1 where the left is: [B, S, S, 3] -> [B]."""
  half = images.shape[2] // 2
  right, left = images[:, :, half:], images[:, :, :half]
  return np.sign(right.mean(axis=(1, 2, 3)) - left.mean(axis=(1, 2, 3)))


def test_list_image_folder(image_folder):
  paths, labels, classes = sources.list_image_folder(image_folder)
  assert [p[len(image_folder) + 1 :] for p in paths] == [
    "a/halves.png",
    "a/solid.png",
    "b/cmyk.jpg",
    "b/gray.png",
    "b/photo.jpg",
    "bad/garbage.png",
    "bad/truncated.jpg",
  ]
  assert classes == ("a", "b", "bad") and labels == (0, 0, 1, 1, 1, 2, 2)


def test_folder_decodes_formats_and_skips_bad_files(image_folder):
  it = make_pretrain_iterator(folder_config(image_folder), seed=0)
  batches, ids = run(it, 6)
  # Every step's batch is the whole folder: the 2 bad files are skipped, their slots refilled.
  assert it.skipped_counts()["undecodable"] == 2 * 6
  sides = []
  for batch, batch_ids in zip(batches, ids):
    assert set(batch_ids) == {HALVES, SOLID_ID, CMYK_ID, GRAY_ID, PHOTO_ID}
    view1, view2 = unnormalize(batch["image"]), batch["tokenizer_image"]
    for k, i in enumerate(batch_ids):
      if i == SOLID_ID:  # exact normalisation with ImageNet mean/std
        np.testing.assert_allclose(
          batch["image"][k],
          np.broadcast_to((np.asarray(SOLID) / 255 - MEAN) / STD, (32, 32, 3)),
          atol=1e-4,
        )
        np.testing.assert_allclose(
          view2[k], np.broadcast_to(np.asarray(SOLID) / 255, (16, 16, 3)), atol=1e-4
        )
      elif i == CMYK_ID:
        np.testing.assert_allclose(
          view2[k].mean(axis=(0, 1)), np.asarray(CMYK_RGB) / 255, atol=4 / 255
        )
      elif i == GRAY_ID:
        for view in (view1[k], view2[k]):
          np.testing.assert_allclose(view[..., 0], view[..., 1], atol=1e-5)
          np.testing.assert_allclose(view[..., 0], view[..., 2], atol=1e-5)
      elif i == HALVES:
        side = bright_side(view1[k : k + 1])[0]
        assert bright_side(view2[k : k + 1])[0] == side
        sides.append(side)
  assert set(sides) == {-1.0, 1.0}  # flipped sometimes, both views together


def test_tokenizer_iterator_without_flip(image_folder):
  config = folder_config(image_folder, flip=False)
  batches, ids = run(
    pretrain.make_tokenizer_iterator(config, dalle_views(config)["tokenizer_image"], seed=0), 2
  )
  for batch, batch_ids in zip(batches, ids):
    assert set(batch) == {"image"}
    assert batch["image"].shape == (7, 16, 16, 3) and batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    halves = batch["image"][batch_ids == HALVES]
    assert len(halves) >= 1 and np.all(bright_side(halves) == 1)


def test_folder_of_undecodable_files_fails_clearly(tmp_path):
  for k in range(2):
    (tmp_path / f"bad{k}.jpg").write_bytes(b"\xff\xd8\xff garbage" * k)
  config = make_config(f"folder:{tmp_path}", batch_size=2)
  with pytest.raises(ConfigError, match="could be decoded"):
    next(make_pretrain_iterator(config, seed=0))
  with pytest.raises(ConfigError, match="decodable"):
    make_eval_batch(config, n=1)


# --------------------------------------------------------------------------- TFDS


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """23 JPEGs of 20-42 x 30 pixels in 3 files; the builder is not registered, so the pipeline
  reads the dataset back from its files only, like a user's prepared data."""
  with tfds.core.registered.skip_registration():

    class BeitTestTinyImages(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")
      # Not in a package: tfds looks up the code of builders in packages with
      # importlib_resources, which this environment lacks.
      __module__ = TFDS_NAME

      def _info(self):
        return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict(
            {
              "image": tfds.features.Image(encoding_format="jpeg"),
              "label": tfds.features.ClassLabel(num_classes=3),
            }
          ),
        )

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

      def _generate_examples(self):
        rng = np.random.RandomState(0)
        for i in range(TFDS_SIZE):
          image = rng.randint(0, 256, (20 + i, 30, 3), dtype=np.uint8)
          yield i, {"image": image, "label": i % 3}

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  BeitTestTinyImages(data_dir=data_dir).download_and_prepare(
    download_config=tfds.download.DownloadConfig(num_shards=3)
  )
  return data_dir


@pytest.fixture(scope="module")
def tfds_config(tfds_dir):
  return make_config(f"tfds:{TFDS_NAME}", data_dir=tfds_dir)


def test_tfds_processes_read_disjoint_halves_and_resume(tfds_config):
  """2 processes x 2 examples: each reads its half (11 of 23), 10 of them per 5-step epoch."""
  assert pretrain.num_train_examples(tfds_config) == TFDS_SIZE
  runs = [
    run(make_pretrain_iterator(tfds_config, seed=0, process_index=p, process_count=2), 7)
    for p in (0, 1)
  ]
  batch = runs[0][0][0]
  assert batch["image"].shape == (2, 32, 32, 3) and batch["mask"].shape == (2, 16)
  assert batch["tokenizer_image"].shape == (2, 16, 16, 3)
  for p, (_, ids) in enumerate(runs):
    epoch0, epoch1 = np.concatenate(ids[:5]), np.concatenate(ids[5:])
    assert len(set(epoch0)) == 10 and set(epoch0) <= set(range(11 * p, 11 * p + 11))
    assert len(set(epoch1)) == 4 and set(epoch1) <= set(range(11 * p, 11 * p + 11))
    assert not np.array_equal(epoch0[:4], epoch1)
  # Resume: skips 6 records of epoch 0 before decoding, then crosses into epoch 1.
  batches, ids = runs[1]
  resumed, resumed_ids = run(
    make_pretrain_iterator(tfds_config, seed=0, start_step=3, process_index=1, process_count=2), 3
  )
  assert_same_batches(resumed, batches[3:6])
  np.testing.assert_array_equal(resumed_ids, ids[3:6])


def test_tfds_missing_dataset_names_it_and_data_dir(tmp_path):
  with pytest.raises(ConfigError, match=f"{TFDS_NAME}.*{tmp_path}"):
    pretrain.num_train_examples(make_config(f"tfds:{TFDS_NAME}", data_dir=str(tmp_path)))
  with pytest.raises(ConfigError) as err:
    make_pretrain_iterator(make_config("tfds:imagenet2012", data_dir=str(tmp_path)), seed=0)
  message = str(err.value)
  assert "imagenet2012" in message and "\n" not in message
  assert f"{tmp_path}/downloads/manual" in message
  assert f"tfds build imagenet2012 --data_dir={tmp_path}" in message


# --------------------------------------------------------------------------- pieces and config


def test_random_crop_window_follows_torchvision():
  @tf.function
  def windows(shape, scale):
    seeds = tf.stack([tf.range(300, dtype=tf.int64), tf.zeros(300, tf.int64)], axis=1)
    return tf.map_fn(
      lambda s: ops.random_crop_window(shape, s, scale, (3 / 4, 4 / 3)),
      seeds,
      fn_output_signature=tf.int32,
    )

  top, left, h, w = windows(tf.constant([300, 400]), (0.08, 1.0)).numpy().T
  assert np.all((top >= 0) & (left >= 0) & (top + h <= 300) & (left + w <= 400))
  area = h * w / (300 * 400)
  assert area.min() >= 0.07 and area.max() <= 1.0 and area.min() < 0.15 and area.max() > 0.8
  assert np.all((w / h > 3 / 4 - 0.05) & (w / h < 4 / 3 + 0.05))
  assert len(set(zip(top, left))) > 250
  # No crop of >= 90% of a 10x1000 strip has an aspect ratio <= 4/3: the centred fallback.
  fallback = windows(tf.constant([10, 1000]), (0.9, 1.0)).numpy()
  np.testing.assert_array_equal(fallback, np.tile([0, 493, 10, 13], (300, 1)))


def _torchvision_color_ops(image: np.ndarray, order, factors) -> np.ndarray:
  """torchvision's functional adjust_{brightness,contrast,saturation} on float images."""

  def gray(x):
    return (x * np.asarray([0.2989, 0.587, 0.114])).sum(-1, keepdims=True)

  def blend(x, other, f):
    return np.clip(f * x + (1 - f) * other, 0, 1)

  ops = (
    lambda x, f: blend(x, 0.0, f),
    lambda x, f: blend(x, gray(x).mean(), f),
    lambda x, f: blend(x, gray(x), f),
  )
  for op in order:
    image = ops[op](image, factors[op])
  return image


@pytest.mark.parametrize(
  "order", [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
)
def test_color_ops_match_torchvision(order):
  image = np.random.RandomState(0).rand(6, 7, 3).astype(np.float32)
  factors = np.asarray([1.35, 0.7, 1.3], np.float32)  # bright enough to clip
  got = ops.color_ops(tf.constant(image), tf.constant(order), tf.constant(factors)).numpy()
  np.testing.assert_allclose(got, _torchvision_color_ops(image, order, factors), atol=1e-5)


def test_color_jitter_ranges():
  gray = tf.fill([8, 8, 3], 0.5)
  colour = tf.constant(np.random.RandomState(0).rand(8, 8, 3), tf.float32)
  for s in range(5):
    seed = tf.constant([s, 7], tf.int64)
    out = ops.color_jitter(gray, 0.4, seed).numpy()
    assert np.ptp(out) < 1e-6 and 0.3 - 1e-6 <= out[0, 0, 0] <= 0.7 + 1e-6  # brightness only
    jittered = ops.color_jitter(colour, 0.4, seed).numpy()
    assert 0 <= jittered.min() and jittered.max() <= 1
    assert np.abs(jittered - colour.numpy()).mean() > 1e-3
    np.testing.assert_allclose(ops.color_jitter(colour, 0.0, seed), colour, atol=1e-6)


@pytest.mark.parametrize(
  "overrides, process_count, field",
  [
    ({"batch_size": 6}, 4, "input.batch_size"),
    ({"embedded_epoch_size": 3}, 1, "input.batch_size"),
    ({"image_size": 30}, 1, "input.image_size"),
    ({"dataset": "imagenet"}, 1, "input.dataset"),
    ({"dataset": "folder:/nonexistent/beit"}, 1, "input.dataset"),
    ({"crop_scale": (0.5, 0.2)}, 1, "input.crop_scale"),
    ({"color_jitter": -0.1}, 1, "input.color_jitter"),
    ({"flip": 1}, 1, "input.flip"),
    ({"dataset": "embedded:digits", "split": "test"}, 1, "input.split"),
    ({"dataset": "embedded:digits", "split": "train[9999:]"}, 1, "input.split"),
  ],
)
def test_bad_config_names_the_field(overrides, process_count, field):
  """At start-up (`trainers.validate_config`, the field rules of a MIM run; the pipeline does
  not check them again) or where the pipeline meets the data and the processes."""
  config = tiny_config()
  with config.input.ignore_type():
    config.input.update(overrides)
  with pytest.raises(ConfigError, match=field):
    trainers.validate_config(config)
    make_pretrain_iterator(make_config(**overrides), seed=0, process_count=process_count)
