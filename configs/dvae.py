r"""Stage 1 alone: train the DALL-E-architecture dVAE tokenizer on ImageNet-1K.

A MIM run can then start from it with `--config.tokenizer.init_from=<this workdir>`; a v1
MIM config without it runs this recipe first, as its `tokenizer.recipe`
(`configs/beit_base.py`). Arg `runlocal=True` makes it small enough for a laptop CPU on the
embedded photos.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
  if not arg.runlocal:
    return common.dvae_config()
  c = common.dvae_config(vocab_size=512, n_hid=16, n_blk_per_group=1, n_init=32)
  c.update(
    dict(
      total_steps=200,
      log_every_steps=20,
      images_every_steps=100,
      temperature_anneal_steps=200,
      kl_warmup_steps=50,
    )
  )
  c.input.update(dict(dataset="embedded", batch_size=32, tokenizer_image_size=64))
  c.optim.update(dict(lr=2e-3, warmup_steps=20))
  c.checkpoint = dict(every_steps=100, keep=2)
  return c
