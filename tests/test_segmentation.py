"""Segmentation: UperNet shapes, the pixel loss, mmseg's metrics and sliding windows, the
poly schedule, loading a pretrained backbone, and a tiny run through main."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from beit_jax import main
from beit_jax.training import optim
from beit_jax import params as params_lib
from beit_jax.evaluation import segmentation
from beit_jax.training import sharding
from beit_jax.convert import relpos
from beit_jax.models import segmentation as seg_model
from beit_jax.trainers import segmentation as trainer
from configs import seg_ade20k_base, seg_ade20k_large, seg_tiny_local


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def tiny_seg_config(**overrides):
  """configs/seg_tiny_local.py with `tiny_config`'s model (its checkpoints fit) at 48 px
  (6x6 patches: the checkpoint's 4x4 position tables are resized), a 16-channel head, and 6
  validation images scaled to 64 px (2x2 windows of 48 px)."""
  c = seg_tiny_local.get_config("steps=4,batch=8")
  c.log_every_steps = 2
  c.eval_every_steps = 2
  c.model.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64))
  c.upernet.update(dict(out_indices=(0, 1, 1, 1), channels=16, aux_channels=16, norm_groups=8))
  c.input.update(
    dict(
      image_size=48, scale=(256, 64), eval_stride=32, eval_split="validation[:6]", shuffle_buffer=64
    )
  )
  c.checkpoint = dict(every_steps=2, keep=2)
  c.update(overrides)
  return c


# --------------------------------------------------------------------------- model


def test_pyramid_and_logits_of_b16_at_512():
  config = seg_ade20k_base.get_config()
  model = trainer.make_model(config)
  out, variables = jax.eval_shape(
    lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((2, 512, 512, 3)), return_pyramid=True
    )
  )
  # Strides 4, 8, 16, 32 of the 512-px image (unilm's fpn1..fpn4 of the 32x32 patch grid).
  assert [p.shape for p in out["pyramid"]] == [(2, 512 // s, 512 // s, 768) for s in (4, 8, 16, 32)]
  assert out["logits"].shape == out["aux_logits"].shape == (2, 512, 512, 150)
  assert out["logits"].dtype == jnp.float32
  params = variables["params"]
  assert sorted(params) == ["auxiliary_head", "backbone", "decode_head", "neck"]
  # Per-block relative position tables of the 32x32 grid.
  assert params["backbone"]["blocks_11"]["attn"]["relative_position_bias_table"].shape == (
    63 * 63 + 3,
    12,
  )
  assert sorted(params["neck"]) == ["fpn1_deconv0", "fpn1_deconv1", "fpn1_gn", "fpn2_deconv0"]


def test_large_reads_blocks_7_11_15_23_and_patch_8_pyramid():
  config = seg_ade20k_large.get_config()
  assert tuple(config.upernet.out_indices) == (7, 11, 15, 23)
  assert (config.optim.lr, config.optim.layer_decay, config.upernet.channels) == (2e-5, 0.95, 1024)
  # unilm's 8x8-patch pyramid: one ConvTranspose, identity, 2x2 and 4x4 max pooling.
  levels = [jnp.zeros((1, 8, 8, 32))] * 4
  pyramid = seg_model.Pyramid(8, norm_groups=8)
  out, variables = jax.eval_shape(lambda: pyramid.init_with_output(jax.random.key(0), levels))
  assert [o.shape[1:3] for o in out] == [(16, 16), (8, 8), (4, 4), (2, 2)]
  assert sorted(variables["params"]) == ["fpn1_deconv0"]


def test_ppm_and_fpn_shapes():
  x = jnp.zeros((2, 5, 7, 24))
  ppm = seg_model.PPM(16, (1, 2, 3, 6), norm_groups=4)
  out, _ = jax.eval_shape(lambda: ppm.init_with_output(jax.random.key(0), x))
  assert out.shape == (2, 5, 7, 16)
  levels = [jnp.zeros((2, 32 // s, 32 // s, 24)) for s in (1, 2, 4, 8)]
  head = seg_model.UperHead(16, num_classes=11, norm_groups=4)
  out, variables = jax.eval_shape(lambda: head.init_with_output(jax.random.key(0), levels))
  assert out.shape == (2, 32, 32, 11)  # at the finest level
  p = variables["params"]
  assert sorted(p["ppm"]) == ["bottleneck", "psp_1", "psp_2", "psp_3", "psp_6"]
  assert p["ppm"]["bottleneck"]["conv"]["kernel"].shape == (3, 3, 24 + 4 * 16, 16)
  assert p["fpn_bottleneck"]["conv"]["kernel"].shape == (3, 3, 4 * 16, 16)
  assert [f"lateral_{i}" in p and f"fpn_{i}" in p for i in range(4)] == [True] * 3 + [False]


def test_pooling_and_resizing_match_torch(torch):
  x = np.random.default_rng(0).normal(size=(1, 5, 7, 3)).astype(np.float32)
  nchw = torch.tensor(x).permute(0, 3, 1, 2)
  to_nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  for out in (1, 2, 3, 6):  # 6 > 5: bins repeat, as torch's
    np.testing.assert_allclose(
      seg_model.adaptive_avg_pool(jnp.asarray(x), out),
      to_nhwc(torch.nn.functional.adaptive_avg_pool2d(nchw, out)),
      atol=1e-6,
    )
  for size in ((3, 4), (11, 16)):
    want = torch.nn.functional.interpolate(nchw, size=size, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(
      seg_model.resize_bilinear(jnp.asarray(x), size), to_nhwc(want), atol=1e-5
    )


# --------------------------------------------------------------------------- loss, metrics


def test_the_loss_ignores_label_255():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  labels = rng.integers(0, 5, size=(2, 3, 4)).astype(np.int32)
  labels[0, 0, :] = 255
  loss, accuracy = segmentation.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  valid = labels != 255
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -np.take_along_axis(logp, np.where(valid, labels, 0)[..., None], -1)[..., 0][valid].mean()
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(accuracy, (logits.argmax(-1) == labels)[valid].mean(), rtol=1e-6)
  changed = logits.copy()
  changed[0, 0] = 100 * rng.normal(size=(4, 5))  # only ignored pixels change
  again, _ = segmentation.pixel_cross_entropy(jnp.asarray(changed), jnp.asarray(labels))
  assert float(again) == pytest.approx(float(loss), rel=1e-6)


def test_miou_pixel_accuracy_and_class_iou_by_hand():
  labels = np.array([[0, 0, 1, 1], [2, 255, 1, 0]])
  preds = np.array([[0, 1, 1, 1], [0, 2, 2, 0]])
  conf = segmentation.confusion_update(
    jnp.zeros((4, 4), jnp.int32), jnp.asarray(preds), jnp.asarray(labels)
  )
  # rows: true 0 (3 pixels: 0, 1, 0), true 1 (1, 1, 2), true 2 (0); the 255 pixel nowhere.
  np.testing.assert_array_equal(conf, [[2, 1, 0, 0], [0, 2, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
  metrics, iou = segmentation.segmentation_metrics(np.asarray(conf))
  # IoU = hits / (true + predicted - hits): class 0 2/(3+3-2), class 1 2/(3+3-2), class 2
  # 0/(1+1-0); class 3 is neither true nor predicted: NaN, left out of the mean.
  np.testing.assert_allclose(iou[:3], [0.5, 0.5, 0.0])
  assert np.isnan(iou[3])
  assert metrics["miou"] == pytest.approx(1 / 3)
  assert metrics["pixel_accuracy"] == pytest.approx(4 / 7)
  assert metrics["mean_accuracy"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_window_starts_follow_mmseg():
  assert segmentation.window_starts(512, 512, 341) == [0]
  assert segmentation.window_starts(683, 512, 341) == [0, 171]
  assert segmentation.window_starts(1200, 512, 341) == [0, 341, 682, 688]
  assert segmentation.window_starts(300, 512, 341) == [0]  # smaller than a window: padded
  assert segmentation.canvas_side(683, 512, 341) == 853
  assert segmentation.canvas_side(300, 512, 341) == 512


# --------------------------------------------------------------------------- sliding windows


def _mesh():
  return sharding.make_mesh({"data": -1})


def _evaluator(predict, *, crop, stride, classes, flip=False):
  mesh = _mesh()
  return segmentation.Evaluator(
    predict,
    mesh=mesh,
    params_sharding=sharding.replicated(mesh),
    crop=crop,
    stride=stride,
    window_batch=8,
    num_classes=classes,
    flip=flip,
  )


def test_sliding_window_equals_whole_image_where_one_window_covers_it():
  config = tiny_seg_config()
  model = trainer.make_model(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 48, 48, 3)))["params"]
  rng = np.random.default_rng(0)  # random weights: no init to compile
  params = jax.tree.map(
    lambda x: jax.device_put((0.2 * rng.normal(size=x.shape)).astype(np.float32)), shapes
  )
  predict = lambda p, w: trainer.predict(p, w, model=model)
  view = np.random.default_rng(0).normal(size=(48, 48, 3)).astype(np.float32)
  evaluator = _evaluator(predict, crop=48, stride=32, classes=11)
  canvas, counts = evaluator.view_logits(params, view)
  whole = np.asarray(jax.jit(predict)(params, jnp.asarray(view[None])))[0]
  np.testing.assert_array_equal(counts, 1)
  np.testing.assert_allclose(np.asarray(canvas), whole, rtol=1e-5, atol=1e-5)
  probs = evaluator.predict_image(params, (view,), (48, 48))  # label canvas: 64 px
  np.testing.assert_allclose(np.asarray(probs)[:48, :48], jax.nn.softmax(whole), atol=1e-5)


def _pointwise(params, windows):
  """A model whose logits at a pixel depend on that pixel only: any windowing equals it."""
  return jnp.einsum("nhwc,ck->nhwk", windows, params)


def test_overlapping_windows_average_to_the_whole_image():
  rng = np.random.default_rng(1)
  weights = jnp.asarray(rng.normal(size=(3, 4)).astype(np.float32))
  view = rng.normal(size=(45, 70, 3)).astype(np.float32)  # 2 x 3 windows of 32, overlapping
  evaluator = _evaluator(_pointwise, crop=32, stride=21, classes=4, flip=True)
  canvas, counts = evaluator.view_logits(weights, view)
  assert counts.shape == (53, 74) and counts[:45, :70].min() >= 1 and counts.max() == 4
  mean = np.asarray(canvas)[:45, :70] / counts[:45, :70, None]
  np.testing.assert_allclose(mean, view @ np.asarray(weights), rtol=1e-5, atol=1e-5)
  # Scored at the label's size (another one): the mean logits resized (bilinear), softmax,
  # summed over the view and its mirror image (mirrored back).
  probs = np.asarray(evaluator.predict_image(weights, (view,), (30, 91)))
  want = jax.nn.softmax(
    seg_model.resize_bilinear(jnp.asarray(view @ np.asarray(weights))[None], (30, 91))[0]
  )
  assert probs.shape == (64, 128, 4)
  np.testing.assert_allclose(probs[:30, :91], 2 * np.asarray(want), atol=1e-5)


# --------------------------------------------------------------------------- optimizer


def test_poly_schedule_with_mmcv_warmup():
  schedule = optim.poly_schedule(1e-3, total_steps=100, warmup_steps=10, power=1.0)
  assert float(schedule(0)) == pytest.approx(1e-3 * 1e-6)
  # During warmup: poly(t) * (1 - (1 - t / 10) * (1 - 1e-6)).
  assert float(schedule(5)) == pytest.approx(1e-3 * 0.95 * (1 - 0.5 * (1 - 1e-6)), rel=1e-5)
  assert float(schedule(10)) == pytest.approx(1e-3 * 0.9, rel=1e-6)
  assert float(schedule(55)) == pytest.approx(1e-3 * 0.45, rel=1e-5)
  assert float(schedule(100)) == 0.0
  squared = optim.poly_schedule(1.0, total_steps=10, warmup_steps=0, power=2.0, min_lr=0.1)
  assert float(squared(5)) == pytest.approx(0.9 * 0.25 + 0.1)


def test_layer_decay_reaches_the_backbone_only():
  config = tiny_seg_config()
  params = jax.eval_shape(
    trainer.make_model(config).init, jax.random.key(0), jnp.zeros((1, 48, 48, 3))
  )["params"]
  scales = _flat(trainer.layer_decay_scales(params, depth=2, decay=0.5))
  assert scales["backbone/patch_embed/kernel"] == pytest.approx(0.125)
  assert scales["backbone/blocks_0/attn/qkv/kernel"] == pytest.approx(0.25)
  assert scales["backbone/blocks_1/mlp/fc1/kernel"] == pytest.approx(0.5)
  assert {v for k, v in scales.items() if not k.startswith("backbone/")} == {1.0}
  task = trainer.make_task(config)  # the poly schedule, the backbone's layer decay
  tx, schedule = task.tx, task.train_step.keywords["schedule"]
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape), params)
  updates, _ = jax.jit(lambda p: tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p))(zeros)
  updates, lr = _flat(updates), float(schedule(0))
  np.testing.assert_allclose(updates["backbone/blocks_0/attn/qkv/kernel"], -lr * 0.75**2, rtol=1e-4)
  np.testing.assert_allclose(updates["decode_head/conv_seg/kernel"], -lr, rtol=1e-4)


# --------------------------------------------------------------------------- pretrained


def test_every_backbone_weight_is_loaded_from_a_pretraining_checkpoint(pretrained):
  path, source = pretrained
  config = tiny_seg_config(init_from=path)
  task = trainer.make_task(config)
  shapes = jax.eval_shape(task.init_params, jax.random.key(1))
  init = jax.tree.map(lambda x: jax.device_put(np.full(x.shape, 0.5, x.dtype)), shapes)
  loaded = _flat(task.load_params(init))
  init = _flat(init)
  want_table = relpos.resize_rel_pos_table(
    source["rel_pos_bias/relative_position_bias_table"], (4, 4), (6, 6)
  )
  backbone = [k for k in loaded if k.startswith("backbone/")]
  tables = {f"backbone/blocks_{i}/attn/relative_position_bias_table" for i in range(2)}
  assert set(backbone) - tables == {
    f"backbone/{k}" for k in source if not k.startswith(("lm_head/", "rel_pos_bias/"))
  }
  for name in backbone:
    inner = name[len("backbone/") :]
    if inner.endswith("attn/relative_position_bias_table"):  # shared -> per block, 4x4 -> 6x6
      np.testing.assert_allclose(loaded[name], want_table, rtol=1e-6, err_msg=name)
    else:
      np.testing.assert_array_equal(loaded[name], source[inner], err_msg=name)
  heads = [k for k in loaded if not k.startswith("backbone/")]
  assert heads and all(np.array_equal(loaded[k], init[k]) for k in heads)


@pytest.mark.slow
def test_tiny_segmentation_through_main(pretrained, tmp_path):
  path, source = pretrained
  config = tiny_seg_config(init_from=path, total_steps=2)
  workdir = tmp_path / "seg"
  metrics = main.run(config, str(workdir))
  assert 0 <= metrics["val_miou"] <= 1 and 0 <= metrics["val_pixel_accuracy"] <= 1
  assert metrics["val_images"] == 6 and metrics["val_skipped"] == 0
  assert metrics["best_step"] == 2 and metrics["best_val_miou"] == metrics["val_miou"]
  results = json.loads((workdir / "results.json").read_text())
  assert results["step"] == 2 and len(results["val_class_iou"]) == 11
  assert [p.name for p in (workdir / "images").iterdir()] == ["segmentation_0000002.png"]
  best = _flat(params_lib.read(str(workdir / "best")))
  assert best["decode_head/conv_seg/kernel"].shape == (1, 1, 16, 11)
  # Trained from the checkpoint: a few small steps leave the backbone near it.
  np.testing.assert_allclose(
    best["backbone/blocks_1/mlp/fc1/kernel"], source["blocks_1/mlp/fc1/kernel"], atol=0.05
  )
