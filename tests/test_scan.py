"""Scan over layers: the scanned ViT computes what the unscanned one does, and parameters,
optimizer states, shardings and checkpoints convert between the two layouts."""

import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from beit_jax.params import blocks
from beit_jax.training import checkpoint
from beit_jax.training import optim
from beit_jax import params as params_lib
from beit_jax.training import sharding
from beit_jax.models import vit
from configs import common
from tests import runs
from tests.runs import ROOT

_KW = dict(patch_size=8, width=32, depth=3, num_heads=4, mlp_dim=64, image_size=32, vocab_size=16)


def _inputs():
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  mask = jnp.zeros((2, 16), bool).at[:, 3:9].set(True)
  return images, mask


def _max_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize(
  "extra",
  [
    dict(patch_aggregation_layer=2),
    dict(use_shared_rel_pos_bias=False, use_rel_pos_bias=True, layer_scale_init=0.0),
    dict(remat=True, remat_policy="dots_saveable", patch_aggregation_layer=3),
  ],
)
def test_scanned_equals_unscanned_outputs_and_gradients(extra):
  images, mask = _inputs()
  plain = vit.VisionTransformer(**_KW, **extra)
  scanned = vit.VisionTransformer(**_KW, **extra, scan_layers=True)
  params = plain.init(jax.random.key(0), images, mask)["params"]
  stacked = blocks.stacked(params)
  assert jax.tree.structure(stacked) == jax.tree.structure(
    jax.eval_shape(scanned.init, jax.random.key(0), images, mask)["params"]
  )
  assert stacked["blocks"]["attn"]["qkv"]["kernel"].shape == (3, 32, 3, 32)

  kw = dict(return_hidden=(0, 2), return_attention=True)
  a = plain.apply({"params": params}, images, mask, **kw)
  b = scanned.apply({"params": stacked}, images, mask, **kw)
  assert set(a) == set(b)
  for key in ("tokens", "mim_logits") + (("mim_logits_c",) if "mim_logits_c" in a else ()):
    np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=key)
  assert sorted(b["hidden"]) == [0, 2] and len(b["attention"]) == 3
  assert _max_diff(a["hidden"], b["hidden"]) < 1e-5
  assert _max_diff(a["attention"], b["attention"]) < 1e-5

  def loss(p, model):
    out = model.apply({"params": p}, images, mask)
    return sum(jnp.mean(out[k] ** 2) for k in ("mim_logits", "mim_logits_c") if k in out)

  grads = jax.grad(loss)(params, plain)
  assert _max_diff(blocks.stacked(grads), jax.grad(loss)(stacked, scanned)) < 1e-6


def test_scanned_init_scales_each_layer_as_unilm():
  """attn/proj and mlp/fc2 start at 0.02 / sqrt(2 * layer_id), layer by layer."""
  model = vit.VisionTransformer(**dict(_KW, width=128, mlp_dim=256, depth=4), scan_layers=True)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  for name in ("attn/proj", "mlp/fc2"):
    kernel = params["blocks"][name.split("/")[0]][name.split("/")[1]]["kernel"]
    stds = np.array([float(jnp.std(kernel[i])) for i in range(4)])
    # truncated at ±1 std: the draws' std is 0.5396 of the untruncated one
    want = 0.02 * 0.5396 / np.sqrt(2.0 * np.arange(1, 5))
    np.testing.assert_allclose(stds, want, rtol=0.06, err_msg=name)


def test_drop_path_under_scan_drops_whole_samples():
  images, _ = _inputs()
  model = vit.VisionTransformer(
    **dict(_KW, depth=1), drop_path_rate=0.99, scan_layers=True, layer_scale_init=0.0
  )
  params = model.init(jax.random.key(0), images)["params"]
  # depth 1: linspace(0, rate, 1) gives the only block rate 0, so nothing is dropped
  a = model.apply({"params": params}, images, train=True, rngs={"dropout": jax.random.key(2)})
  b = model.apply({"params": params}, images)
  np.testing.assert_allclose(a["tokens"], b["tokens"], atol=1e-6)
  deep = vit.VisionTransformer(**_KW, drop_path_rate=0.9, scan_layers=True)
  params = deep.init(jax.random.key(0), images)["params"]
  outs = [
    deep.apply({"params": params}, images, train=True, rngs={"dropout": jax.random.key(s)})[
      "tokens"
    ]
    for s in range(2)
  ]
  assert not np.allclose(outs[0], outs[1])  # the rng is used


def test_layouts_convert_params_opt_state_and_abstract_trees():
  images, mask = _inputs()
  params = vit.VisionTransformer(**_KW, patch_aggregation_layer=2).init(
    jax.random.key(0), images, mask
  )["params"]
  assert blocks.layout(params) == blocks.UNSCANNED
  stacked = blocks.stacked(params)
  assert blocks.layout(stacked) == blocks.SCANNED
  assert "cls_pt_layers_0" in stacked and "blocks_0" not in stacked  # the decoder stays
  back = blocks.unstacked(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, y)
  # Adam's moments mirror the params: the whole optimizer state converts.
  tx, _ = optim.make_optimizer(_optim(), total_steps=10, warmup_steps=2)
  state = {"params": params, "opt_state": tx.init(params)}
  converted = blocks.stacked(state)
  assert jax.tree.structure(converted["opt_state"]) == jax.tree.structure(tx.init(stacked))
  # Abstract trees keep their shardings, the layer axis unsharded.
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(1, 1, 8, 1), sharding.AXES)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      x.shape,
      x.dtype,
      sharding=NamedSharding(
        mesh, P(*([None] * (x.ndim - 1)), "fsdp") if x.ndim and x.shape[-1] % 8 == 0 else P()
      ),
    ),
    params,
  )
  up = blocks.stacked(abstract)["blocks"]["mlp"]["fc1"]["kernel"]
  assert up.shape == (3, 32, 64) and up.sharding.spec == P(None, None, "fsdp")
  down = blocks.unstacked(blocks.stacked(abstract))
  assert down["blocks_1"]["mlp"]["fc1"]["kernel"].sharding.spec == P(None, "fsdp")


def _optim():
  import ml_collections  # pylint: disable=g-import-not-at-top

  return ml_collections.ConfigDict(
    dict(lr=1e-3, min_lr=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, grad_clip=3.0)
  )


def test_layer_decay_and_fsdp_shardings_of_scanned_params():
  images, _ = _inputs()
  params = vit.VisionTransformer(**_KW, num_classes=5).init(jax.random.key(0), images)["params"]
  stacked = blocks.stacked(params)
  plain = optim.layer_decay_scales(params, depth=3, decay=0.65)
  scanned = optim.layer_decay_scales(stacked, depth=3, decay=0.65)
  want = blocks.stacked(jax.tree.map(np.asarray, plain))
  for path, x in jax.tree_util.tree_leaves_with_path(scanned):
    y = jax.tree_util.tree_leaves_with_path(want)
    y = dict((jax.tree_util.keystr(p), v) for p, v in y)[jax.tree_util.keystr(path)]
    np.testing.assert_allclose(np.ravel(x), np.ravel(y), rtol=1e-6)  # [depth, 1, ..]
  mesh = sharding.make_mesh(dict(fsdp=4, tensor=2))
  shardings = sharding.param_shardings(
    stacked, mesh, dict(common.sharding_config(), min_size=0), vit.PARAM_AXES
  )
  # [depth, 32, 64]: the layer axis whole, then the roles' axes.
  assert shardings["blocks"]["mlp"]["fc1"]["kernel"].spec == P(None, "fsdp", "tensor")
  assert shardings["blocks"]["attn"]["qkv"]["kernel"].spec == P(None, "fsdp", None, "tensor")
  assert shardings["blocks"]["norm1"]["scale"].spec == P(None, "fsdp")


def test_checkpoint_restores_into_the_other_layout(tmp_path):
  images, mask = _inputs()
  params = vit.VisionTransformer(**_KW).init(jax.random.key(0), images, mask)["params"]
  tx, _ = optim.make_optimizer(_optim(), total_steps=10, warmup_steps=2)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(3)}
  manager = checkpoint.make_manager(str(tmp_path), every_steps=1, keep=1, async_save=False)
  checkpoint.save(manager, 3, state, force=True)
  manager.wait_until_finished()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  want = blocks.stacked(state)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), want)
  restored, meta = checkpoint.restore_latest(manager, abstract)
  assert meta["step"] == 3
  assert jax.tree.structure(restored) == jax.tree.structure(want)
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(want)):
    np.testing.assert_array_equal(x, y)
  # init_from / converters read the unscanned layout from either.
  checkpoint.save_params(str(tmp_path / "scanned"), blocks.stacked(params))
  loaded = params_lib.read(str(tmp_path / "scanned"))
  assert jax.tree.structure(loaded) == jax.tree.structure(params)


@pytest.mark.slow
def test_an_unscanned_run_resumes_scanned(tmp_path):
  """Same steps, same data: the run that switched to scan at step 3 ends where the unscanned
  run ends, up to rounding (the loop's arithmetic may round differently)."""
  tok = runs.random_tokenizer(tmp_path / "tok")
  env = runs.cpu_env(1)
  straight, switched = tmp_path / "straight", tmp_path / "switched"
  command = lambda w, *f: runs.main_command(w, tok, 6, "--config.model.drop_path_rate=0", *f)
  subprocess.run(command(straight), cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
  shutil.copytree(straight, switched)
  shutil.rmtree(switched / "checkpoints" / "6")
  out = subprocess.run(
    command(switched, "--config.model.scan_layers=True"),
    cwd=ROOT,
    env=env,
    check=True,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert "Resumed from step 3" in out.stderr
  assert "is unscanned; converted to the run's scanned blocks" in out.stderr
  a = params_lib.read(str(straight))
  b = params_lib.read(str(switched))  # saved scanned, read back unscanned
  assert jax.tree.structure(a) == jax.tree.structure(b)
  # Adam's normalised steps magnify rounding in near-zero gradients up to ~lr; the three
  # steps after the switch moved the params far more than the layouts differ.
  moved = _max_diff(a, params_lib.read(str(straight / "checkpoints" / "3")))
  print(f"max difference {_max_diff(a, b):.3g}, moved {moved:.3g}")
  assert _max_diff(a, b) < 0.1 * moved
