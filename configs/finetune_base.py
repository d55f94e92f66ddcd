r"""BEiT-B/16 fine-tuning on ImageNet-1K, unilm's recipe (docs/reference.md §5).

  python -m beit_jax.main --config=configs/finetune_base.py --workdir=gs://BUCKET/ft_base \
      --config.init_from=gs://BUCKET/beit_base \
      --config.input.data_dir=gs://BUCKET/tensorflow_datasets

100 epochs at batch 1024, AdamW lr 4e-3 with layer-wise decay 0.65, 20 warmup epochs and
cosine to 1e-6, weight decay 0.05, drop path 0.1, Mixup 0.8 / CutMix 1.0 with label
smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25; classifier
fc_norm(mean of the patch outputs) with the head initialised x0.001; evaluation resizes to
256 (bicubic) and centre-crops 224. `init_from` is any beit-jax ViT checkpoint (a
pretraining workdir, or weights imported with `python -m beit_jax.convert`).

Position information must match the checkpoint, as `configs/beit_base.py` (whose args this
takes): by default absolute position embeddings and no LayerScale; `rel=True` for
relative position bias (the checkpoint's shared table is copied into every block) and
LayerScale. `image_size=384` fine-tunes at 384 (position parameters are resized; unilm then
evaluates without the centre crop).
"""

import ml_collections

from configs import common


def finetune_config(
  variant: str = "B/16", rel: bool = False, image_size: int = 224
) -> ml_collections.ConfigDict:
  """The ImageNet-1K fine-tuning recipe of unilm's BEiT-B (docs/reference.md §5)."""
  patch = int(variant.split("/")[1])
  c = ml_collections.ConfigDict()
  c.trainer = "finetune"
  c.seed = 0
  # A beit-jax ViT checkpoint (pretraining workdir, converter output, or a step folder).
  c.init_from = ""
  c.num_epochs = 100
  c.total_steps = 0  # > 0 overrides num_epochs
  c.log_every_steps = 100
  c.eval_every_steps = 1251  # one ImageNet epoch at batch 1024, as unilm
  c.max_bad_steps = 20
  c.label_smoothing = 0.1
  # timm Mixup(mode='batch'): CutMix or Mixup (half the time each) on every batch.
  c.mixup = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)
  c.model = common.model_config(
    variant,
    layer_scale_init=0.1 if rel else 0.0,
    use_abs_pos_emb=not rel,
    use_shared_rel_pos_bias=False,
    use_rel_pos_bias=rel,
    head_init_scale=0.001,
  )
  c.input = dict(
    dataset="tfds:imagenet2012",
    split="train",
    eval_dataset="",
    eval_split="validation",
    data_dir=common.unset(str),
    batch_size=1024,
    eval_batch_size=1024,
    image_size=image_size,
    patch_size=patch,
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    flip=True,
    color_jitter=0.4,  # unused while RandAugment is on (as timm)
    randaugment="rand-m9-mstd0.5-inc1",
    random_erase=0.25,
    eval_crop_pct=224 / 256 if image_size < 384 else 1.0,
    shuffle_buffer=50_000,
  )
  c.optim = dict(
    lr=4e-3,
    min_lr=1e-6,
    warmup_epochs=20,
    warmup_steps=0,
    layer_decay=0.65,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.05,
    grad_clip=0.0,
    accum_steps=1,
  )
  c.mesh = common.mesh_config()
  c.sharding = common.sharding_config()
  c.checkpoint = dict(every_steps=5000, keep=2)
  return c


def get_config(arg=None):
  arg = common.parse_arg(arg, variant="B/16", rel=False, image_size=224)
  return finetune_config(arg.variant, arg.rel, arg.image_size)
