r"""BEiT v2 stage 1: the VQ-KD tokenizer against CLIP ViT-B/16 on ImageNet-1K (unilm's recipe).

  python -m beit_jax.main --config=configs/vqkd_clip_base.py --workdir=gs://BUCKET/vqkd_clip \
      --config.tokenizer.teacher.init_from=/ckpt/clip-vit-base-patch16 \
      --config.input.data_dir=gs://BUCKET/tensorflow_datasets

unilm `vqkd_encoder_base_decoder_3x768x12_clip` (docs/reference.md §3): ViT-B/16 encoder,
8192 x 32 codebook, 3-block decoder to CLIP's 512-d patch features; batch 512, lr 2e-4
(5e-5 x 512/128), AdamW (0.9, 0.99), weight decay 1e-4 (none on cls/pos/codebook), 100
epochs, 10 warmup, cosine to 1e-5, no clipping; random resized crop 224 (scale 0.08-1,
bicubic) + flip, no colour jitter. The teacher (`tokenizer.teacher.init_from`): a HF
`CLIPModel` / `CLIPVisionModelWithProjection` folder or OpenAI's `ViT-B-16.pt`.
A MIM run then uses it with `--config.tokenizer.init_from=<this workdir>`.
"""

import ml_collections
from ml_collections import config_dict

from configs import common


def vqkd_tokenizer(
  *,
  teacher: str = "clip",
  vocab_size: int = 8192,
  code_dim: int = 32,
  teacher_dim: int = 512,
  patch_size: int = 16,
  width: int = 768,
  depth: int = 12,
  num_heads: int = 12,
  decoder_depth: int = 3,
) -> ml_collections.ConfigDict:
  """`config.tokenizer` of a VQ-KD run: the tokenizer's sizes (unilm's) and its teacher."""
  return ml_collections.ConfigDict(
    dict(
      kind="vqkd",
      vocab_size=vocab_size,
      code_dim=code_dim,
      teacher_dim=teacher_dim,
      patch_size=patch_size,
      beta=1.0,
      encoder=dict(width=width, depth=depth, num_heads=num_heads, mlp_dim=4 * width),
      decoder=dict(width=width, depth=decoder_depth, num_heads=num_heads, mlp_dim=4 * width),
      # clip | dino | vit (a beit-jax ViT checkpoint; `block`: its block's output, None:
      # the final tokens) | random (tests). `num_heads`: for weights that do not say.
      # (placeholders: None, overridable with an int from the command line)
      teacher=dict(
        kind=teacher,
        init_from="",
        block=config_dict.placeholder(int),
        num_heads=config_dict.placeholder(int),
      ),
    )
  )


def vqkd_config(teacher: str = "clip", teacher_dim: int = 512) -> ml_collections.ConfigDict:
  """The VQ-KD's training run (`trainer='vqkd'`), unilm's recipe; as BEiT v2's stage 1 it is
  a MIM config's `tokenizer.recipe` (`common.set_tokenizer`)."""
  c = ml_collections.ConfigDict()
  c.trainer = "vqkd"
  c.seed = 0
  c.num_epochs = 100
  c.total_steps = 0  # > 0 overrides num_epochs
  c.log_every_steps = 100
  c.max_bad_steps = 20
  c.images_every_steps = 5000
  # The codebook: EMA decay, k-means iterations of its initialisation on the first batch.
  c.ema_decay = 0.99
  c.kmeans_iters = 10
  # Off in the paper's recipe: restart codes whose EMA count per step falls below
  # dead_threshold from the current batch's encoder outputs.
  c.restart_dead_codes = False
  c.dead_threshold = 1.0
  c.tokenizer = vqkd_tokenizer(teacher=teacher, teacher_dim=teacher_dim)
  c.input = common.pretrain_input(
    batch_size=512, tokenizer_image_size=224, patch_size=16, color_jitter=0.0
  )
  c.optim = dict(
    lr=2e-4,
    min_lr=1e-5,
    warmup_epochs=10,
    warmup_steps=0,
    b1=0.9,
    b2=0.99,
    eps=1e-8,
    weight_decay=1e-4,
    grad_clip=0.0,
    accum_steps=1,
  )
  c.mesh = common.mesh_config()
  c.sharding = common.sharding_config()
  c.checkpoint = dict(every_steps=5000, keep=3)
  return c


def get_config(arg=None):
  common.parse_arg(arg)
  return vqkd_config("clip", 512)
