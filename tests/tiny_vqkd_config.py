"""A seconds-sized version of configs/vqkd_tiny_local.py for tests (and `--config=` runs)."""

from configs import vqkd_tiny_local

SIZE, PATCH, GRID, CODES, CODE_DIM, TEACHER_DIM = 32, 8, 4, 32, 8, 16


def tiny_vqkd_config(**fields):
  """configs/vqkd_tiny_local.py, seconds-sized: 32 px, 4x4 tokens, random teacher; `fields`
  set top-level fields (e.g. total_steps, restart_dead_codes)."""
  c = vqkd_tiny_local.get_config(
    f"steps=6,batch=8,teacher=random,teacher_dim={TEACHER_DIM},codes={CODES}"
  )
  c.input.update(dict(tokenizer_image_size=SIZE, embedded_epoch_size=64, shuffle_buffer=64))
  c.tokenizer.update(dict(code_dim=CODE_DIM))
  c.tokenizer.encoder.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
  c.tokenizer.decoder.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
  c.update(dict(log_every_steps=2, images_every_steps=100, **fields))
  c.checkpoint = dict(every_steps=3, keep=3)
  return c


def get_config(arg=None):
  """So the CLI can run it: `--config=tests/tiny_vqkd_config.py`."""
  del arg
  return tiny_vqkd_config()
