r"""Segmentation of digits pasted onto photos, on a CPU: about 10 minutes on 2 cores.

  python -m beit_jax.main --config=configs/seg_tiny_local.py --workdir=/tmp/seg_tiny \
      --config.init_from=/tmp/beit_tiny

The model of `configs/beit_tiny_local.py` (4 blocks of width 128, 8x8 patches: its 64-px
pretraining checkpoint fits the 64-px crops as it is, its shared relative position bias
copied into every block) with a 64-channel UperNet on the outputs of its 4 blocks, trained on
`embedded:digits` (800 images of 96x96, 11 classes: background and the 10 digits; 120
validation images with other digits and other parts of the photos). Without `init_from` it
trains from a random initialisation. The recipe is the ADE20K one (`seg_ade20k_base.py`),
scaled down: training images resized to 96 px x 0.5..1.5 (not 2.0: a 64-px crop of a digit
enlarged twice shows a piece of stroke) and cropped to 64; no flips (a mirrored digit is
another symbol); validation on whole 96-px images with 64-px windows every 43 px (2x2
windows, the base recipe's 341/512 overlap); lr 4e-3 for 1000 steps (at 1e-3 and 600 steps
the model still predicted background everywhere). What it reaches: docs/segmentation.md.
"""

from configs import common
from configs import seg_ade20k_base


def get_config(arg=None):
  arg = common.parse_arg(arg, steps=1000, batch=16)
  c = seg_ade20k_base.segmentation_config("Ti/8", image_size=64)
  c.total_steps = arg.steps
  c.log_every_steps = 50
  c.eval_every_steps = 250
  c.model.update(dict(width=128, depth=4, num_heads=4, mlp_dim=512, dtype="float32"))
  c.upernet.update(dict(out_indices=(0, 1, 2, 3), channels=64, aux_channels=64))
  c.input.update(
    dict(
      dataset="embedded:digits",
      split="train",
      eval_split="validation",
      num_classes=11,
      reduce_zero_label=False,
      batch_size=arg.batch,
      scale=(384, 96),
      ratio_range=(0.5, 1.5),
      flip=False,
      shuffle_buffer=1000,
      eval_batch_size=8,
      eval_stride=43,
    )
  )
  c.optim.update(dict(lr=4e-3, warmup_steps=arg.steps // 10, layer_decay=0.75))
  c.checkpoint = dict(every_steps=250, keep=2)
  return c
