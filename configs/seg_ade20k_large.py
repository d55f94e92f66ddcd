r"""BEiT-L/16 + UperNet on ADE20K, unilm's large recipe (docs/reference.md §6).

  python -m beit_jax.main --config=configs/seg_ade20k_large.py --workdir=gs://BUCKET/seg_large \
      --config.init_from=gs://BUCKET/beit_large \
      --config.input.dataset=folder:gs://BUCKET/ADEChallengeData2016

unilm's `upernet_beit_large_24_512_slide_160k_ade20k_pt2ft.py`: as the base recipe
(`configs/seg_ade20k_base.py`) with the features of blocks 7, 11, 15, 23, UperNet with 1024
channels, drop path 0.2, LayerScale initialised at 1e-6, lr 2e-5 and layer decay 0.95.
Data as the base recipe: ADEChallengeData2016 unpacked at `input.dataset=folder:PATH`
(default /data/ADEChallengeData2016). Blocks are rematerialised. Args: `variant`,
`image_size`, `ms` (multi-scale + flip test) as the base config, and `fsdp` / `tensor`
(mesh axes, default 1: plain data parallelism); `:fsdp=8` shards parameters and optimizer
state over groups of 8 devices, as in pretraining.
"""

from configs import common
from configs import seg_ade20k_base


def get_config(arg=None):
  arg = common.parse_arg(arg, variant="L/16", image_size=512, ms=False, fsdp=1, tensor=1)
  c = seg_ade20k_base.segmentation_config(arg.variant, arg.image_size, arg.ms)
  c.model.update(dict(drop_path_rate=0.2, layer_scale_init=1e-6, remat=True))
  c.upernet.update(dict(out_indices=(7, 11, 15, 23), channels=1024))
  c.optim.update(dict(lr=2e-5, layer_decay=0.95))
  c.mesh = common.mesh_config(fsdp=arg.fsdp, tensor=arg.tensor)
  return c
