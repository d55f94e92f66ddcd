r"""BEiT-L/16 fine-tuning on ImageNet-1K (unilm's large settings, docs/reference.md §5).

  python -m beit_jax.main --config=configs/finetune_large.py --workdir=gs://BUCKET/ft_large \
      --config.init_from=gs://BUCKET/beit_large \
      --config.input.data_dir=gs://BUCKET/tensorflow_datasets

unilm's command for its self-supervised (not intermediate fine-tuned) BEiT-L checkpoint, in
beit/get_started_for_image_classification.md: 50 epochs, 5 warmup, lr 1e-3,
layer decay 0.75, drop path 0.2, batch 1024 (64 x 2 accumulation x 8 GPUs: here
`optim.accum_steps=2`, each step two micro-batches of 512 summed before one update); the
rest as the base recipe. The 0.9 / 2e-5 / 30-epoch command there is for checkpoints already
fine-tuned on ImageNet-22k, not for pretrained ones. Position information as
`configs/beit_large.py`: shared relative position bias (copied into every block) and
LayerScale. Blocks are rematerialised and parameters sharded over `fsdp`, as in pretraining.
"""

from configs import common
from configs import finetune_base


def get_config(arg=None):
  arg = common.parse_arg(arg, variant="L/16", image_size=224, fsdp=8, tensor=1)
  c = finetune_base.finetune_config(arg.variant, rel=True, image_size=arg.image_size)
  c.num_epochs = 50
  c.model.update(dict(drop_path_rate=0.2, layer_scale_init=1e-5, remat=True))
  c.optim.update(dict(lr=1e-3, warmup_epochs=5, layer_decay=0.75, accum_steps=2))
  c.mesh = common.mesh_config(fsdp=arg.fsdp, tensor=arg.tensor)
  return c
