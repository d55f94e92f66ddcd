r"""BEiT-L/16 v1 pretraining on ImageNet-1K (unilm's large settings; docs/reference.md §1, 4).

Shared relative position bias, LayerScale init 1e-5, drop path 0.1; otherwise the
base recipe. Parameters and optimizer state are sharded over an `fsdp` mesh axis and
blocks are rematerialised, so that the 2048 batch fits a pod slice: compiled by the plan
tool, it fits a v5e-64 slice, and a v4-32 one with `model.scan_layers` (docs/scaling.md).
Args: `variant`, `fsdp` (default 8), `tensor` (default 1).
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, variant="L/16", fsdp=8, tensor=1)
  c = common.pretrain_config(arg.variant)
  c.model.layer_scale_init = 1e-5
  c.model.remat = True
  c.mesh = common.mesh_config(fsdp=arg.fsdp, tensor=arg.tensor)
  return c
