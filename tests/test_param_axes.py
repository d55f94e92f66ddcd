"""Each model's weights take the logical axes its own module declares (`PARAM_AXES`), a
scanned ViT's stacked blocks keep their layer axis whole whatever a Block holds, and the
shardings of every model's params are those recorded before the tables moved into the
models (SNAPSHOT, below)."""

import re

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from beit_jax.params import blocks
from beit_jax.training import optim
from beit_jax.training import sharding
from beit_jax.training import train_state
from beit_jax.models import dvae
from beit_jax.models import segmentation
from beit_jax.models import teachers
from beit_jax.models import vit
from beit_jax.models import vqkd
from beit_jax.models.paths import path_str
from configs import common

_VIT = dict(patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64, image_size=32)
_PRETRAIN = dict(
  _VIT, vocab_size=16, layer_scale_init=0.1, use_shared_rel_pos_bias=True, patch_aggregation_layer=1
)
_TEACHER = dict(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, image_size=32)


def _shapes(module, *args, **kwargs):
  return jax.eval_shape(lambda k: module.init(k, *args, **kwargs), jax.random.key(0))


def _models() -> dict:
  """name -> (abstract params of a tiny model, its module's PARAM_AXES)."""
  img, mask = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), bool)
  vq = vqkd.VQKD(
    image_size=32,
    patch_size=8,
    width=32,
    depth=1,
    num_heads=2,
    mlp_dim=64,
    decoder_width=32,
    decoder_depth=1,
    decoder_num_heads=2,
    decoder_mlp_dim=64,
    num_codes=16,
    code_dim=8,
    teacher_dim=16,
  )
  backbone = vit.VisionTransformer(
    **dict(_VIT, patch_size=16, image_size=64, depth=4),
    use_shared_rel_pos_bias=False,
    use_rel_pos_bias=True,
  )
  upernet = segmentation.Segmenter(
    backbone,
    out_indices=(0, 1, 2, 3),
    num_classes=8,
    channels=16,
    aux_channels=8,
    pool_scales=(1, 2),
    norm_groups=4,
  )
  return {
    "vit": (_shapes(vit.VisionTransformer(**_PRETRAIN), img, mask)["params"], vit.PARAM_AXES),
    "vit_scanned": (
      _shapes(vit.VisionTransformer(**_PRETRAIN, scan_layers=True), img, mask)["params"],
      vit.PARAM_AXES,
    ),
    "vit_classifier": (
      _shapes(
        vit.VisionTransformer(
          **_VIT,
          num_classes=8,
          use_abs_pos_emb=True,
          use_shared_rel_pos_bias=False,
          use_rel_pos_bias=True,
        ),
        img,
      )["params"],
      vit.PARAM_AXES,
    ),
    "dvae": (
      _shapes(
        dvae.DiscreteVAE(vocab_size=64, n_hid=16, n_blk_per_group=1, n_init=16),
        img,
        temperature=1.0,
      )["params"],
      dvae.PARAM_AXES,
    ),
    # The trainer's params: both collections, {'params': ..., 'codebook': ...}.
    "vqkd": (dict(_shapes(vq, img, jnp.zeros((1, 16, 16)))), vqkd.PARAM_AXES),
    "dino": (teachers.dino_teacher(**_TEACHER).param_shapes(), teachers.DINO_PARAM_AXES),
    "clip": (
      teachers.clip_teacher(**_TEACHER, proj_dim=16).param_shapes(),
      teachers.CLIP_PARAM_AXES,
    ),
    "upernet": (_shapes(upernet, jnp.zeros((1, 64, 64, 3)))["params"], segmentation.PARAM_AXES),
  }


def _mesh():
  return sharding.make_mesh(dict(fsdp=4, tensor=2))


_CFG = dict(common.sharding_config(), min_size=0)  # every weight sharded, however small
_NUMBERED = re.compile(r"(blocks|cls_pt_layers)_\d+")


def _by_spec(specs: dict[str, P]) -> dict[str, tuple[str, ...]]:
  """{path: spec} -> {'fsdp _ tensor': paths}, numbered blocks as one after checking that
  all blocks agree."""
  one = {}
  for path, spec in specs.items():
    s = " ".join("_" if a is None else a for a in spec)
    assert one.setdefault(_NUMBERED.sub(r"\1_*", path), s) == s, (path, spec)
  out = {}
  for path, s in sorted(one.items()):
    out.setdefault(s, []).append(path)
  return {s: tuple(paths) for s, paths in out.items()}


def test_each_models_shardings_are_the_snapshots():
  mesh = _mesh()
  for name, (params, param_axes) in _models().items():
    shardings = sharding.param_shardings(params, mesh, _CFG, param_axes)
    specs = {path_str(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
    assert _by_spec(specs) == SNAPSHOT[name], name


def test_the_optimizer_state_mirrors_the_params_shardings():
  """Adam's moments (and layer decay's scales, scanned or not) follow the params."""
  optim_cfg = ml_collections.ConfigDict(
    dict(lr=1e-3, min_lr=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, grad_clip=3.0)
  )
  tx, _ = optim.make_optimizer(
    optim_cfg,
    total_steps=10,
    warmup_steps=2,
    lr_scale_fn=lambda p: optim.layer_decay_scales(p, depth=2, decay=0.65),
  )
  models = _models()
  for name in ("vit", "vit_scanned", "upernet"):
    params, param_axes = models[name]
    zeros = lambda rng, p=params: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), p)
    _, shardings = train_state.abstract(zeros, tx, _mesh(), _CFG, param_axes)
    want = {path_str(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(shardings.params)}
    moments = 0
    for p, s in jax.tree_util.tree_leaves_with_path(shardings.opt_state):
      path = path_str(p)
      mirrored = [q for q in want if path.endswith("/" + q)]
      assert s.spec == (want[mirrored[0]] if mirrored else P()), (name, path)
      moments += bool(mirrored)
    assert moments == 2 * len(want), name  # mu and nu


def test_a_new_block_submodule_keeps_its_layer_axis_whole():
  """Stacked is every leaf under a scanned ViT's SCANNED_BLOCKS, not a list of names: a
  weight added to Block is [depth, ...] there and its layer axis stays unsharded."""
  img, mask = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), bool)
  model = vit.VisionTransformer(**dict(_VIT, depth=4), scan_layers=True)
  params = _shapes(model, img, mask)["params"]
  assert vit.SCANNED_BLOCKS in params and "norm1" in params[vit.SCANNED_BLOCKS]
  # What a new Block submodule `adapter` would add: [depth=4, 2, 2], whose largest
  # dimension divisible by fsdp=4 is the layer axis.
  params[vit.SCANNED_BLOCKS]["adapter"] = {"kernel": jax.ShapeDtypeStruct((4, 2, 2), jnp.float32)}
  shardings = sharding.param_shardings(params, _mesh(), _CFG, vit.PARAM_AXES)
  assert shardings[vit.SCANNED_BLOCKS]["adapter"]["kernel"].spec == P(None)
  # Outside a scanned ViT the same leaf is sharded by size: over its first dimension.
  alone = {"w": params[vit.SCANNED_BLOCKS]["adapter"]["kernel"]}
  assert sharding.param_shardings(alone, _mesh(), _CFG, ())["w"].spec == P("fsdp", None, None)
  scales = optim.layer_decay_scales(params, depth=4, decay=0.5)
  assert scales[vit.SCANNED_BLOCKS]["adapter"]["kernel"].shape == (4, 1, 1)  # one per layer
  # The dVAE's `blocks/group_*` are not a ViT's blocks: nothing of it is stacked.
  dvae_params, _ = _models()["dvae"]
  assert blocks.layout(dvae_params) is None
  assert not any(jax.tree.leaves(blocks.stacked_mask(dvae_params)))


# The shardings (fsdp=4, tensor=2, min_size=0) of the tiny models above, as computed at commit
# 7b20e5f, when `vit.PARAM_AXES` was applied to every model and a regex of Block's
# submodules found the stacked leaves. Per model: spec ('_' for None, '' for P()) -> paths.
SNAPSHOT = {
  "vit": {
    "_ _ _ fsdp": ("patch_embed/kernel",),
    "_ _ fsdp": ("cls_token", "mask_token"),
    "fsdp": (
      "blocks_*/attn/proj/bias",
      "blocks_*/gamma_1",
      "blocks_*/gamma_2",
      "blocks_*/mlp/fc2/bias",
      "blocks_*/norm1/bias",
      "blocks_*/norm1/scale",
      "blocks_*/norm2/bias",
      "blocks_*/norm2/scale",
      "cls_pt_layers_*/attn/proj/bias",
      "cls_pt_layers_*/gamma_1",
      "cls_pt_layers_*/gamma_2",
      "cls_pt_layers_*/mlp/fc2/bias",
      "cls_pt_layers_*/norm1/bias",
      "cls_pt_layers_*/norm1/scale",
      "cls_pt_layers_*/norm2/bias",
      "cls_pt_layers_*/norm2/scale",
      "norm/bias",
      "norm/scale",
      "patch_embed/bias",
    ),
    "fsdp _": ("rel_pos_bias/relative_position_bias_table",),
    "fsdp _ tensor": ("blocks_*/attn/qkv/kernel", "cls_pt_layers_*/attn/qkv/kernel"),
    "fsdp tensor": ("blocks_*/mlp/fc1/kernel", "cls_pt_layers_*/mlp/fc1/kernel", "lm_head/kernel"),
    "tensor": (
      "blocks_*/attn/q_bias",
      "blocks_*/attn/v_bias",
      "blocks_*/mlp/fc1/bias",
      "cls_pt_layers_*/attn/q_bias",
      "cls_pt_layers_*/attn/v_bias",
      "cls_pt_layers_*/mlp/fc1/bias",
      "lm_head/bias",
    ),
    "tensor fsdp": (
      "blocks_*/attn/proj/kernel",
      "blocks_*/mlp/fc2/kernel",
      "cls_pt_layers_*/attn/proj/kernel",
      "cls_pt_layers_*/mlp/fc2/kernel",
    ),
  },
  "vit_scanned": {
    "_ _ _ fsdp": ("patch_embed/kernel",),
    "_ _ fsdp": ("cls_token", "mask_token"),
    "_ fsdp": (
      "blocks/attn/proj/bias",
      "blocks/gamma_1",
      "blocks/gamma_2",
      "blocks/mlp/fc2/bias",
      "blocks/norm1/bias",
      "blocks/norm1/scale",
      "blocks/norm2/bias",
      "blocks/norm2/scale",
    ),
    "_ fsdp _ tensor": ("blocks/attn/qkv/kernel",),
    "_ fsdp tensor": ("blocks/mlp/fc1/kernel",),
    "_ tensor": ("blocks/attn/q_bias", "blocks/attn/v_bias", "blocks/mlp/fc1/bias"),
    "_ tensor fsdp": ("blocks/attn/proj/kernel", "blocks/mlp/fc2/kernel"),
    "fsdp": (
      "cls_pt_layers_*/attn/proj/bias",
      "cls_pt_layers_*/gamma_1",
      "cls_pt_layers_*/gamma_2",
      "cls_pt_layers_*/mlp/fc2/bias",
      "cls_pt_layers_*/norm1/bias",
      "cls_pt_layers_*/norm1/scale",
      "cls_pt_layers_*/norm2/bias",
      "cls_pt_layers_*/norm2/scale",
      "norm/bias",
      "norm/scale",
      "patch_embed/bias",
    ),
    "fsdp _": ("rel_pos_bias/relative_position_bias_table",),
    "fsdp _ tensor": ("cls_pt_layers_*/attn/qkv/kernel",),
    "fsdp tensor": ("cls_pt_layers_*/mlp/fc1/kernel", "lm_head/kernel"),
    "tensor": (
      "cls_pt_layers_*/attn/q_bias",
      "cls_pt_layers_*/attn/v_bias",
      "cls_pt_layers_*/mlp/fc1/bias",
      "lm_head/bias",
    ),
    "tensor fsdp": ("cls_pt_layers_*/attn/proj/kernel", "cls_pt_layers_*/mlp/fc2/kernel"),
  },
  "vit_classifier": {
    "_ _ _ fsdp": ("patch_embed/kernel",),
    "_ _ fsdp": ("cls_token", "mask_token", "pos_embed"),
    "fsdp": (
      "blocks_*/attn/proj/bias",
      "blocks_*/gamma_1",
      "blocks_*/gamma_2",
      "blocks_*/mlp/fc2/bias",
      "blocks_*/norm1/bias",
      "blocks_*/norm1/scale",
      "blocks_*/norm2/bias",
      "blocks_*/norm2/scale",
      "fc_norm/bias",
      "fc_norm/scale",
      "head/bias",
      "patch_embed/bias",
    ),
    "fsdp _": ("blocks_*/attn/relative_position_bias_table",),
    "fsdp _ tensor": ("blocks_*/attn/qkv/kernel",),
    "fsdp tensor": ("blocks_*/mlp/fc1/kernel", "head/kernel"),
    "tensor": ("blocks_*/attn/q_bias", "blocks_*/attn/v_bias", "blocks_*/mlp/fc1/bias"),
    "tensor fsdp": ("blocks_*/attn/proj/kernel", "blocks_*/mlp/fc2/kernel"),
  },
  "dvae": {
    "": ("decoder/blocks/output/conv/b",),
    "_ _ _ fsdp": (
      "decoder/blocks/group_1/block_1/id_path/w",
      "decoder/blocks/group_1/block_1/res_path/conv_1/w",
      "decoder/blocks/group_1/block_1/res_path/conv_2/w",
      "decoder/blocks/group_1/block_1/res_path/conv_3/w",
      "decoder/blocks/group_1/block_1/res_path/conv_4/w",
      "decoder/blocks/group_2/block_1/res_path/conv_2/w",
      "decoder/blocks/group_2/block_1/res_path/conv_3/w",
      "decoder/blocks/group_2/block_1/res_path/conv_4/w",
      "decoder/blocks/group_3/block_1/res_path/conv_2/w",
      "decoder/blocks/group_3/block_1/res_path/conv_3/w",
      "decoder/blocks/group_3/block_1/res_path/conv_4/w",
      "decoder/blocks/group_4/block_1/res_path/conv_2/w",
      "decoder/blocks/group_4/block_1/res_path/conv_3/w",
      "decoder/blocks/group_4/block_1/res_path/conv_4/w",
      "encoder/blocks/group_1/block_1/res_path/conv_2/w",
      "encoder/blocks/group_1/block_1/res_path/conv_3/w",
      "encoder/blocks/group_1/block_1/res_path/conv_4/w",
      "encoder/blocks/group_2/block_1/id_path/w",
      "encoder/blocks/group_2/block_1/res_path/conv_2/w",
      "encoder/blocks/group_2/block_1/res_path/conv_3/w",
      "encoder/blocks/group_2/block_1/res_path/conv_4/w",
      "encoder/blocks/group_3/block_1/id_path/w",
      "encoder/blocks/group_3/block_1/res_path/conv_2/w",
      "encoder/blocks/group_3/block_1/res_path/conv_3/w",
      "encoder/blocks/group_3/block_1/res_path/conv_4/w",
      "encoder/blocks/group_4/block_1/id_path/w",
      "encoder/blocks/group_4/block_1/res_path/conv_2/w",
      "encoder/blocks/group_4/block_1/res_path/conv_3/w",
      "encoder/blocks/group_4/block_1/res_path/conv_4/w",
      "encoder/blocks/input/w",
    ),
    "_ _ fsdp _": (
      "decoder/blocks/group_2/block_1/id_path/w",
      "decoder/blocks/group_2/block_1/res_path/conv_1/w",
      "decoder/blocks/group_3/block_1/id_path/w",
      "decoder/blocks/group_3/block_1/res_path/conv_1/w",
      "decoder/blocks/group_4/block_1/id_path/w",
      "decoder/blocks/group_4/block_1/res_path/conv_1/w",
      "decoder/blocks/input/w",
      "decoder/blocks/output/conv/w",
      "encoder/blocks/group_1/block_1/res_path/conv_1/w",
      "encoder/blocks/group_2/block_1/res_path/conv_1/w",
      "encoder/blocks/group_3/block_1/res_path/conv_1/w",
      "encoder/blocks/group_4/block_1/res_path/conv_1/w",
      "encoder/blocks/output/conv/w",
    ),
    "fsdp": (
      "decoder/blocks/group_1/block_1/id_path/b",
      "decoder/blocks/group_1/block_1/res_path/conv_1/b",
      "decoder/blocks/group_1/block_1/res_path/conv_2/b",
      "decoder/blocks/group_1/block_1/res_path/conv_3/b",
      "decoder/blocks/group_1/block_1/res_path/conv_4/b",
      "decoder/blocks/group_2/block_1/id_path/b",
      "decoder/blocks/group_2/block_1/res_path/conv_1/b",
      "decoder/blocks/group_2/block_1/res_path/conv_2/b",
      "decoder/blocks/group_2/block_1/res_path/conv_3/b",
      "decoder/blocks/group_2/block_1/res_path/conv_4/b",
      "decoder/blocks/group_3/block_1/id_path/b",
      "decoder/blocks/group_3/block_1/res_path/conv_1/b",
      "decoder/blocks/group_3/block_1/res_path/conv_2/b",
      "decoder/blocks/group_3/block_1/res_path/conv_3/b",
      "decoder/blocks/group_3/block_1/res_path/conv_4/b",
      "decoder/blocks/group_4/block_1/id_path/b",
      "decoder/blocks/group_4/block_1/res_path/conv_1/b",
      "decoder/blocks/group_4/block_1/res_path/conv_2/b",
      "decoder/blocks/group_4/block_1/res_path/conv_3/b",
      "decoder/blocks/group_4/block_1/res_path/conv_4/b",
      "decoder/blocks/input/b",
      "encoder/blocks/group_1/block_1/res_path/conv_1/b",
      "encoder/blocks/group_1/block_1/res_path/conv_2/b",
      "encoder/blocks/group_1/block_1/res_path/conv_3/b",
      "encoder/blocks/group_1/block_1/res_path/conv_4/b",
      "encoder/blocks/group_2/block_1/id_path/b",
      "encoder/blocks/group_2/block_1/res_path/conv_1/b",
      "encoder/blocks/group_2/block_1/res_path/conv_2/b",
      "encoder/blocks/group_2/block_1/res_path/conv_3/b",
      "encoder/blocks/group_2/block_1/res_path/conv_4/b",
      "encoder/blocks/group_3/block_1/id_path/b",
      "encoder/blocks/group_3/block_1/res_path/conv_1/b",
      "encoder/blocks/group_3/block_1/res_path/conv_2/b",
      "encoder/blocks/group_3/block_1/res_path/conv_3/b",
      "encoder/blocks/group_3/block_1/res_path/conv_4/b",
      "encoder/blocks/group_4/block_1/id_path/b",
      "encoder/blocks/group_4/block_1/res_path/conv_1/b",
      "encoder/blocks/group_4/block_1/res_path/conv_2/b",
      "encoder/blocks/group_4/block_1/res_path/conv_3/b",
      "encoder/blocks/group_4/block_1/res_path/conv_4/b",
      "encoder/blocks/input/b",
      "encoder/blocks/output/conv/b",
    ),
  },
  "vqkd": {
    "": ("codebook/initted",),
    "_ _ _ fsdp": ("params/decoder/patch_embed/kernel", "params/encoder/patch_embed/kernel"),
    "_ _ fsdp": (
      "params/decoder/cls_token",
      "params/decoder/pos_embed",
      "params/encoder/cls_token",
      "params/encoder/pos_embed",
    ),
    "_ fsdp": ("params/decode_task_layer_0/kernel", "params/encode_task_layer_0/kernel"),
    "fsdp": (
      "codebook/cluster_size",
      "params/decode_task_layer_0/bias",
      "params/decode_task_layer_2/bias",
      "params/decoder/blocks_*/attn/proj/bias",
      "params/decoder/blocks_*/mlp/fc2/bias",
      "params/decoder/blocks_*/norm1/bias",
      "params/decoder/blocks_*/norm1/scale",
      "params/decoder/blocks_*/norm2/bias",
      "params/decoder/blocks_*/norm2/scale",
      "params/decoder/fc_norm/bias",
      "params/decoder/fc_norm/scale",
      "params/decoder/patch_embed/bias",
      "params/encode_task_layer_0/bias",
      "params/encode_task_layer_2/bias",
      "params/encoder/blocks_*/attn/proj/bias",
      "params/encoder/blocks_*/mlp/fc2/bias",
      "params/encoder/blocks_*/norm1/bias",
      "params/encoder/blocks_*/norm1/scale",
      "params/encoder/blocks_*/norm2/bias",
      "params/encoder/blocks_*/norm2/scale",
      "params/encoder/fc_norm/bias",
      "params/encoder/fc_norm/scale",
      "params/encoder/patch_embed/bias",
    ),
    "fsdp _": (
      "codebook/embedding",
      "params/decode_task_layer_2/kernel",
      "params/encode_task_layer_2/kernel",
    ),
    "fsdp _ tensor": (
      "params/decoder/blocks_*/attn/qkv/kernel",
      "params/encoder/blocks_*/attn/qkv/kernel",
    ),
    "fsdp tensor": (
      "params/decoder/blocks_*/mlp/fc1/kernel",
      "params/encoder/blocks_*/mlp/fc1/kernel",
    ),
    "tensor": (
      "params/decoder/blocks_*/attn/q_bias",
      "params/decoder/blocks_*/attn/v_bias",
      "params/decoder/blocks_*/mlp/fc1/bias",
      "params/encoder/blocks_*/attn/q_bias",
      "params/encoder/blocks_*/attn/v_bias",
      "params/encoder/blocks_*/mlp/fc1/bias",
    ),
    "tensor fsdp": (
      "params/decoder/blocks_*/attn/proj/kernel",
      "params/decoder/blocks_*/mlp/fc2/kernel",
      "params/encoder/blocks_*/attn/proj/kernel",
      "params/encoder/blocks_*/mlp/fc2/kernel",
    ),
  },
  "dino": {
    "_ _ _ fsdp": ("patch_embed/kernel",),
    "_ _ fsdp": ("cls_token", "pos_embed"),
    "_ fsdp": ("blocks_*/attn/qkv/kernel",),
    "fsdp": (
      "blocks_*/attn/proj/bias",
      "blocks_*/attn/qkv/bias",
      "blocks_*/mlp/fc2/bias",
      "blocks_*/norm1/bias",
      "blocks_*/norm1/scale",
      "blocks_*/norm2/bias",
      "blocks_*/norm2/scale",
      "norm/bias",
      "norm/scale",
      "patch_embed/bias",
    ),
    "fsdp tensor": ("blocks_*/mlp/fc1/kernel",),
    "tensor": ("blocks_*/mlp/fc1/bias",),
    "tensor fsdp": ("blocks_*/attn/proj/kernel", "blocks_*/mlp/fc2/kernel"),
  },
  "clip": {
    "_ _ _ fsdp": ("conv1/kernel",),
    "_ fsdp": (
      "positional_embedding",
      "resblocks_*/attn/in_proj/kernel",
      "resblocks_*/attn/out_proj/kernel",
      "resblocks_*/mlp/c_fc/kernel",
    ),
    "fsdp": (
      "class_embedding",
      "ln_post/bias",
      "ln_post/scale",
      "ln_pre/bias",
      "ln_pre/scale",
      "resblocks_*/attn/in_proj/bias",
      "resblocks_*/attn/out_proj/bias",
      "resblocks_*/ln_1/bias",
      "resblocks_*/ln_1/scale",
      "resblocks_*/ln_2/bias",
      "resblocks_*/ln_2/scale",
      "resblocks_*/mlp/c_fc/bias",
      "resblocks_*/mlp/c_proj/bias",
    ),
    "fsdp _": ("proj", "resblocks_*/mlp/c_proj/kernel"),
  },
  "upernet": {
    "_ _ _ fsdp": (
      "auxiliary_head/conv_seg/kernel",
      "backbone/patch_embed/kernel",
      "decode_head/fpn_0/conv/kernel",
      "decode_head/fpn_1/conv/kernel",
      "decode_head/fpn_2/conv/kernel",
      "neck/fpn1_deconv0/kernel",
      "neck/fpn1_deconv1/kernel",
      "neck/fpn2_deconv0/kernel",
    ),
    "_ _ fsdp": ("backbone/cls_token", "backbone/mask_token"),
    "_ _ fsdp _": (
      "auxiliary_head/conv/conv/kernel",
      "decode_head/conv_seg/kernel",
      "decode_head/fpn_bottleneck/conv/kernel",
      "decode_head/lateral_0/conv/kernel",
      "decode_head/lateral_1/conv/kernel",
      "decode_head/lateral_2/conv/kernel",
      "decode_head/ppm/bottleneck/conv/kernel",
      "decode_head/ppm/psp_1/conv/kernel",
      "decode_head/ppm/psp_2/conv/kernel",
    ),
    "fsdp": (
      "auxiliary_head/conv/gn/bias",
      "auxiliary_head/conv/gn/scale",
      "auxiliary_head/conv_seg/bias",
      "backbone/blocks_*/attn/proj/bias",
      "backbone/blocks_*/gamma_1",
      "backbone/blocks_*/gamma_2",
      "backbone/blocks_*/mlp/fc2/bias",
      "backbone/blocks_*/norm1/bias",
      "backbone/blocks_*/norm1/scale",
      "backbone/blocks_*/norm2/bias",
      "backbone/blocks_*/norm2/scale",
      "backbone/norm/bias",
      "backbone/norm/scale",
      "backbone/patch_embed/bias",
      "decode_head/conv_seg/bias",
      "decode_head/fpn_0/gn/bias",
      "decode_head/fpn_0/gn/scale",
      "decode_head/fpn_1/gn/bias",
      "decode_head/fpn_1/gn/scale",
      "decode_head/fpn_2/gn/bias",
      "decode_head/fpn_2/gn/scale",
      "decode_head/fpn_bottleneck/gn/bias",
      "decode_head/fpn_bottleneck/gn/scale",
      "decode_head/lateral_0/gn/bias",
      "decode_head/lateral_0/gn/scale",
      "decode_head/lateral_1/gn/bias",
      "decode_head/lateral_1/gn/scale",
      "decode_head/lateral_2/gn/bias",
      "decode_head/lateral_2/gn/scale",
      "decode_head/ppm/bottleneck/gn/bias",
      "decode_head/ppm/bottleneck/gn/scale",
      "decode_head/ppm/psp_1/gn/bias",
      "decode_head/ppm/psp_1/gn/scale",
      "decode_head/ppm/psp_2/gn/bias",
      "decode_head/ppm/psp_2/gn/scale",
      "neck/fpn1_deconv0/bias",
      "neck/fpn1_deconv1/bias",
      "neck/fpn1_gn/bias",
      "neck/fpn1_gn/scale",
      "neck/fpn2_deconv0/bias",
    ),
    "fsdp _": ("backbone/blocks_*/attn/relative_position_bias_table",),
    "fsdp _ tensor": ("backbone/blocks_*/attn/qkv/kernel",),
    "fsdp tensor": ("backbone/blocks_*/mlp/fc1/kernel",),
    "tensor": (
      "backbone/blocks_*/attn/q_bias",
      "backbone/blocks_*/attn/v_bias",
      "backbone/blocks_*/mlp/fc1/bias",
    ),
    "tensor fsdp": ("backbone/blocks_*/attn/proj/kernel", "backbone/blocks_*/mlp/fc2/kernel"),
  },
}
