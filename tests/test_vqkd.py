"""Tests of the BEiT v2 VQ-KD tokenizer (beit_jax/models/vqkd.py)."""

import functools
import re
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from beit_jax.models import vqkd
from tests import codebook_case
from tests import runs

TINY = dict(
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
B, GRID, K, C, T = 4, 4, 16, 8, 16


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_codebook(embedding, cluster_size=None):
  k = embedding.shape[0]
  return {
    "embedding": jnp.asarray(embedding, jnp.float32),
    "cluster_size": jnp.asarray(np.zeros(k) if cluster_size is None else cluster_size, jnp.float32),
    "initted": jnp.asarray(True),
  }


# --- quantizer --------------------------------------------------------------------------


def test_quantize_picks_the_most_cosine_similar_code():
  rng = np.random.default_rng(0)
  z = _unit(rng.normal(size=(5, 7, C)))
  # Codes of very different norms: the nearest by raw dot product is then often not
  # the nearest by cosine, so a missing code normalisation shows.
  embedding = rng.normal(size=(K, C)) * rng.uniform(0.1, 10.0, size=(K, 1))
  cos = np.einsum("abc,kc->abk", z, _unit(embedding))
  want = np.argmax(cos, axis=-1)
  assert np.mean(want != np.argmax(z @ embedding.T, axis=-1)) > 0.2

  z_q, codes, commitment = vqkd.quantize(
    jnp.asarray(z, jnp.float32), jnp.asarray(embedding, jnp.float32), beta=0.5
  )
  assert codes.dtype == jnp.int32 and codes.shape == (5, 7)
  np.testing.assert_array_equal(np.asarray(codes), want)
  code_vectors = _unit(embedding)[want]
  np.testing.assert_allclose(np.asarray(z_q), code_vectors, atol=1e-6)
  np.testing.assert_allclose(float(commitment), 0.5 * np.mean((code_vectors - z) ** 2), rtol=1e-5)


def test_straight_through_gradient_is_identity_and_commitment_pulls_z_only():
  rng = np.random.default_rng(1)
  z = jnp.asarray(_unit(rng.normal(size=(3, C))), jnp.float32)
  embedding = jnp.asarray(_unit(rng.normal(size=(K, C))), jnp.float32)

  jac = jax.jacobian(lambda z: vqkd.quantize(z, embedding)[0])(z)  # [3, C, 3, C]
  np.testing.assert_allclose(np.asarray(jac).reshape(3 * C, 3 * C), np.eye(3 * C), atol=1e-6)

  beta = 0.7
  commit_grad = jax.grad(lambda z, e: vqkd.quantize(z, e, beta)[2], argnums=(0, 1))
  dz, de = commit_grad(z, embedding)
  code_vectors = np.asarray(embedding)[np.asarray(vqkd.nearest_code(z, embedding))]
  np.testing.assert_allclose(
    np.asarray(dz), 2 * beta * (np.asarray(z) - code_vectors) / z.size, atol=1e-6
  )
  np.testing.assert_array_equal(np.asarray(de), 0.0)  # the codebook is EMA-only


def _numpy_ema(embedding, cluster_size, z, codes, decay):
  new = embedding.copy()
  counts = np.bincount(codes, minlength=len(embedding)).astype(np.float64)
  for k in np.flatnonzero(counts):
    mean = _unit(z[codes == k].sum(0) / counts[k])
    new[k] = _unit(decay * embedding[k] + (1 - decay) * mean)
  return new, decay * cluster_size + (1 - decay) * counts


def test_ema_update_matches_numpy_and_keeps_unassigned_codes():
  rng = np.random.default_rng(2)
  k = 6
  embedding = _unit(rng.normal(size=(k, C))).astype(np.float32)
  cluster_size = rng.uniform(0, 5, size=k).astype(np.float32)
  z = _unit(rng.normal(size=(4, 5, C))).astype(np.float32)
  codes = rng.choice([0, 1, 2, 4], size=(4, 5)).astype(np.int32)  # 3 and 5 unused
  codes[0, :4] = [0, 1, 2, 4]

  state = vqkd.ema_update(
    _np_codebook(embedding, cluster_size), jnp.asarray(z), jnp.asarray(codes), decay=0.8
  )
  want_e, want_c = _numpy_ema(
    embedding.astype(np.float64), cluster_size, z.reshape(-1, C), codes.reshape(-1), 0.8
  )
  np.testing.assert_allclose(np.asarray(state["embedding"]), want_e, atol=1e-6)
  np.testing.assert_allclose(np.asarray(state["cluster_size"]), want_c, rtol=1e-6)
  for unused in (3, 5):  # bit for bit
    np.testing.assert_array_equal(np.asarray(state["embedding"][unused]), embedding[unused])
  assert not np.allclose(
    np.asarray(state["embedding"])[[0, 1, 2, 4]], embedding[[0, 1, 2, 4]], atol=1e-3
  )
  np.testing.assert_allclose(
    np.linalg.norm(np.asarray(state["embedding"]), axis=-1), 1.0, atol=1e-6
  )
  assert bool(state["initted"])


def _assert_close(got: dict, want: dict) -> None:
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_allclose(
      np.asarray(got[k], np.float32), np.asarray(want[k], np.float32), atol=1e-6, err_msg=k
    )


def _one_device() -> dict:
  state, z, codes, key = codebook_case.inputs()
  return codebook_case.flat(codebook_case.run_all(lambda fn, _: fn, state, z, codes, key))


def test_codebook_updates_on_8_devices_equal_the_whole_batch_on_one():
  """EMA, k-means init, restarts and usage jitted on the batch sharded over 8 devices (as
  in the trainer's step) see the whole batch, not each device's slice."""
  assert jax.device_count() == 8
  state, z, codes, key = codebook_case.inputs()
  # Device 0 alone sees fewer codes than the batch: per-device statistics would show.
  assert len(np.unique(np.asarray(codes[:12]))) < len(np.unique(np.asarray(codes)))
  mesh = Mesh(np.array(jax.devices()), ("data",))
  eight = codebook_case.run_all(codebook_case.sharded(mesh), state, z, codes, key)
  _assert_close(codebook_case.flat(eight), _one_device())


def test_codebook_updates_on_2_processes_equal_the_whole_batch_on_one(tmp_path):
  """The same on 2 processes x 4 devices (two hosts, jax.distributed on 127.0.0.1): the
  codebook every host keeps after a step is the one of the whole global batch."""
  port, out = runs.free_port(), tmp_path / "two.npz"
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", "tests.two_process_codebook", str(port), str(i), str(out)],
      cwd=runs.ROOT,
      env=runs.cpu_env(4),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  _assert_close(dict(np.load(out)), _one_device())


def test_cosine_kmeans_recovers_the_centres_of_a_separable_set():
  rng = np.random.default_rng(5)
  basis = np.linalg.qr(rng.normal(size=(C, C)))[0]
  centres = basis[:4]  # 4 orthonormal directions
  labels = np.repeat(np.arange(4), 40)
  # Noise orthogonal to all centres: separable by construction, yet single points are
  # far from their centre.
  points = _unit(centres[labels] + 0.5 * rng.normal(size=(160, 4)) @ basis[4:])
  np.testing.assert_array_equal(np.argmax(points @ centres.T, axis=1), labels)
  z = jnp.asarray(points, jnp.float32)

  def cos_to_centres(means):
    return np.asarray(means) @ centres.T  # [K, 4]

  # A draw whose starting rows fall in all four clusters (plain k-means cannot split
  # and merge clusters otherwise). The starting rows are single noisy points, so the
  # iterations have something to do.
  for seed in range(100):
    key = jax.random.key(seed)
    start, _ = vqkd.kmeans_init(z, 4, key, iters=0)
    if len(set(np.argmax(cos_to_centres(start), axis=1))) == 4:
      break
  assert np.max(cos_to_centres(start), axis=1).min() < 0.9

  means, counts = vqkd.kmeans_init(z, 4, key, iters=10)
  cos = cos_to_centres(means)
  assert sorted(np.argmax(cos, axis=1)) == [0, 1, 2, 3]
  assert np.max(cos, axis=1).min() > 0.97
  np.testing.assert_allclose(np.linalg.norm(np.asarray(means), axis=-1), 1.0, atol=1e-6)
  assigned = np.asarray(vqkd.nearest_code(z, means))
  np.testing.assert_array_equal(np.argmax(cos, axis=1)[assigned], labels)
  np.testing.assert_array_equal(np.sort(np.asarray(counts)), [40, 40, 40, 40])
  # Deterministic in the key.
  again, _ = vqkd.kmeans_init(z, 4, key, iters=10)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(means))


def test_collapse_shows_in_usage_and_restart_revives_dead_codes():
  rng = np.random.default_rng(6)
  direction = _unit(rng.normal(size=C))
  z = jnp.asarray(_unit(2 * direction + 0.5 * rng.normal(size=(64, C))), jnp.float32)
  # Code 0 is the data's direction, the 15 others point away from all of it.
  embedding = _unit(
    np.concatenate([direction[None], -direction + 0.3 * rng.normal(size=(K - 1, C))])
  )
  state = _np_codebook(embedding, np.full(K, 4.0))

  @jax.jit
  def step(state):
    codes = vqkd.nearest_code(z, state["embedding"])
    return vqkd.ema_update(state, z, codes, decay=0.9), codes

  for _ in range(40):
    state, codes = step(state)
  np.testing.assert_array_equal(np.asarray(codes), 0)
  usage = vqkd.codebook_usage(state, codes, dead_threshold=1.0)
  assert int(usage["dead_codes"]) == K - 1
  np.testing.assert_allclose(float(usage["dead_fraction"]), (K - 1) / K)
  np.testing.assert_allclose(float(usage["perplexity"]), 1.0, atol=1e-6)
  assert int(usage["used_codes"]) == 1

  revived = vqkd.restart_dead_codes(state, z, jax.random.key(7), threshold=1.0)
  np.testing.assert_array_equal(
    np.asarray(revived["embedding"][0]), np.asarray(state["embedding"][0])
  )  # alive: kept
  codes = np.asarray(vqkd.nearest_code(z, revived["embedding"]))
  counts = np.bincount(codes.reshape(-1), minlength=K)
  assert (counts[1:] > 0).all(), counts  # every revived code gets assignments
  usage = vqkd.codebook_usage(revived, jnp.asarray(codes), dead_threshold=1.0)
  assert int(usage["dead_codes"]) == 0
  assert float(usage["perplexity"]) > 8.0


# --- the model --------------------------------------------------------------------------


def _patches(images, p):
  b, s = images.shape[:2]
  x = images.reshape(b, s // p, p, s // p, p, 3).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (s // p) ** 2, p * p * 3)


def _numpy_params(abstract_params, seed=0):
  """Weights N(0, 0.02), biases 0, LayerNorm scales 1, drawn with NumPy.

  The init's distributions without compiling one random kernel per parameter, which
  costs seconds on the shared test CPUs (`model.init` itself is traced, by eval_shape).
  """
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = path[-1].key
    if name in ("kernel", "cls_token", "pos_embed"):
      return jnp.asarray(rng.normal(0.0, 0.02, x.shape), jnp.float32)
    return jnp.full(x.shape, 1.0 if name == "scale" else 0.0, jnp.float32)

  return jax.tree_util.tree_map_with_path(leaf, abstract_params)


@pytest.fixture(scope="module")
def tiny():
  """The tiny VQ-KD, its initial variables, a batch and a toy teacher's features."""
  model = vqkd.VQKD(**TINY)
  rng = np.random.default_rng(8)
  images = jnp.asarray(rng.uniform(-1, 1, size=(B, 32, 32, 3)), jnp.float32)
  # The toy teacher: a fixed random linear map of each patch's pixels.
  proj = rng.normal(size=(8 * 8 * 3, T)) / np.sqrt(8 * 8 * 3)
  teacher = jnp.asarray(_patches(np.asarray(images), 8) @ proj, jnp.float32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), images, teacher)
  assert set(abstract) == {"params", "codebook"}
  # The real codebook init: `quantize` touches no params, so only it is initialised.
  codebook = jax.jit(model.init, static_argnames="method")(
    jax.random.key(0), jnp.zeros((1, GRID, GRID, C)), method=vqkd.VQKD.quantize
  )
  assert set(codebook) == {"codebook"}
  variables = {"params": _numpy_params(abstract["params"]), **codebook}
  return model, variables, images, teacher


def test_variables_mirror_unilm_names_and_keep_the_codebook_out_of_params(tiny):
  model, variables, _, _ = tiny
  assert set(variables) == {"params", "codebook"}
  params = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  shapes = {k: v.shape for k, v in params.items()}
  for prefix, patch, chans, depth in (("encoder", 8, 3, 1), ("decoder", 1, C, 1)):
    assert shapes[f"{prefix}/patch_embed/kernel"] == (patch, patch, chans, 32)
    assert shapes[f"{prefix}/cls_token"] == (1, 1, 32)
    assert shapes[f"{prefix}/pos_embed"] == (1, GRID * GRID + 1, 32)
    assert shapes[f"{prefix}/fc_norm/scale"] == (32,)
    assert {k.split("/")[1] for k in params if k.startswith(prefix + "/blocks_")} == {
      f"blocks_{i}" for i in range(depth)
    }
  assert shapes["encode_task_layer_0/kernel"] == (32, 32)
  assert shapes["encode_task_layer_2/kernel"] == (32, C)
  assert shapes["decode_task_layer_0/kernel"] == (32, 32)
  assert shapes["decode_task_layer_2/kernel"] == (32, T)
  # unilm's fine-tuning ViT: no LayerScale, no relative bias, no mask token, no `norm`.
  assert not [
    k for k in params if any(s in k for s in ("gamma", "relative_position", "mask_token", "/norm/"))
  ]
  codebook = variables["codebook"]
  assert codebook["embedding"].shape == (K, C)
  assert codebook["cluster_size"].shape == (K,)
  assert not bool(codebook["initted"])  # waits for k-means on the first batch
  np.testing.assert_allclose(
    np.linalg.norm(np.asarray(codebook["embedding"]), axis=-1), 1.0, atol=1e-6
  )
  deeper = jax.eval_shape(
    vqkd.VQKD(**dict(TINY, depth=2, decoder_depth=3)).init, jax.random.key(0), *tiny[2:]
  )
  for prefix, depth in (("encoder", 2), ("decoder", 3)):
    assert {k for k in deeper["params"][prefix] if k.startswith("blocks_")} == {
      f"blocks_{i}" for i in range(depth)
    }


def test_bad_teacher_shape_is_one_clear_error(tiny):
  model, variables, images, teacher = tiny
  want = list(teacher.shape)
  got = want[:-1] + [want[-1] - 1]
  with pytest.raises(
    ValueError,
    match=re.escape(f"VQKD: teacher_features {got}: expected {want} (batch, patches, teacher_dim)"),
  ):
    jax.eval_shape(model.apply, variables, images, teacher[..., :-1])


def test_tokenizer_trains_loss_decreases_and_tokens_are_consistent(tiny):
  model, variables, images, teacher = tiny
  tx = optax.adam(3e-3)

  z = jax.jit(lambda v, x: model.apply(v, x, method=vqkd.VQKD.encode))(variables, images)
  assert z.shape == (B, GRID, GRID, C)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(z), axis=-1), 1.0, atol=1e-5)
  codebook = vqkd.init_codebook(variables["codebook"], z, jax.random.key(1))
  assert bool(codebook["initted"])
  np.testing.assert_array_equal(  # once initted, a no-op
    np.asarray(vqkd.init_codebook(codebook, -z, jax.random.key(2))["embedding"]),
    np.asarray(codebook["embedding"]),
  )

  @jax.jit
  def step(params, codebook, opt_state, commitment_weight):
    def loss_fn(params):
      out = model.apply({"params": params, "codebook": codebook}, images, teacher, train=True)
      return out["cosine_loss"] + commitment_weight * out["commitment_loss"], out

    (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    codebook = vqkd.ema_update(codebook, out["z"], out["codes"])
    return optax.apply_updates(params, updates), codebook, opt_state, out, grads

  params = variables["params"]
  opt_state = tx.init(params)
  tokens = jax.jit(functools.partial(vqkd.tokenize, model=model))(
    {"params": params, "codebook": codebook}, images
  )

  # Without the commitment term, the encoder learns only through the straight-through
  # estimator.
  new_params, new_codebook, opt_state, out, grads = step(params, codebook, opt_state, 0.0)
  assert tokens.dtype == jnp.int32 and tokens.shape == (B, GRID, GRID)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(out["codes"]))
  enc_grad = optax.global_norm([grads["encoder"], grads["encode_task_layer_2"]])
  assert float(enc_grad) > 1e-4
  assert float(out["commitment_loss"]) > 0
  np.testing.assert_allclose(
    float(out["loss"]), float(out["cosine_loss"] + out["commitment_loss"]), rtol=1e-6
  )

  params, codebook = new_params, new_codebook
  losses = [float(out["loss"])]
  for _ in range(20):
    params, codebook, opt_state, out, _ = step(params, codebook, opt_state, 1.0)
    losses.append(float(out["loss"]))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.75 * losses[0], losses
  assert float(out["cosine_loss"]) < losses[0] - 0.1, losses
