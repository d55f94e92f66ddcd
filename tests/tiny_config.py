"""A seconds-sized version of configs/beit_tiny_local.py for tests."""

from configs import beit_tiny_local


def tiny_config(**input_overrides):
  """The MIM config; its stage 1 (`tokenizer.recipe`) alike: the same sizes and data, and
  `input_overrides` on both (those the recipe's input has)."""
  c = beit_tiny_local.get_config("steps=6,tokenizer_steps=4,batch=8")
  c.log_every_steps = 2
  c.images_every_steps = 100
  c.model.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64))
  c.input.update(
    dict(image_size=32, tokenizer_image_size=32, embedded_epoch_size=64, shuffle_buffer=64)
  )
  c.input.mask.update(dict(num_masking_patches=6, min_num_patches=2))
  c.input.update(input_overrides)
  c.tokenizer.update(dict(vocab_size=64, n_hid=8, n_init=16))
  c.checkpoint = dict(every_steps=3, keep=2)
  r = c.tokenizer.recipe
  r.input.update(dict(tokenizer_image_size=32, embedded_epoch_size=64, shuffle_buffer=64))
  r.input.update({k: v for k, v in input_overrides.items() if k in r.input})
  r.tokenizer.update(dict(vocab_size=64, n_hid=8, n_init=16))
  r.checkpoint = dict(every_steps=4, keep=1)
  return c


def get_config(arg=None):
  """So the CLI can run it: `--config=tests/tiny_config.py`."""
  del arg
  return tiny_config()


def tiny_finetune_config(**overrides):
  """configs/finetune_tiny_local.py with the model of `tiny_config` (its checkpoints fit)."""
  from configs import finetune_tiny_local  # pylint: disable=g-import-not-at-top

  c = finetune_tiny_local.get_config("steps=6,batch=8")
  c.log_every_steps = 2
  c.eval_every_steps = 3
  c.model.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64))
  # RandAugment has its own tests; building its graph would double this config's start-up.
  c.input.update(dict(eval_batch_size=64, shuffle_buffer=64, randaugment=""))
  c.checkpoint = dict(every_steps=3, keep=2)
  c.update(overrides)
  return c
