"""What the configs share: `parse_arg`, the BEiT v1 pretraining recipe (docs/reference.md §1-4).

A config file's `get_config(arg)` takes a comma-separated `key=value` string, e.g.
`--config=configs/beit_base.py:variant=L/16,rel=True`.
"""

import ml_collections
from ml_collections import config_dict


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'a=1,b=x' -> ConfigDict, typed like `defaults`; unknown keys are an error."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config arg {key!r} is unknown; accepted: {sorted(defaults)}")
    kind = type(defaults[key])
    out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return out


def unset(kind: type):
  """None until set, and settable from the command line (a plain None field is not)."""
  return config_dict.placeholder(kind)


def mesh_config(fsdp: int = 1, tensor: int = 1, slices: int = 1) -> dict:
  """Device mesh axes (beit_jax/training/sharding.py): slices (TPU slices / GPU nodes, over the
  data-center network), then data (-1: the remaining devices), fsdp, tensor."""
  return dict(slice=slices, data=-1, fsdp=fsdp, tensor=tensor)


def sharding_config() -> dict:
  """How weights and activations map onto the mesh (beit_jax/training/sharding.py).

  rules: logical axis (the models' names of weight and activation dimensions) -> mesh
    axes; for each dimension the first rule whose axes are free and divide it.
  min_size: weights with fewer elements stay whole on every device (biases, norms).
  replicate: regexes of parameter paths kept whole, e.g. ('lm_head',).
  """
  return dict(
    rules=(
      ("batch", ("slice", "data", "fsdp")),
      ("embed", "fsdp"),
      ("heads", "tensor"),
      ("mlp", "tensor"),
      ("vocab", "tensor"),
      ("classes", "tensor"),
    ),
    min_size=2**14,
    replicate=(),
  )


def model_config(variant: str, **fields) -> dict:
  """The ViT's fields (models/vit.py): `variant` and the defaults of BEiT pretraining, with
  `fields` on top. Sizes unset follow the variant.

  remat: recompute each block in the backward pass, keeping what remat_policy names
  (models/vit.py REMAT_POLICIES); scan_layers: the blocks as one nn.scan (compile time
  independent of depth; params stacked, beit_jax/params/blocks.py converts checkpoints).
  """
  return dict(
    dict(
      variant=variant,
      width=unset(int),
      depth=unset(int),
      num_heads=unset(int),
      mlp_dim=unset(int),
      drop_path_rate=0.1,
      layer_scale_init=0.1,
      use_abs_pos_emb=False,
      use_shared_rel_pos_bias=True,
      remat=False,
      remat_policy="nothing_saveable",
      scan_layers=False,
      dtype="bfloat16",
    ),
    **fields,
  )


def mask_config(
  num_masking_patches: int = 75, min_num_patches: int = 16, kind: str = "blockwise"
) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      kind=kind,
      num_masking_patches=num_masking_patches,
      min_num_patches=min_num_patches,
      max_num_patches=unset(int),
      min_aspect=0.3,
      max_aspect=unset(float),
      exact=False,
    )
  )


def pretrain_input(**fields) -> dict:
  """`config.input` of ImageNet-1K's training crops, as pretraining and its tokenizers read
  them (random resized crop, flip, colour jitter); `fields` add or replace."""
  return dict(
    dict(
      dataset="tfds:imagenet2012",
      split="train",
      data_dir=unset(str),
      crop_scale=(0.08, 1.0),
      crop_ratio=(3 / 4, 4 / 3),
      color_jitter=0.4,
      flip=True,
      shuffle_buffer=50_000,
      embedded_epoch_size=10_000,
    ),
    **fields,
  )


def dvae_tokenizer(
  *, vocab_size: int = 8192, n_hid: int = 256, n_blk_per_group: int = 2, n_init: int = 128
) -> ml_collections.ConfigDict:
  """`config.tokenizer` of the DALL-E dVAE (docs/reference.md §3): its kind and sizes."""
  return ml_collections.ConfigDict(
    dict(
      kind="dvae",
      vocab_size=vocab_size,
      n_hid=n_hid,
      n_blk_per_group=n_blk_per_group,
      n_init=n_init,
    )
  )


def dvae_config(**sizes) -> ml_collections.ConfigDict:
  """The dVAE's training run (`trainer='dvae'`), the DALL-E paper's recipe on ImageNet-1K:
  batch 512, 150k steps, AdamW lr 4.5e-4 with 5k warmup steps, the relaxation's temperature
  annealed from 1 to 1/16 and its KL weight raised from 0 to 6.6. `sizes`: `dvae_tokenizer`'s.
  As BEiT v1's stage 1 it is a MIM config's `tokenizer.recipe` (`set_tokenizer`)."""
  c = ml_collections.ConfigDict()
  c.trainer = "dvae"
  c.seed = 0
  c.total_steps = 150_000
  c.log_every_steps = 100
  c.max_bad_steps = 20
  c.images_every_steps = 5000
  c.temperature_start = 1.0
  c.temperature_end = 1 / 16
  c.temperature_anneal_steps = 150_000
  c.kl_weight = 6.6
  c.kl_warmup_steps = 5000
  c.tokenizer = dvae_tokenizer(**sizes)
  c.input = pretrain_input(batch_size=512, tokenizer_image_size=112)
  c.optim = dict(
    lr=4.5e-4,
    min_lr=1.25e-6,
    warmup_epochs=0,
    warmup_steps=5000,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=1e-4,
    grad_clip=0.0,
    accum_steps=1,
  )
  c.mesh = mesh_config()
  c.sharding = sharding_config()
  c.checkpoint = dict(every_steps=5000, keep=3)
  return c


def set_tokenizer(c: ml_collections.ConfigDict, recipe: ml_collections.ConfigDict) -> None:
  """Makes `recipe` (a whole dVAE or VQ-KD run) the MIM config `c`'s stage 1: `c.tokenizer`
  gets its kind and sizes, `init_from` (a trained tokenizer; empty: `recipe` runs first, in
  `<workdir>/tokenizer`) and `recipe` itself.

  The fields both runs must agree on are one field each, linked (ml_collections
  FieldReferences): the tokenizer's sizes (`tokenizer.X` is `tokenizer.recipe.tokenizer.X`),
  `input.tokenizer_image_size` and `input.data_dir`; a command-line override of either
  name sets both. The run still checks they agree (a config edited by hand, or read back
  from a workdir's config.json)."""
  tok = ml_collections.ConfigDict()
  for key in recipe.tokenizer:
    if key != "teacher":  # a VQ-KD's teacher is its recipe's alone
      tok[key] = recipe.tokenizer.get_ref(key)
  # A beit-jax checkpoint (workdir or step folder) of a trained tokenizer, or one converted
  # from unilm / DALL-E. Empty: `recipe` trains one in <workdir>/tokenizer first.
  tok.init_from = ""
  tok.recipe = recipe
  with c.unlocked(), recipe.unlocked():
    c.tokenizer = tok
    if recipe.input.get("data_dir") is None:  # a reference needs a typed field
      del recipe.input["data_dir"]
      recipe.input.data_dir = unset(str)
    for key in ("tokenizer_image_size", "data_dir"):
      if key in c.input:
        del c.input[key]
      c.input[key] = recipe.input.get_ref(key)


def pretrain_config(variant: str = "B/16") -> ml_collections.ConfigDict:
  """BEiT v1 on ImageNet-1K: 800 epochs, batch 2048, lr 1.5e-3 (docs/reference.md §4)."""
  patch = int(variant.split("/")[1])
  c = ml_collections.ConfigDict()
  c.trainer = "mim"
  c.seed = 0
  # A beit-jax checkpoint (e.g. converted from unilm/HF) whose params start the run.
  c.init_from = ""
  c.num_epochs = 800
  c.total_steps = 0  # > 0 overrides num_epochs
  c.log_every_steps = 100
  # Steps with a non-finite loss/gradient are skipped; this many in a row stop the run.
  c.max_bad_steps = 20
  c.images_every_steps = 10_000
  # What MIM predicts: 'tokens' (the tokenizer's codes: BEiT) or 'pixels' (each masked
  # patch's normalised pixels, by MSE: the papers' regression ablation; no tokenizer).
  c.mim_target = "tokens"

  c.model = model_config(variant)
  c.input = pretrain_input(
    batch_size=2048, image_size=224, tokenizer_image_size=112, patch_size=patch, mask=mask_config()
  )
  set_tokenizer(c, dvae_config())
  # accum_steps: micro-batches per step whose gradients are summed before the one update
  # (input.batch_size stays the global batch; docs/scaling.md#gradient-accumulation).
  c.optim = dict(
    lr=1.5e-3,
    min_lr=1e-5,
    warmup_epochs=10,
    warmup_steps=0,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.05,
    grad_clip=3.0,
    accum_steps=1,
  )
  c.mesh = mesh_config()
  c.sharding = sharding_config()
  c.checkpoint = dict(every_steps=5000, keep=3)
  return c
