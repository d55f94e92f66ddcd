"""One test per start-up validation rule: the error names the field and what it accepts."""

import pytest

from beit_jax import trainers
from beit_jax.training import validate
from beit_jax.errors import ConfigError
from tests.tiny_config import tiny_config, tiny_finetune_config

BAD_VALUES = {
  "trainer": "classify",
  "seed": 1.5,
  "num_epochs": 0,
  "total_steps": -1,
  "log_every_steps": 0,
  "images_every_steps": 0,
  "max_bad_steps": 0,
  "model.variant": "X/16",
  "model.width": 0,
  "model.depth": -2,
  "model.num_heads": 0,
  "model.mlp_dim": 0,
  "model.drop_path_rate": 1.0,
  "model.layer_scale_init": -0.1,
  "model.dtype": "float64",
  "input.dataset": "imagenet",
  "input.batch_size": 0,
  "input.image_size": 0,
  "input.tokenizer_image_size": 0,
  "input.crop_scale": (0.9, 0.1),
  "input.crop_ratio": (2.0, 1.0),
  "input.color_jitter": -0.4,
  "input.shuffle_buffer": 0,
  "optim.lr": 0.0,
  "optim.min_lr": -1e-5,
  "optim.warmup_epochs": -1,
  "optim.warmup_steps": -1,
  "optim.b1": 1.0,
  "optim.b2": 1.5,
  "optim.eps": -1.0,
  "optim.weight_decay": -0.05,
  "optim.grad_clip": -3.0,
  "optim.accum_steps": 0,
  "checkpoint.every_steps": 0,
  "checkpoint.keep": 0,
  "tokenizer.kind": "vqgan",
  "tokenizer.vocab_size": 1,
  "tokenizer.n_hid": 10,
  "tokenizer.recipe": "configs/dvae.py",
  # The dVAE's run (configs/dvae.py).
  "kl_weight": -1.0,
  "temperature_end": 0.0,
  "temperature_anneal_steps": -1,
  "kl_warmup_steps": 2.5,
  # Fine-tuning and linear probing (tiny_finetune_config).
  "eval_every_steps": 0,
  "label_smoothing": 1.0,
  "mixup.mixup_alpha": -0.8,
  "mixup.cutmix_alpha": -1.0,
  "mixup.prob": 1.5,
  "mixup.switch_prob": -0.5,
  "probe.layers": (1.5,),
  "probe.pool": "max",
  "probe.norm": "batchnorm",
  "model.head_init_scale": 0.0,
  "input.eval_dataset": "imagenet",
  "model.remat": "yes",
  "model.remat_policy": "everything",
  "model.scan_layers": 1,
  "input.eval_split": "",
  "input.eval_batch_size": -8,
  "input.randaugment": "rand-m11",
  "input.random_erase": 1.25,
  "input.eval_crop_pct": 0.0,
  "optim.layer_decay": 1.5,
  # Checked by the input pipeline itself before, now declared with it.
  "input.flip": 1,
  "input.patch_size": 0,
  "input.embedded_epoch_size": 0,
  # BEiT v2 patch aggregation (trainers/mim.py; its fields are checked by CHECKS).
  "model.patch_aggregation": 9,
  # The VQ-KD tokenizer and its trainer (configs/vqkd_tiny_local.py).
  "tokenizer.code_dim": 0,
  "tokenizer.teacher_dim": -512,
  "tokenizer.patch_size": 0,
  "tokenizer.beta": -1.0,
  "tokenizer.encoder.width": 0,
  "tokenizer.encoder.depth": 0,
  "tokenizer.encoder.num_heads": 0,
  "tokenizer.encoder.mlp_dim": 1.5,
  "tokenizer.decoder.width": -1,
  "tokenizer.decoder.depth": 0,
  "tokenizer.decoder.num_heads": 0,
  "tokenizer.decoder.mlp_dim": 0,
  "tokenizer.teacher.kind": "siglip",
  "tokenizer.teacher.init_from": None,
  "tokenizer.teacher.block": "last",
  "tokenizer.teacher.num_heads": 0,
  "tokenizer.teacher.recipe": "configs/finetune_tiny_local.py",
  "mim_target": "features",
  "ema_decay": 1.0,
  "kmeans_iters": -1,
  "restart_dead_codes": "yes",
  "dead_threshold": 0.0,
  # The mesh and the weights' sharding (training/sharding.py), every trainer's.
  "mesh.slice": 0,
  "mesh.data": -2,
  "mesh.fsdp": 1.5,
  "mesh.tensor": "2",
  "sharding.rules": (("embed", "model"),),
  "sharding.min_size": -1,
  "sharding.replicate": ("lm_head(",),
}


def test_every_rule_has_a_bad_value_here():
  assert sorted(f for f, _, _ in trainers.rules()) == sorted(BAD_VALUES)


def test_the_shipped_configs_pass():
  from configs import beit_base, beit_large, beit_tiny_local, dvae  # pylint: disable=g-import-not-at-top
  from configs import finetune_base, finetune_large, finetune_tiny_local, linear_probe  # pylint: disable=g-import-not-at-top

  for module in (
    beit_base,
    beit_large,
    beit_tiny_local,
    dvae,
    finetune_base,
    finetune_large,
    finetune_tiny_local,
    linear_probe,
  ):
    trainers.validate_config(module.get_config())
  trainers.validate_config(linear_probe.get_config("local=True"))
  trainers.validate_config(tiny_config())
  trainers.validate_config(tiny_finetune_config())
  from configs import beitv2_base, beitv2_large  # pylint: disable=g-import-not-at-top

  for module, arg in (
    (beitv2_base, "epochs=300"),
    (beitv2_base, "epochs=1600"),
    (beitv2_large, None),
  ):
    trainers.validate_config(module.get_config(arg))
  trainers.validate_config(dvae.get_config("runlocal=True"))
  # A MIM config's stage 1 is a whole config of its own, its tokenizer the MIM run's.
  from beit_jax import tokenizers  # pylint: disable=g-import-not-at-top

  for config in (
    beit_base.get_config(),
    beit_tiny_local.get_config(),
    tiny_config(),
    beitv2_base.get_config(),
  ):
    trainers.validate_config(config.tokenizer.recipe)
    tokenizers.check_recipe(config)


def _config_with(field):
  """The tiny MIM config, or the first of the fine-tuning, probe, VQ-KD, dVAE and
  segmentation configs that sets `field` (only a config's own trainer checks it)."""
  from configs import dvae, linear_probe, seg_tiny_local, vqkd_tiny_local  # pylint: disable=g-import-not-at-top

  for make in (
    tiny_config,
    tiny_finetune_config,
    lambda: linear_probe.get_config("local=True"),
    vqkd_tiny_local.get_config,
    dvae.get_config,
    seg_tiny_local.get_config,
  ):
    config = make()
    if validate.get(config, field) is not validate._MISSING:  # pylint: disable=protected-access
      return config
  return tiny_config()  # a field no shipped config sets (model.patch_aggregation): MIM's


@pytest.mark.parametrize("field", sorted(BAD_VALUES))
def test_rule(field):
  config = _config_with(field)
  *parents, key = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[key] = BAD_VALUES[field]
  with pytest.raises(ConfigError, match=rf"^{field}=.* is invalid; accepted: .+"):
    trainers.validate_config(config)


def test_width_must_split_into_heads():
  config = tiny_config()
  config.model.width, config.model.num_heads = 30, 4
  with pytest.raises(ConfigError, match="^model.width=30 must be divisible by model.num_heads=4$"):
    trainers.validate_config(config)
  config.model.width, config.model.num_heads = 100, None  # the variant's heads
  with pytest.raises(
    ConfigError,
    match=r"^model.width=100 must be divisible by the num_heads 3 "
    r"of model.variant='Ti/8'$",
  ):
    trainers.validate_config(config)


def test_image_size_must_be_a_multiple_of_the_patch():
  config = tiny_config()
  config.input.image_size = 36
  with pytest.raises(
    ConfigError, match="input.image_size=36 must be a multiple of input.patch_size=8"
  ):
    trainers.validate_config(config)


# --- the tokenizer view's size, per tokenizer kind (beit_jax/tokenizers/__init__.py)
def test_tokenizer_view_size_is_a_multiple_of_its_kinds_unit():
  config = tiny_config()
  config.input.tokenizer_image_size = 36
  with pytest.raises(
    ConfigError,
    match="^input.tokenizer_image_size=36 must be a multiple of 8 for a dVAE tokenizer$",
  ):
    trainers.validate_config(config)
  from configs import vqkd_tiny_local  # pylint: disable=g-import-not-at-top

  vq = vqkd_tiny_local.get_config("teacher=random")
  vq.input.update(dict(patch_size=14, tokenizer_image_size=28))
  vq.tokenizer.patch_size = 14
  trainers.validate_config(vq)  # 28 is no multiple of 8, and need not be for VQ-KD
  vq.input.tokenizer_image_size = 32
  with pytest.raises(ConfigError, match="multiple of 14 for a VQ-KD tokenizer"):
    trainers.validate_config(vq)


# --------------------------------------------------------------------------- segmentation
# The segmentation trainer's fields (trainers/segmentation.py, segmentation.py,
# data/segmentation.py), each set to a bad value in configs/seg_tiny_local.py.
SEGMENTATION_BAD_VALUES = {
  "input.scale": (512,),
  "input.ratio_range": (2.0, 0.5),
  "input.cat_max_ratio": 0.0,
  "input.photometric": "yes",
  "input.reduce_zero_label": 1,
  "input.num_classes": 255,
  "input.eval_scales": (),
  "input.eval_stride": 0,
  "input.eval_flip": "no",
  "upernet.out_indices": (0, 1, 2),
  "upernet.channels": 0,
  "upernet.aux_channels": -1,
  "upernet.pool_scales": (1, 0),
  "upernet.dropout": 1.0,
  "upernet.aux_weight": -0.4,
  "upernet.norm_groups": 0,
  "optim.power": 0.0,
}
BAD_VALUES.update(SEGMENTATION_BAD_VALUES)


def _segmentation_config():
  from configs import seg_tiny_local  # pylint: disable=g-import-not-at-top

  return seg_tiny_local.get_config()


def test_the_segmentation_configs_pass():
  from configs import seg_ade20k_base, seg_ade20k_large  # pylint: disable=g-import-not-at-top

  for config in (
    seg_ade20k_base.get_config(),
    seg_ade20k_base.get_config("ms=True"),
    seg_ade20k_large.get_config(),
    _segmentation_config(),
  ):
    trainers.validate_config(config)


@pytest.mark.parametrize("field", sorted(SEGMENTATION_BAD_VALUES))
def test_segmentation_rule(field):
  config = _segmentation_config()
  *parents, key = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[key] = SEGMENTATION_BAD_VALUES[field]
  with pytest.raises(ConfigError, match=rf"^{field}=.* is invalid; accepted: .+"):
    trainers.validate_config(config)


@pytest.mark.parametrize(
  "field, value, message",
  [
    (
      "upernet.out_indices",
      (0, 1, 2, 4),
      r"upernet.out_indices=\(0, 1, 2, 4\) must be blocks 0..3",
    ),
    ("upernet.channels", 60, r"upernet.channels=60 must be divisible by upernet.norm_groups=32"),
    ("model.variant", "Ti/14", r"segmentation needs a patch size of 4, 8, 16 or 32"),
    ("total_steps", 0, r"total_steps=0: segmentation runs are counted in steps"),
    ("input.eval_stride", 65, r"input.eval_stride=65 leaves pixels between windows"),
  ],
)
def test_segmentation_checks(field, value, message):
  config = _segmentation_config()
  *parents, key = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[key] = value
  if field == "model.variant":
    config.input.patch_size = 14
    config.input.image_size = 56
  with pytest.raises(ConfigError, match=message):
    trainers.validate_config(config)


# --------------------------------------------------------------------------- per trainer
# `trainers.validate_config` runs the rules of the groups the config's trainer reads (its
# READS and its own), once, at start-up; the pipelines do not check again.


def _shipped_configs():
  """(name, config) of every configs/*.py `get_config()`, and of the whole configs nested in
  them: a MIM config's stage 1 (`tokenizer.recipe`) and a VQ-KD teacher's run."""
  import importlib  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top

  import ml_collections  # pylint: disable=g-import-not-at-top

  root = pathlib.Path(__file__).resolve().parent.parent / "configs"
  for path in sorted(root.glob("*.py")):
    if path.stem in ("__init__", "common", "from_workdir"):  # helpers; a workdir's config
      continue
    module = importlib.import_module(f"configs.{path.stem}")
    for arg in (None, "local=True") if path.stem == "linear_probe" else (None,):
      config = module.get_config(arg)
      yield f"configs/{path.stem}.py:{arg or ''}", config
      for field in (
        "tokenizer.recipe",
        "tokenizer.teacher.recipe",
        "tokenizer.recipe.tokenizer.teacher.recipe",
      ):
        nested = validate.get(config, field)
        if isinstance(nested, ml_collections.ConfigDict):
          yield f"configs/{path.stem}.py:{arg or ''} {field}", nested


def test_each_trainer_checks_every_field_its_configs_set():
  """A field some trainer has a rule for, set in a shipped config, is checked by that
  config's trainer: a trainer that forgets a group it reads in its READS fails here."""
  every = {field for field, _, _ in trainers.rules()}
  unchecked = []
  for name, config in _shipped_configs():
    trainers.validate_config(config)
    own = {field for field, _, _ in trainers.trainer_rules(config.trainer)}
    unchecked += [
      f"{name} (trainer={config.trainer!r}): {field}"
      for field in sorted(every - own)
      if validate.get(config, field) is not validate._MISSING  # pylint: disable=protected-access
    ]
  assert unchecked == []


def test_fields_the_trainer_does_not_read_are_not_checked():
  config = tiny_config()
  config.label_smoothing = 1.0  # fine-tuning's fields: MIM reads neither
  config.mixup = dict(prob=5.0)
  trainers.validate_config(config)
  with pytest.raises(ConfigError, match=r"^label_smoothing=1.0 is invalid; accepted: "):
    trainers.validate_config(tiny_finetune_config(label_smoothing=1.0))


def test_a_config_without_a_known_trainer_is_one_line():
  config = tiny_config()
  del config.trainer
  with pytest.raises(ConfigError, match=r"^trainer is not set; accepted: one of \('mim', "):
    trainers.validate_config(config)


@pytest.mark.parametrize(
  "change, message",
  [
    (
      dict(num_masking_patches=17),
      r"^input\.mask\.num_masking_patches must be an int in \[1, 16\]",
    ),
    (dict(kind="grid"), r"^input\.mask\.kind must be one of \('blockwise', 'random'\)"),
    (dict(num_masked=3), r"^input\.mask: unknown fields \['num_masked'\]"),
  ],
)
def test_a_bad_mask_stops_the_start(change, message):
  """`input.mask` (data/masking.py's MaskSpec, on the ViT's 4x4 patch grid) at start-up."""
  config = tiny_config()
  config.input.mask.update(change)
  with pytest.raises(ConfigError, match=message):
    trainers.validate_config(config)


@pytest.mark.parametrize(
  "mesh, message",
  [
    (dict(data=-1, fsdp=-1), r"^mesh: at most one axis may be -1"),
    (dict(model=2), r"^mesh: unknown axes \['model'\]; accepted: \['slice', 'data', 'fsdp'"),
  ],
)
def test_the_mesh_is_checked_at_start(mesh, message):
  """What needs no device; the device count is checked where the mesh is made."""
  config = tiny_config()
  config.mesh.update(mesh)
  with pytest.raises(ConfigError, match=message):
    trainers.validate_config(config)
