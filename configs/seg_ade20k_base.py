r"""BEiT-B/16 + UperNet semantic segmentation on ADE20K, unilm's recipe (docs/reference.md §6).

  python -m beit_jax.main --config=configs/seg_ade20k_base.py --workdir=gs://BUCKET/seg_base \
      --config.init_from=gs://BUCKET/beit_base \
      --config.input.dataset=folder:/data/ADEChallengeData2016

unilm's `upernet_beit_base_12_512_slide_160k_ade20k_pt2ft.py`: 512x512 crops (32x32 patch
grid: the checkpoint's relative position tables are resized to it, a shared one copied into
every block), features of blocks 3, 5, 7, 11, UperNet with 768 channels and an auxiliary FCN
head (256 channels, loss weight 0.4), drop path 0.1, LayerScale; AdamW lr 3e-5, weight decay
0.05, layer decay 0.9, poly schedule (power 1) after 1500 linear warmup steps, 160k steps at
batch 16; training crops from images resized to (2048, 512) x 0.5..2.0, flips and
photometric distortion. Validation: whole images resized to (2048, 512), sliding 512-px
windows every 341 px; `ms=True` adds unilm's multi-scale + flip test (ratios 0.5..1.75).

Data: ADE20K's SceneParsing release, ADEChallengeData2016, unpacked (images/ and
annotations/, each with training/ and validation/: the 20210 training and 2000 validation
images of the 150-class benchmark) at `input.dataset=folder:PATH` (the default PATH is
/data/ADEChallengeData2016; gs:// works), label 0 ("other") ignored and the classes shifted
down (`reduce_zero_label`). TFDS is accepted too (`--config.input.dataset=tfds:scene_parse150
--config.input.split=train --config.input.eval_split=test`) but is not the default: TFDS
4.9.10 builds its `annotation` from the Places Challenge 2017 instance masks
(`annotations_instance.tar`), whose red channel is one of the instance task's 100
categories, not one of the 150 SceneParsing classes the benchmark scores.
"""

import ml_collections

from configs import common


def segmentation_config(
  variant: str = "B/16", image_size: int = 512, ms: bool = False
) -> ml_collections.ConfigDict:
  """unilm's ADE20K UperNet recipe for BEiT-B (docs/reference.md §6)."""
  patch = int(variant.split("/")[1])
  c = ml_collections.ConfigDict()
  c.trainer = "segmentation"
  c.seed = 0
  # A beit-jax ViT checkpoint (pretraining workdir, converter output, or a step folder).
  c.init_from = ""
  c.total_steps = 160_000
  c.log_every_steps = 50
  c.eval_every_steps = 16_000  # mmseg's evaluation interval
  c.max_bad_steps = 20
  c.model = common.model_config(variant, use_shared_rel_pos_bias=False, use_rel_pos_bias=True)
  # The pyramid of blocks `out_indices` and the heads; GroupNorm where mmseg has SyncBN.
  c.upernet = dict(
    out_indices=(3, 5, 7, 11),
    channels=768,
    aux_channels=256,
    pool_scales=(1, 2, 3, 6),
    dropout=0.1,
    aux_weight=0.4,
    norm_groups=32,
  )
  c.input = dict(
    dataset="folder:/data/ADEChallengeData2016",
    split="training",
    eval_dataset="",
    eval_split="validation",
    data_dir=common.unset(str),
    num_classes=150,
    reduce_zero_label=True,
    batch_size=16,
    image_size=image_size,
    patch_size=patch,
    scale=(2048, 512),
    ratio_range=(0.5, 2.0),
    cat_max_ratio=0.75,
    flip=True,
    photometric=True,
    shuffle_buffer=2000,
    # Validation: windows per device batch, their step, the test scales and flips.
    eval_batch_size=8,
    eval_stride=341,
    eval_scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75) if ms else (1.0,),
    eval_flip=ms,
  )
  c.optim = dict(
    lr=3e-5,
    min_lr=0.0,
    warmup_steps=1500,
    power=1.0,
    layer_decay=0.9,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.05,
    grad_clip=0.0,
    accum_steps=1,
  )
  c.mesh = common.mesh_config()
  c.sharding = common.sharding_config()
  c.checkpoint = dict(every_steps=16_000, keep=2)
  return c


def get_config(arg=None):
  arg = common.parse_arg(arg, variant="B/16", image_size=512, ms=False)
  return segmentation_config(arg.variant, arg.image_size, arg.ms)
