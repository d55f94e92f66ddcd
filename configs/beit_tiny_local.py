r"""Both BEiT stages on the photos that ship with scikit-image/scikit-learn, on a CPU.

  python -m beit_jax.main --config=configs/beit_tiny_local.py --workdir=/tmp/beit_tiny

Stage 1 trains a small dVAE (512 codes) on 64x64 crops, stage 2 a 4-block ViT with
8x8 patches against its tokens, with 26 of 64 patches masked blockwise (the paper's
40%). About 7 minutes on 2 CPU cores (the README's first command line; what it ends at:
README.md, "Quickstart"); the point is to see every piece work, not accuracy. Stage 1 is
`tokenizer.recipe`, a whole dVAE run (`tokenizer_recipe`): e.g.
`--config.tokenizer.recipe.total_steps=500` (or the arg `tokenizer_steps=500`). Args: steps,
tokenizer_steps, batch.
"""

from configs import common


def tokenizer_recipe(steps: int = 300, batch: int = 32):
  """Stage 1's run: the dVAE (512 codes) on the same photos at 64 px, `steps` steps."""
  r = common.dvae_config(vocab_size=512, n_hid=16, n_blk_per_group=1, n_init=32)
  r.update(
    dict(
      total_steps=steps,
      log_every_steps=50,
      images_every_steps=steps,
      temperature_anneal_steps=steps,
      kl_warmup_steps=steps // 4,
    )
  )
  r.input.update(
    dict(dataset="embedded", batch_size=batch, tokenizer_image_size=64, shuffle_buffer=1000)
  )
  r.optim.update(dict(lr=2e-3, warmup_steps=steps // 10))
  r.checkpoint = dict(every_steps=steps, keep=1)
  return r


def get_config(arg=None):
  arg = common.parse_arg(arg, steps=600, tokenizer_steps=300, batch=32)
  c = common.pretrain_config("Ti/8")
  c.total_steps = arg.steps
  c.log_every_steps = 50
  c.images_every_steps = 300
  c.model.update(dict(width=128, depth=4, num_heads=4, mlp_dim=512, dtype="float32"))
  c.input.update(
    dict(
      dataset="embedded",
      batch_size=arg.batch,
      image_size=64,
      tokenizer_image_size=64,
      shuffle_buffer=1000,
    )
  )
  c.input.mask.update(dict(num_masking_patches=26, min_num_patches=4))
  c.optim.update(dict(warmup_steps=arg.steps // 10, lr=1.5e-3))
  c.checkpoint = dict(every_steps=200, keep=2)

  common.set_tokenizer(c, tokenizer_recipe(arg.tokenizer_steps, arg.batch))
  return c
