r"""BEiT v2 pretraining on the photos bundled with scikit-image/scikit-learn, on a CPU.

  python -m beit_jax.main --config=configs/beitv2_tiny_local.py --workdir=/tmp/beitv2_tiny

runs the three stages, each resumable, in about 10 minutes on 2 CPU cores (about 4, 1 and
5 minutes; docs/beit_v2.md): the teacher (a ViT
trained with the photos' labels, `<workdir>/tokenizer/teacher`), the VQ-KD tokenizer
against it (`<workdir>/tokenizer`), then v2 pretraining (`<workdir>`).
`--config.tokenizer.init_from=<a VQ-KD workdir>` skips the first two,
`--config.tokenizer.recipe.tokenizer.teacher.init_from=<a ViT checkpoint>` the first: the
VQ-KD's run is `tokenizer.recipe`, the whole config of `configs/vqkd_tiny_local.py`.

The model of `configs/beit_tiny_local.py` (4 blocks of width 128, 8x8 patches on 64x64
crops) predicting the codes of the tiny VQ-KD of `configs/vqkd_tiny_local.py` (256 codes,
its 64-px [-1, 1] view), with v2's exact blockwise masks (26 of 64 patches) and patch
aggregation of the last [CLS] with the patch outputs of block 3 through a 2-block decoder.
"""

from configs import beit_tiny_local
from configs import common
from configs import vqkd_tiny_local


def get_config(arg=None):
  arg = common.parse_arg(arg, steps=600, batch=32, layer=3)
  c = beit_tiny_local.get_config(f"steps={arg.steps},batch={arg.batch}")
  common.set_tokenizer(c, vqkd_tiny_local.get_config(f"batch={arg.batch}"))
  c.model.patch_aggregation = dict(layer=arg.layer, depth=2)
  c.input.update(dict(crop_scale=(0.2, 1.0)))
  c.input.mask.exact = True
  return c
