r"""BEiT-L/16 v1 pretraining on ImageNet-1K (unilm's large settings; docs/reference.md §1, 4).

Shared relative position bias, LayerScale init 1e-5, drop path 0.1; otherwise the
base recipe. Parameters and optimizer state are sharded over an `fsdp` mesh axis and
blocks are rematerialised, so the 2048 batch fits on a v4/v5 pod slice.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, variant="L/16", fsdp=8, tensor=1)
  c = common.pretrain_config(arg.variant)
  c.model.layer_scale_init = 1e-5
  c.model.remat = True
  c.mesh = common.mesh_config(fsdp=arg.fsdp, tensor=arg.tensor)
  return c
