"""Fine-tuning and linear probing: layer decay, Mixup/CutMix, accuracy, loading checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from tensorboard.backend.event_processing import event_accumulator
import tensorflow as tf

from beit_jax.evaluation import classification
from beit_jax import main
from beit_jax.training import optim
from beit_jax import params as params_lib
from beit_jax.training import runner
from beit_jax.training import sharding
from beit_jax.convert import relpos
from beit_jax.errors import ConfigError
from beit_jax.trainers import finetune
from beit_jax.trainers import linear_probe
from tests.tiny_config import tiny_finetune_config


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


# --------------------------------------------------------------------------- layer decay


def test_layer_decay_factors_per_parameter():
  config = tiny_finetune_config()
  config.model.use_abs_pos_emb = True
  model = finetune.make_model(config, num_classes=10)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  depth, d = 2, 0.5
  scales = _flat(optim.layer_decay_scales(params, depth=depth, decay=d))
  expected = {
    "cls_token": d**3,
    "mask_token": d**3,
    "pos_embed": d**3,
    "patch_embed/kernel": d**3,
    "patch_embed/bias": d**3,
    "blocks_0/attn/qkv/kernel": d**2,
    "blocks_0/gamma_1": d**2,
    "blocks_0/attn/relative_position_bias_table": d**2,
    "blocks_1/mlp/fc2/bias": d,
    "blocks_1/norm1/scale": d,
    "fc_norm/scale": 1.0,
    "head/kernel": 1.0,
    "head/bias": 1.0,
  }
  for path, want in expected.items():
    assert scales[path] == pytest.approx(want), path
  assert set(scales) == set(_flat(params))

  # The optimizer applies them: Adam's first update is +-lr * scale for any gradient sign.
  config.optim.update(dict(lr=1e-2, weight_decay=0.0))
  tx, _ = optim.make_optimizer(
    config.optim,
    total_steps=10,
    warmup_steps=0,
    lr_scale_fn=lambda p: optim.layer_decay_scales(p, depth=depth, decay=d),
  )
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape), params)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, zeros), tx.init(zeros), zeros)
  updates = _flat(updates)
  for path, want in expected.items():
    np.testing.assert_allclose(updates[path], -1e-2 * want, rtol=1e-4, err_msg=path)


def test_shared_rel_pos_bias_gets_the_head_scale():
  assert optim.layer_id("rel_pos_bias/relative_position_bias_table", 12) == 13
  assert optim.layer_id("blocks_11/attn/proj/kernel", 12) == 12
  assert optim.layer_id("patch_embed/kernel", 12) == 0


# --------------------------------------------------------------------------- mixup


def _mix(rng, images, labels, **kw):
  args = dict(
    num_classes=5, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1
  )
  args.update(kw)
  return finetune.mixup_cutmix(rng, images, labels, **args)


@pytest.mark.parametrize(
  "kw", [{}, {"cutmix_alpha": 0.0}, {"mixup_alpha": 0.0}, {"prob": 0.0}, {"label_smoothing": 0.0}]
)
def test_mixed_targets_sum_to_one_and_match_the_pixels(kw):
  b, s = 4, 16
  # Image i is the constant i + 1: every output pixel tells which images it mixes.
  images = jnp.broadcast_to(jnp.arange(1.0, b + 1)[:, None, None, None], (b, s, s, 3))
  labels = jnp.array([0, 3, 1, 4])
  smoothing = kw.get("label_smoothing", 0.1)
  for seed in range(6):
    out, targets, lam = _mix(jax.random.key(seed), images, labels, **kw)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    assert 0.0 <= float(lam) <= 1.0
    own, other = images[:, 0, 0, 0], images[::-1, 0, 0, 0]
    out = np.asarray(out[..., 0])  # [B, S, S]
    is_cut = np.all((out == own[:, None, None]) | (out == other[:, None, None]))
    if is_cut:  # CutMix (or no mix): lam is the fraction of own pixels
      own_fraction = np.mean(out[0] == own[0])
      assert own_fraction == pytest.approx(float(lam)) or float(lam) == 1.0
    else:  # Mixup: a convex combination with weight lam
      np.testing.assert_allclose(
        out, (lam * own + (1 - lam) * other)[:, None, None] * np.ones((b, s, s)), rtol=1e-5
      )
    off = smoothing / 5
    onehot = lambda y: np.eye(5)[y] * (1 - smoothing) + off
    np.testing.assert_allclose(
      targets, lam * onehot(labels) + (1 - lam) * onehot(labels[::-1]), atol=1e-6
    )
    if kw.get("prob") == 0.0:
      assert float(lam) == 1.0 and np.array_equal(out, np.asarray(images[..., 0]))


# --------------------------------------------------------------------------- evaluation


def test_accuracy_on_a_tiny_set_computed_by_hand():
  logits = jnp.array(
    [
      [0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 0: top-1
      [0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 4: 5th -> top-5 only
      [0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 5: 6th -> neither
      [0.0, 0.0, 0.0, 0.7, 0.0, 0.0, 0.2],  # label 6: 2nd -> top-5 only
      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0],  # padding (label 6 would be right)
      [0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 0.0],  # label 2: top-1
      [0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 0.0],  # padding
      [0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 0.0],  # padding
    ]
  )
  labels = jnp.array([0, 4, 5, 6, 6, 2, 0, 0])
  valid = jnp.array([1, 1, 1, 1, 0, 1, 0, 0], bool)
  batch = {"logits": logits, "label": labels, "valid": valid}
  mesh = sharding.make_mesh({"data": -1})
  eval_fn = jax.jit(
    lambda p, b: classification.classification_sums(b["logits"], b["label"], b["valid"])
  )
  # Two passes' worth of the same batch: the sums must add up across batches.
  metrics = classification.evaluate(eval_fn, None, [batch, batch], mesh)
  assert metrics["examples"] == 10
  assert metrics["top1"] == pytest.approx(2 / 5)
  assert metrics["top5"] == pytest.approx(4 / 5)
  ce = -jax.nn.log_softmax(logits)[jnp.arange(8), labels]
  assert metrics["loss"] == pytest.approx(float(jnp.sum(ce * valid) / 5), rel=1e-5)


# --------------------------------------------------------------------------- checkpoints


def _target(config):
  """A fine-tuning model's initial params (one device)."""
  model = finetune.make_model(config, num_classes=10)
  size = config.input.image_size
  return jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, size, size, 3)))["params"]


def test_one_step_from_a_pretraining_checkpoint_loads_every_backbone_weight(pretrained):
  path, source = pretrained
  config = tiny_finetune_config(init_from=path)
  # One device: the sharded step is main.run's (end-to-end tests); this one compiles faster.
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  config.total_steps, config.optim.warmup_steps, config.optim.warmup_epochs = 5, 0, 0
  task = finetune.make_task(config)
  built = runner.setup(config, task, mesh)
  state, train_fn = built.state, lambda s, b: built.step(s, b, built.frozen)
  init = _flat(state.params)
  state = state.replace(params=task.load_params(state.params))  # the trainer's init_from
  loaded = _flat(state.params)
  shared = source["rel_pos_bias/relative_position_bias_table"]
  for name, value in loaded.items():
    top = name.split("/")[0]
    if top in ("fc_norm", "head"):
      np.testing.assert_array_equal(value, init[name], err_msg=name)  # new: at init
    elif name.endswith("attn/relative_position_bias_table"):
      np.testing.assert_array_equal(value, shared, err_msg=name)  # shared -> per block
    else:
      np.testing.assert_array_equal(value, source[name], err_msg=name)
    assert top in ("fc_norm", "head") or not np.array_equal(value, init[name]), name
  assert "lm_head/kernel" not in loaded and "norm/scale" not in loaded

  batch = {
    "image": np.random.default_rng(1).normal(size=(8, 32, 32, 3)).astype(np.float32),
    "label": np.arange(8, dtype=np.int32),
  }
  state, metrics = train_fn(state, sharding.host_to_global(batch, mesh))
  assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
  after = _flat(state.params)
  assert not np.array_equal(after["head/kernel"], init["head/kernel"])
  assert not np.array_equal(after["blocks_0/attn/relative_position_bias_table"], shared)


def test_position_tables_are_resized_for_another_resolution(pretrained):
  path, source = pretrained
  config = tiny_finetune_config(init_from=path)
  config.input.image_size = 48  # 6x6 patches; the checkpoint has 4x4
  loaded = _flat(finetune.make_task(config).load_params(_target(config)))
  want = relpos.resize_rel_pos_table(
    source["rel_pos_bias/relative_position_bias_table"], (4, 4), (6, 6)
  )
  assert want.shape == (11 * 11 + 3, 2)
  for i in range(2):
    np.testing.assert_allclose(
      loaded[f"blocks_{i}/attn/relative_position_bias_table"], want, rtol=1e-6
    )
  np.testing.assert_array_equal(
    loaded["blocks_1/mlp/fc1/kernel"], source["blocks_1/mlp/fc1/kernel"]
  )


def _scalars(logdir, tag):
  acc = event_accumulator.EventAccumulator(str(logdir))
  acc.Reload()
  return (
    [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
    if tag in acc.Tags()["tensors"]
    else []
  )


@pytest.mark.slow
def test_tiny_fine_tune_at_another_resolution_through_main(pretrained, tmp_path):
  path, _ = pretrained
  config = tiny_finetune_config(init_from=path)
  config.input.image_size = 48  # the checkpoint is 32 px
  workdir = tmp_path / "ft"
  metrics = main.run(config, str(workdir))
  assert 0 <= metrics["val_top1"] <= metrics["val_top5"] <= 1
  assert metrics["val_examples"] == 364  # every digit of the validation split, once
  assert metrics["best_val_top1"] >= metrics["val_top1"]
  assert [s for s, _ in _scalars(workdir, "val_top1")] == [3, 6]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
    "3",
    "6",
  ]
  best = _flat(params_lib.read(str(workdir / "best")))
  assert metrics["best_step"] in (3, 6) and best["head/kernel"].shape == (32, 10)
  assert json.loads((workdir / "results.json").read_text())["step"] == 6


@pytest.mark.slow
def test_tiny_linear_probe_through_main(pretrained, tmp_path):
  path, _ = pretrained
  config = tiny_finetune_config(
    init_from=path,
    trainer="linear_probe",
    probe=dict(layers=(0, -1), pool="cls+mean", norm="layernorm"),
  )
  config.model.update(dict(use_shared_rel_pos_bias=True, use_rel_pos_bias=False))
  workdir = tmp_path / "probe"
  metrics = main.run(config, str(workdir))
  assert metrics["val_top1"] == max(metrics["val_top1_layer0"], metrics["val_top1_layer1"])
  assert metrics["val_layer"] in (0, 1)
  heads = _flat(params_lib.read(str(workdir / "best")))
  assert sorted(heads) == ["head_0/bias", "head_0/kernel", "head_1/bias", "head_1/kernel"]
  assert heads["head_0/kernel"].shape == (64, 10)  # [CLS] and mean, concatenated


def test_probe_layers_are_checked():
  config = tiny_finetune_config(probe=dict(layers=(5,), pool="cls", norm="none"))
  with pytest.raises(ConfigError, match=r"probe.layers=\(5,\) must be block indices"):
    linear_probe.probed_layers(config, depth=2)
  config.probe.layers = ()
  assert linear_probe.probed_layers(config, depth=3) == (0, 1, 2)
