r"""Stage 1 alone: train the DALL-E-architecture dVAE tokenizer on ImageNet-1K.

A MIM run can then start from it with `--config.tokenizer.init_from=<this workdir>`.
Arg `runlocal=True` makes it small enough for a laptop CPU on the embedded photos.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
  c = common.pretrain_config("B/16")
  c.trainer = "dvae"
  if arg.runlocal:
    c.input.dataset = "embedded"
    c.input.tokenizer_image_size = 64
    c.tokenizer = common.dvae_config(vocab_size=512, n_hid=16, n_blk_per_group=1, n_init=32)
    c.tokenizer.train.update(dict(num_steps=200, batch_size=32, log_every_steps=20,
                                  images_every_steps=100, temperature_anneal_steps=200,
                                  kl_warmup_steps=50))
    c.tokenizer.train.optim.update(dict(lr=2e-3, warmup_steps=20))
    c.tokenizer.train.checkpoint.update(dict(every_steps=100, keep=2))
  return c
