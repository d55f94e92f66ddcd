r"""Fine-tuning on scikit-learn's handwritten digits, on a CPU.

  python -m beit_jax.main --config=configs/finetune_tiny_local.py --workdir=/tmp/ft_tiny \
      --config.init_from=/tmp/beit_tiny

The model of `configs/beit_tiny_local.py` (4 blocks of width 128, 8x8 patches, shared
relative position bias copied into every block), fine-tuned on 32x32 digits (1433 training,
364 validation images, 10 classes): the pretraining run's 64x64 position tables are resized
to the 4x4 grid. Without `init_from` it trains from scratch. The recipe is the base one,
shortened and made gentler for 32-pixel digits: milder crops, lighter Mixup, no CutMix, no
flips (a mirrored digit is another symbol) and no RandAugment (its 45% translations push a
digit off a 32-pixel image: from scratch, 500 steps reach 85% validation top-1 with
rand-m5-mstd0.5-inc1, 92% without). This run and the local linear probe
(`configs/linear_probe.py:local=True`) take about 3 minutes together on 2 CPU cores
(docs/finetuning.md).
"""

from configs import common
from configs import finetune_base


def get_config(arg=None):
  arg = common.parse_arg(arg, steps=500, batch=64)
  c = finetune_base.finetune_config("Ti/8", rel=True, image_size=32)
  c.total_steps = arg.steps
  c.log_every_steps = 50
  c.eval_every_steps = 250
  c.model.update(dict(width=128, depth=4, num_heads=4, mlp_dim=512, dtype="float32"))
  c.input.update(
    dict(
      dataset="embedded:digits",
      batch_size=arg.batch,
      eval_batch_size=128,
      crop_scale=(0.8, 1.0),
      flip=False,
      randaugment="",
      eval_crop_pct=1.0,
      shuffle_buffer=1000,
    )
  )
  c.mixup.update(dict(mixup_alpha=0.2, cutmix_alpha=0.0))
  c.optim.update(dict(lr=2e-3, warmup_steps=arg.steps // 10, layer_decay=0.75))
  c.checkpoint = dict(every_steps=250, keep=2)
  return c
