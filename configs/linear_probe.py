r"""Linear probing of a frozen BEiT (docs/reference.md §5), as unilm's run_linear_eval.py.

  python -m beit_jax.main --config=configs/linear_probe.py --workdir=gs://BUCKET/probe_base \
      --config.init_from=gs://BUCKET/beit_base \
      --config.input.data_dir=gs://BUCKET/tensorflow_datasets

One linear classifier per block, trained together on [CLS] and mean-pooled patch tokens
(concatenated) of each frozen block output, AdamW lr 4e-3, weight decay 1e-4, batch 1024,
100 epochs, cosine to 0, RandomResizedCrop + flip; top-1 is the best block's. The model
fields must match the checkpoint as in `configs/beit_base.py` (args `variant`, `rel`).

`local=True` probes the model of `configs/beit_tiny_local.py` on scikit-learn's digits (300
steps; with `configs/finetune_tiny_local.py`, about 3 minutes on 2 CPU cores,
docs/finetuning.md):

  python -m beit_jax.main --config=configs/linear_probe.py:local=True \
      --workdir=/tmp/probe_tiny --config.init_from=/tmp/beit_tiny
"""

from configs import common
from configs import finetune_base


def get_config(arg=None):
  arg = common.parse_arg(arg, variant="B/16", rel=False, local=False)
  c = finetune_base.finetune_config(arg.variant, rel=arg.rel)
  c.trainer = "linear_probe"
  c.probe = dict(layers=(), pool="cls+mean", norm="none")  # layers (): every block
  # The backbone keeps the pretraining layout: no need to copy tables per block.
  c.model.update(dict(use_shared_rel_pos_bias=arg.rel, use_rel_pos_bias=False, drop_path_rate=0.0))
  c.input.update(dict(randaugment="", random_erase=0.0, color_jitter=0.0))
  del c.mixup, c.label_smoothing  # fine-tuning's batch mixing and targets: a probe has neither
  c.optim.update(dict(lr=4e-3, min_lr=0.0, warmup_epochs=0, layer_decay=1.0, weight_decay=1e-4))
  if arg.local:
    c.total_steps = 300
    c.log_every_steps = 50
    c.eval_every_steps = 100
    c.probe.layers = (0, 1, 2, 3)
    c.model.update(
      dict(
        variant="Ti/8",
        width=128,
        depth=4,
        num_heads=4,
        mlp_dim=512,
        layer_scale_init=0.1,
        use_abs_pos_emb=False,
        use_shared_rel_pos_bias=True,
        dtype="float32",
      )
    )
    c.input.update(
      dict(
        dataset="embedded:digits",
        batch_size=64,
        eval_batch_size=128,
        image_size=32,
        patch_size=8,
        crop_scale=(0.5, 1.0),
        flip=False,
        eval_crop_pct=1.0,
        shuffle_buffer=1000,
      )
    )
    c.optim.update(dict(lr=4e-3, warmup_steps=0))
    c.checkpoint = dict(every_steps=100, keep=2)
  return c
