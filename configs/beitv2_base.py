r"""BEiT v2 ViT-B/16 pretraining on ImageNet-1K, unilm beit2's recipe (docs/reference.md §4).

  python -m beit_jax.main --config=configs/beitv2_base.py:epochs=1600 \
      --workdir=gs://BUCKET/beitv2_base --config.tokenizer.init_from=/ckpt/vqkd_clip \
      --config.input.data_dir=gs://BUCKET/tensorflow_datasets

Targets: the codes of a trained VQ-KD tokenizer (`tokenizer.kind="vqkd"`), given with
`--config.tokenizer.init_from` (a `trainer="vqkd"` workdir, or unilm's
`vqkd_encoder_base_decoder_3x768x12_clip` converted with `python -m beit_jax.convert
--from=unilm`). Without it, stage 1 first runs `tokenizer.recipe` (the whole config of
configs/vqkd_clip_base.py, reading the same `input.data_dir`), which needs its teacher
(`--config.tokenizer.recipe.tokenizer.teacher.init_from`).

unilm PRETRAINING.md: shared relative position bias, LayerScale 0.1, blockwise masking of
exactly 75 patches, random resized crop scale 0.2-1 with the tokenizer's view at 224
(bicubic, [-1, 1]), patch aggregation of the [CLS] of the last block with the patch outputs
of block 9 (`--early_layers 9 --head_layers 2 --shared_lm_head True`), batch 2048, lr 1.5e-3,
10 warmup epochs, clipping 3.0. Arg `epochs`: 300 (AdamW b2 0.98, no drop path) or 1600
(b2 0.999, drop path 0.1).
"""

from configs import common
from configs import vqkd_clip_base

RECIPES = {300: dict(b2=0.98, drop_path_rate=0.0), 1600: dict(b2=0.999, drop_path_rate=0.1)}


def v2_config(variant: str, epochs: int, layer: int):
  """The v2 recipe on top of the v1 one (`common.pretrain_config`)."""
  if epochs not in RECIPES:
    raise ValueError(f"config arg epochs={epochs} is not accepted; use one of {sorted(RECIPES)}")
  c = common.pretrain_config(variant)
  c.num_epochs = epochs
  c.optim.b2 = RECIPES[epochs]["b2"]
  c.model.drop_path_rate = RECIPES[epochs]["drop_path_rate"]
  c.model.update(dict(use_abs_pos_emb=False, use_shared_rel_pos_bias=True, layer_scale_init=0.1))
  c.model.patch_aggregation = dict(layer=layer, depth=2)
  common.set_tokenizer(c, vqkd_clip_base.vqkd_config("clip", 512))
  c.input.update(dict(tokenizer_image_size=224, crop_scale=(0.2, 1.0)))
  c.input.mask.exact = True  # exactly 75 of 196 patches
  return c


def get_config(arg=None):
  arg = common.parse_arg(arg, epochs=1600)
  return v2_config("B/16", arg.epochs, layer=9)
