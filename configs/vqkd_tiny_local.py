r"""A small VQ-KD tokenizer on the photos bundled with scikit-image/scikit-learn, on a CPU.

  python -m beit_jax.main --config=configs/vqkd_tiny_local.py --workdir=/tmp/vqkd_tiny

The teacher is a beit-jax ViT, its final patch tokens the targets. Without
`--config.tokenizer.teacher.init_from` (a ViT checkpoint: 64 px, patch 8, width 128) it is
trained first, in `<workdir>/teacher`, by `tokenizer.teacher.recipe`: the model of
`configs/finetune_tiny_local.py` fine-tuned from scratch with the labels of
`embedded:photos` at 64 px (about 4 minutes; the digits' labels, which the local
evaluations use, are never seen). `:teacher=random` uses a random 1-block ViT instead.
A 2-block encoder, 1-block decoder and 256 x 16 codebook on 64x64 crops (8x8 tokens of
8x8 px); about a minute on 2 CPU cores (docs/beit_v2.md). As the first stage of
`configs/beitv2_tiny_local.py` it is that config's `tokenizer.recipe`. Arg: steps, batch,
teacher (vit | random), teacher_dim (the teacher's width), codes.
"""

from configs import common
from configs import finetune_tiny_local
from configs import vqkd_clip_base


def teacher_recipe(batch: int = 64):
  """The teacher's run: a ViT of width 128 trained with labels on the 20 photo classes."""
  c = finetune_tiny_local.get_config(f"batch={batch}")
  c.input.update(dict(dataset="embedded:photos", image_size=64))
  return c


def get_config(arg=None):
  arg = common.parse_arg(arg, steps=300, batch=32, teacher="vit", teacher_dim=128, codes=256)
  c = vqkd_clip_base.vqkd_config(arg.teacher, arg.teacher_dim)
  c.total_steps = arg.steps
  c.log_every_steps = 25
  c.images_every_steps = arg.steps
  c.input.update(
    dict(
      dataset="embedded",
      batch_size=arg.batch,
      tokenizer_image_size=64,
      patch_size=8,
      shuffle_buffer=1000,
    )
  )
  c.tokenizer = vqkd_clip_base.vqkd_tokenizer(
    teacher=arg.teacher,
    vocab_size=arg.codes,
    code_dim=16,
    teacher_dim=arg.teacher_dim,
    patch_size=8,
    width=64,
    depth=2,
    num_heads=4,
    decoder_depth=1,
  )
  if arg.teacher == "vit":
    c.tokenizer.teacher.recipe = teacher_recipe()
  c.optim.update(dict(lr=1e-3, min_lr=1e-5, warmup_steps=arg.steps // 10))
  c.checkpoint = dict(every_steps=max(arg.steps // 3, 1), keep=2)
  return c
