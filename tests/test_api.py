"""The Python API (beit_jax/api.py, docs/api.md): `train` from Python on the tiny config,
`load` of every kind of checkpoint (a run's workdir, a fine-tuned classifier, unilm BEiT and
VQ-KD `.pth`, a HuggingFace folder, DALL-E's pickles: the foreign ones against randomly
initialised reference models, skipped without torch), each method of `Model` on them,
`make_mask`, and the one-line errors."""

import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import beit_jax
from beit_jax.training import checkpoint
from beit_jax.training import loop
from beit_jax.errors import ConfigError
from beit_jax.models import vit
from tests import runs
from tests.tiny_config import tiny_finetune_config

ATOL = 1e-4


def _photos(n=3, seed=0, size=(40, 52)):
  """uint8 photos of another size than the models' (32 px): the cut and resize matter."""
  return np.random.default_rng(seed).integers(0, 256, (n,) + size + (3,), dtype=np.uint8)


def _one_line(excinfo, *needles):
  text = str(excinfo.value)
  assert "\n" not in text, text
  for needle in needles:
    assert needle in text, text
  return text


# ------------------------------------------------------------------- train + a workdir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 3-step tiny MIM run through `beit_jax.train` with a config file and overrides."""
  tmp = tmp_path_factory.mktemp("api_run")
  tokenizer = runs.random_tokenizer(tmp / "tokenizer")
  workdir = str(tmp / "run")
  metrics = beit_jax.train(
    "tests/tiny_config.py", workdir, overrides={"tokenizer.init_from": tokenizer, "total_steps": 3}
  )
  return workdir, tokenizer, metrics


def test_train_runs_what_the_cli_runs_and_resumes(run):
  workdir, tokenizer, metrics = run
  assert np.isfinite(metrics["loss"]) and "mim_accuracy" in metrics
  saved = json.loads(open(os.path.join(workdir, "config.json")).read())
  assert saved["total_steps"] == 3 and saved["tokenizer"]["init_from"] == tokenizer
  assert max(checkpoint.make_manager(workdir, every_steps=3, keep=2).all_steps()) == 3
  # A finished run returns at once, as the same command line does.
  assert (
    beit_jax.train(
      "tests/tiny_config.py",
      workdir,
      overrides={"tokenizer.init_from": tokenizer, "total_steps": 3},
    )
    == {}
  )


def test_train_checks_before_any_compute(tmp_path):
  config = beit_jax.load_config("tests/tiny_config.py")
  with pytest.raises(ConfigError) as e:
    beit_jax.train(config, tmp_path / "a", overrides={"input.no_such_field": 1})
  _one_line(e, "input.no_such_field is not a field of the config")
  with pytest.raises(ConfigError) as e:
    beit_jax.train(config, tmp_path / "b", overrides={"total_steps": "many"})
  _one_line(e, "total_steps='many'")
  with pytest.raises(ConfigError) as e:  # the validation `python -m beit_jax.main` runs
    beit_jax.train(config, tmp_path / "c", overrides={"input.image_size": 30})
  _one_line(e, "image_size")
  assert not (tmp_path / "c" / "checkpoints").exists()
  assert config.total_steps == 6 and not config.is_locked  # the caller's config is untouched


def test_load_config_reads_a_file_with_its_arg_from_any_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = beit_jax.load_config("configs/beit_tiny_local.py:steps=10,batch=4")
  assert config.total_steps == 10 and config.input.batch_size == 4
  with pytest.raises(FileNotFoundError) as e:
    beit_jax.load_config("configs/no_such.py")
  _one_line(e, "configs/no_such.py does not exist")


def test_the_progress_bar_shows_in_a_notebook_kernel(monkeypatch):
  monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
  monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
  assert loop._bar_class() is None  # pylint: disable=protected-access
  monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
  bar = loop._bar_class()  # pylint: disable=protected-access
  assert bar is not None and bar.__module__.startswith("tqdm")


def test_import_beit_jax_stays_cheap():
  code = (
    "import sys, beit_jax; "
    "print(sorted(m for m in ('jax', 'flax', 'tensorflow') if m in sys.modules)); "
    "print('load' in dir(beit_jax), 'train' in beit_jax.__all__)"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=runs.ROOT, capture_output=True, text=True, timeout=120
  )
  assert out.stdout.split("\n")[:2] == ["[]", "True True"], out.stderr[-2000:]


@pytest.fixture(scope="module")
def mim(run):
  return beit_jax.load(run[0])


def test_a_mim_workdir_loads_with_its_tokenizer(mim, run):
  assert mim.vit is not None and mim.tokenizer is not None
  assert mim.grid == (4, 4) and mim.image_size == 32 and mim.vocab_size == 64
  assert isinstance(mim.config, ml_collections.ConfigDict) and mim.config.trainer == "mim"
  assert mim.view.normalization == "imagenet"
  assert "2 blocks x 32 wide" in repr(mim) and "dVAE with 64 codes" in repr(mim)
  # A step folder of the same run reads the same weights.
  step = beit_jax.load(os.path.join(run[0], "checkpoints", "3"))
  photos = _photos(2)
  np.testing.assert_allclose(
    step.features(photos)["pooled"], mim.features(photos)["pooled"], atol=1e-6
  )


def test_features_batches_single_images_lists_and_dtypes(mim):
  photos = _photos(3)
  out = mim.features(photos)
  assert out["patches"].shape == (3, 16, 32) and out["cls"].shape == (3, 32)
  np.testing.assert_allclose(out["pooled"], out["patches"].mean(1), atol=1e-5)
  # One image, a list, floats in [0, 1]: the same features (3 images ran padded to 4).
  np.testing.assert_allclose(mim.features(photos[1])["cls"][0], out["cls"][1], atol=1e-5)
  np.testing.assert_allclose(mim.features(list(photos))["cls"], out["cls"], atol=1e-6)
  np.testing.assert_allclose(mim.features(photos / 255.0)["cls"], out["cls"], atol=1e-5)
  # What the model sees: the centred square, resized and normalised like the run's view.
  pixels = mim.pixels(photos)
  assert pixels.shape == (3, 32, 32, 3) and 0 <= pixels.min() and pixels.max() <= 1
  direct = mim.vit.apply({"params": mim.params}, jnp.asarray(mim.view.to_model(pixels)))
  np.testing.assert_allclose(out["patches"], direct["tokens"][:, 1:], atol=1e-5)
  # An earlier block: its output before the final norm.
  first = mim.features(photos, block=0)
  hidden = mim.vit.apply(
    {"params": mim.params}, jnp.asarray(mim.view.to_model(pixels)), return_hidden=(0,)
  )["hidden"][0]
  np.testing.assert_allclose(first["cls"], hidden[:, 0], atol=1e-5)
  np.testing.assert_allclose(mim.features(photos, block=-2)["cls"], first["cls"], atol=1e-6)


def test_predict_masked_and_decode_the_prediction(mim):
  photos = _photos(2)
  mask = beit_jax.make_mask(mim.grid, 6, min_num_patches=2, seed=0)
  out = mim.predict_masked(photos, mask)
  assert out["logits"].shape == (2, 16, 64) and out["tokens"].shape == (2, 4, 4)
  assert (out["mask"] == mask).all() and out["tokens"][out["mask"]].shape == (12,)
  inputs = jnp.asarray(mim.view.to_model(mim.pixels(photos)))
  want = mim.vit.apply(
    {"params": mim.params}, inputs, jnp.asarray(mask.reshape(1, 16)).repeat(2, 0)
  )
  np.testing.assert_allclose(out["logits"], want["mim_logits"], atol=ATOL)
  # Per-image masks, flat masks, 0/1 masks: the same thing.
  per_image = np.stack([mask, ~mask])
  both = mim.predict_masked(photos, per_image.reshape(2, 16).astype(int))
  np.testing.assert_allclose(both["logits"][0], out["logits"][0], atol=1e-5)
  assert (both["mask"][1] == ~mask).all()
  # The tokenizer's tokens, the prediction pasted in where masked, both drawn.
  tokens = mim.tokenize(photos)
  assert tokens.shape == (2, 4, 4) and tokens.dtype == np.int32
  assert tokens.max() < 64
  mixed = np.where(out["mask"], out["tokens"], tokens)
  drawn = mim.decode(mixed)
  assert drawn.shape == (2, 32, 32, 3) and 0 <= drawn.min() and drawn.max() <= 1
  np.testing.assert_allclose(mim.decode(mixed[0])[0], drawn[0], atol=1e-6)


def test_attention_per_head_and_of_one_patch(mim):
  photos = _photos(2)
  att = mim.attention(photos, block=-1)
  assert att.shape == (2, 2, 17, 17)
  np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-5)
  one = mim.attention(photos, block=1, head=1, patch=(2, 3))
  assert one.shape == (2, 4, 4)
  np.testing.assert_allclose(one.reshape(2, 16), att[:, 1, 1 + 2 * 4 + 3, 1:], atol=1e-6)
  assert mim.attention(photos, block=0, patch=(0, 0)).shape == (2, 2, 4, 4)


def test_make_mask_is_beits_blockwise_masking(mim):
  mask = beit_jax.make_mask(14, seed=3)
  assert mask.shape == (14, 14) and mask.dtype == bool
  assert 16 <= mask.sum() <= 75 + 16  # BEiT's 75 patches, in blocks of 16 or more
  np.testing.assert_array_equal(mask, beit_jax.make_mask(14, seed=3))
  assert beit_jax.make_mask((3, 5), 6, kind="random", seed=0).sum() == 6
  assert beit_jax.make_mask(8, 26, min_num_patches=4, exact=True, seed=1).sum() == 26
  # A model's masks are its run's: tiny_config masks 6 of 16 patches.
  assert mim.make_mask(seed=0).shape == (4, 4)
  assert mim.make_mask(seed=0, exact=True).sum() == 6
  with pytest.raises(ConfigError) as e:
    beit_jax.make_mask(4, 99)
  _one_line(e, "num_masking_patches")


def test_methods_the_model_lacks_and_bad_inputs_are_one_line_errors(mim):
  with pytest.raises(ValueError) as e:
    mim.classify(_photos(1))
  _one_line(e, "classify", "no classification head")
  for bad, needle in [
    (np.zeros((2, 8, 8)), "shape (2, 8, 8)"),
    (np.full((8, 8, 3), 2.0), "float pixels must be in [0, 1]"),
    (np.zeros((8, 8, 3), np.int64), "dtype int64"),
    ([], "got none"),
  ]:
    with pytest.raises(ValueError) as e:
      mim.features(bad)
    _one_line(e, needle)
  with pytest.raises(ValueError) as e:
    mim.features(_photos(1), block=2)
  _one_line(e, "block=2 must be in -2..1")
  with pytest.raises(ValueError) as e:
    mim.predict_masked(_photos(2), np.zeros((3, 3), bool))
  _one_line(e, "mask has shape (3, 3)")
  with pytest.raises(ValueError) as e:
    mim.attention(_photos(1), patch=(4, 0))
  _one_line(e, "outside the 4x4 patch grid")
  with pytest.raises(ValueError) as e:
    mim.decode(np.full((4, 4), 64))
  _one_line(e, "token ids must be in 0..63")


# ------------------------------------------------------------ a fine-tuned classifier


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
  """A fine-tuning run's checkpoint (random weights) with its config.json."""
  config = tiny_finetune_config()
  config.input.eval_crop_pct = 0.875
  model = vit.from_config(config.model, image_size=config.input.image_size, num_classes=10)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32), shapes)
  path = str(tmp_path_factory.mktemp("finetuned"))
  checkpoint.save_params(path, params, json.loads(config.to_json_best_effort()))
  return path, model, params


def test_a_fine_tuned_workdir_classifies(classifier):
  path, model, params = classifier
  loaded = beit_jax.load(path)
  assert loaded.vit.num_classes == 10 and loaded.crop_pct == 0.875 and loaded.tokenizer is None
  photos = _photos(3)
  out = loaded.classify(photos)
  assert out["logits"].shape == (3, 10) and out["label"].shape == (3,)
  np.testing.assert_allclose(out["probs"].sum(-1), 1.0, atol=1e-5)
  pixels = loaded.pixels(photos)  # the centred 87.5% of the shorter side
  want = model.apply({"params": params}, jnp.asarray(loaded.view.to_model(pixels)))["logits"]
  np.testing.assert_allclose(out["logits"], want, atol=ATOL)
  with pytest.raises(ValueError) as e:
    loaded.predict_masked(photos, np.zeros((4, 4), bool))
  _one_line(e, "no MIM head")
  with pytest.raises(ValueError) as e:
    loaded.tokenize(photos)
  _one_line(e, "no visual tokenizer", "tokenizer=PATH")


def test_paths_that_are_no_model_are_one_line_errors(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    beit_jax.load(tmp_path / "missing")
  _one_line(e, "missing does not exist", "a unilm .pth file")
  (tmp_path / "notes.txt").write_text("hello")
  (tmp_path / "empty").mkdir()
  for path in (tmp_path / "notes.txt", tmp_path / "empty"):
    with pytest.raises(ValueError) as e:
      beit_jax.load(path)
    _one_line(e, f"{path} is not a model beit_jax.load reads", "HuggingFace BEiT folder")
  (tmp_path / "lp").mkdir()
  (tmp_path / "lp" / "checkpoints").mkdir()
  (tmp_path / "lp" / "config.json").write_text(
    json.dumps({"trainer": "linear_probe", "init_from": "/pretrained"})
  )
  with pytest.raises(ValueError) as e:
    beit_jax.load(tmp_path / "lp")
  _one_line(e, "is a linear_probe run", "load its backbone (/pretrained)")


# ---------------------------------------------------------- foreign weights (torch)


@pytest.fixture(scope="module")
def hf_mim(torch, transformers, tmp_path_factory):
  from tests.test_convert import HF_TINY, VOCAB, _hf_model  # pylint: disable=g-import-not-at-top

  assert HF_TINY["image_size"] == 32
  return _hf_model(
    torch,
    transformers,
    tmp_path_factory,
    "BeitForMaskedImageModeling",
    vocab_size=VOCAB,
    use_mask_token=True,
    use_shared_relative_position_bias=True,
    layer_scale_init_value=0.1,
  )


def _reference_input(model, photos):
  return np.asarray(model.view.to_model(model.pixels(photos)), np.float32)


def test_hf_folder_and_unilm_pth_predict_as_the_reference(torch, hf_mim, tmp_path):
  # pylint: disable-next=g-import-not-at-top
  from tests.test_convert import _hf_out, _save_unilm, _unilm_state_dict

  reference, folder = hf_mim
  photos, mask = _photos(2), beit_jax.make_mask(4, 6, min_num_patches=2, seed=0)
  pth = _save_unilm(torch, _unilm_state_dict(folder, False), tmp_path / "beit.pth")
  for source in (folder, pth):
    model = beit_jax.load(source)
    assert model.config.vit.vocab_size == 16 and model.tokenizer is None
    out = model.predict_masked(photos, mask)
    want = _hf_out(
      torch, reference, _reference_input(model, photos), np.stack([mask.reshape(16)] * 2)
    ).logits.numpy()
    np.testing.assert_allclose(out["logits"], want, atol=ATOL)
    assert model.features(photos)["patches"].shape == (2, 16, 32)
  with pytest.raises(ValueError) as e:
    model.decode(np.zeros((4, 4), int))
  _one_line(e, "no visual tokenizer")


def test_hf_classifier_classifies_as_the_reference(torch, transformers, tmp_path_factory):
  from tests.test_convert import CLASSES, _hf_model, _hf_out  # pylint: disable=g-import-not-at-top

  reference, folder = _hf_model(
    torch,
    transformers,
    tmp_path_factory,
    "BeitForImageClassification",
    num_labels=CLASSES,
    use_relative_position_bias=True,
    layer_scale_init_value=0.1,
  )
  model = beit_jax.load(folder)
  photos = _photos(2)
  want = _hf_out(torch, reference, _reference_input(model, photos)).logits.numpy()
  np.testing.assert_allclose(model.classify(photos)["logits"], want, atol=ATOL)


@pytest.fixture()
def dalle_folder(torch, tmp_path, monkeypatch):
  from tests.test_convert import _dalle_reference  # pylint: disable=g-import-not-at-top

  encoder_cls, decoder_cls = _dalle_reference(torch, monkeypatch)
  torch.manual_seed(0)
  encoder, decoder = encoder_cls(8, 1, 16).eval(), decoder_cls(12, 8, 1, 16).eval()
  folder = tmp_path / "dall_e"
  folder.mkdir()
  torch.save(encoder, str(folder / "encoder.pkl"))
  torch.save(decoder, str(folder / "decoder.pkl"))
  return str(folder), encoder


def test_dalle_folder_tokenizes_as_the_reference_and_pairs_with_a_vit(torch, dalle_folder, hf_mim):
  from beit_jax.models import dvae  # pylint: disable=g-import-not-at-top

  folder, encoder = dalle_folder
  tok = beit_jax.load(folder, image_size=32)
  assert tok.vit is None and tok.grid == (4, 4) and tok.tokenizer_view.size == 32
  photos = _photos(2)
  tokens = tok.tokenize(photos)
  with torch.no_grad():
    x = torch.from_numpy(np.asarray(dvae.map_pixels(tok.pixels(photos)))).permute(0, 3, 1, 2)
    want = encoder(x).permute(0, 2, 3, 1).numpy().argmax(-1)
  np.testing.assert_array_equal(tokens, want)
  drawn = tok.decode(tokens)
  assert drawn.shape == (2, 32, 32, 3)
  assert beit_jax.load(os.path.join(folder, "encoder.pkl")).tokenizer_view.size == 112
  with pytest.raises(ValueError) as e:
    tok.features(photos)
  _one_line(e, "holds a dVAE tokenizer, no ViT")
  # A unilm-style ViT with DALL-E's tokenizer: its token grid follows the ViT's patches.
  paired = beit_jax.load(hf_mim[1], tokenizer=folder)
  assert paired.tokenizer_view.size == 32 and paired.tokenize(photos).shape == (2, 4, 4)


def test_unilm_vqkd_pth_tokenizes_as_the_reference(torch, tmp_path):
  from tests import test_convert_v2 as v2  # pylint: disable=g-import-not-at-top

  sd = v2._vqkd_state_dict()  # pylint: disable=protected-access
  path = v2._save(sd, tmp_path / "vqkd.pth")  # pylint: disable=protected-access
  model = beit_jax.load(path, num_heads=v2.HEADS)
  assert model.tokenizer.kind == "vqkd" and model.grid == (v2.GRID, v2.GRID)
  photos = _photos(2)
  inputs = np.asarray(model.tokenizer_view.to_model(model.pixels(photos)), np.float32)
  want, _, _ = v2._torch_vqkd(sd, inputs)  # pylint: disable=protected-access
  np.testing.assert_array_equal(model.tokenize(photos), want)
  with pytest.raises(ValueError) as e:
    model.decode(want)
  _one_line(e, "a VQ-KD tokenizer cannot draw tokens")


def test_bad_foreign_files_are_one_line_errors(torch, tmp_path):
  del torch
  (tmp_path / "broken.pth").write_bytes(b"not a pickle")
  with pytest.raises(ValueError) as e:
    beit_jax.load(tmp_path / "broken.pth")
  _one_line(e, "broken.pth cannot be read as a PyTorch checkpoint")
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  (hf_dir / "config.json").write_text(json.dumps({"model_type": "vit"}))
  (hf_dir / "model.safetensors").write_bytes(b"")
  with pytest.raises(ValueError) as e:
    beit_jax.load(hf_dir)
  _one_line(e, "holds a 'vit' model, not 'beit'")
