r"""BEiT v2 stage 1: the VQ-KD tokenizer against DINO ViT-B/16 (768-d targets), unilm's recipe.

  python -m beit_jax.main --config=configs/vqkd_dino_base.py --workdir=gs://BUCKET/vqkd_dino \
      --config.tokenizer.teacher.init_from=/ckpt/dino_vitbase16_pretrain.pth

As `configs/vqkd_clip_base.py` (unilm `vqkd_encoder_base_decoder_3x768x12_dino`) with a
DINO teacher: a HF `ViTModel` folder (facebook/dino-vitb16) or DINO's own `.pth`; the
teacher sees the crop ImageNet-normalised.
"""

from configs import common
from configs import vqkd_clip_base


def get_config(arg=None):
  common.parse_arg(arg)
  return vqkd_clip_base.vqkd_config("dino", 768)
