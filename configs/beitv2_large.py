r"""BEiT v2 ViT-L/16 pretraining on ImageNet-1K, unilm beit2's recipe (docs/reference.md §1, 4).

configs/beitv2_base.py with ViT-L/16: LayerScale init 1e-5, patch aggregation of block 21
(`--early_layers 21 --head_layers 2`), the same VQ-KD tokenizer (ViT-B/16 encoder);
parameters and optimizer state sharded over an `fsdp` mesh axis, blocks rematerialised.
Args `epochs=300|1600` as for the base config, `fsdp` (default 8) and `tensor` (default 1).
"""

from configs import beitv2_base
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, epochs=1600, fsdp=8, tensor=1)
  c = beitv2_base.v2_config("L/16", arg.epochs, layer=21)
  c.model.layer_scale_init = 1e-5
  c.model.remat = True
  c.mesh = common.mesh_config(fsdp=arg.fsdp, tensor=arg.tensor)
  return c
