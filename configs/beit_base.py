r"""BEiT-B/16 v1 pretraining on ImageNet-1K, the paper's recipe (docs/reference.md §1-4).

  python -m beit_jax.main --config=configs/beit_base.py --workdir=gs://BUCKET/beit_base \
      --config.input.data_dir=gs://BUCKET/tensorflow_datasets

Position information as in the published ImageNet-1K 800-epoch BEiT-B (unilm flags
`--abs_pos_emb --disable_rel_pos_bias --layer_scale_init_value 0`). Arg `rel=True`
gives unilm README's variant instead: shared relative position bias and LayerScale 0.1.
Needs a tokenizer: `--config.tokenizer.init_from=DIR` (a trained or imported dVAE),
otherwise stage 1 first runs `tokenizer.recipe`, the DALL-E-architecture dVAE of
`configs/dvae.py`, a whole config reading the same `input.data_dir`.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, variant="B/16", rel=False)
  c = common.pretrain_config(arg.variant)
  if not arg.rel:
    c.model.use_abs_pos_emb = True
    c.model.use_shared_rel_pos_bias = False
    c.model.layer_scale_init = 0.0
  return c
