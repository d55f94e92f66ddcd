"""Tests of the DALL-E discrete VAE (beit_jax/models/dvae.py)."""

import math

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import ndimage, stats

from beit_jax.models import dvae

TINY = dict(vocab_size=64, n_hid=16, n_blk_per_group=1, n_init=16)


def _numpy_init(abstract_params, seed=0):
  """dall_e's init (w ~ N(0, 1/fan_in), b = 0) drawn with NumPy.

  Same distribution as `init` (checked in `test_conv2d_init`), without compiling one
  threefry kernel per parameter, which takes tens of seconds on the shared test CPUs.
  """
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    if path[-1].key == "w":  # [kw, kw, n_in, n_out]
      std = 1 / math.sqrt(math.prod(x.shape[:3]))
      return jnp.asarray(rng.normal(0.0, std, x.shape), jnp.float32)
    return jnp.zeros(x.shape, jnp.float32)

  return jax.tree_util.tree_map_with_path(leaf, abstract_params)


def _abstract_params(module, *args, **kwargs):
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))["params"]


@pytest.fixture(scope="module")
def tiny():
  """A tiny dVAE and its params (shapes do not depend on the image size)."""
  model = dvae.DiscreteVAE(**TINY)
  params = _numpy_init(
    _abstract_params(model, jnp.zeros((1, 32, 32, 3)), temperature=1.0, train=False)
  )
  return model, params


def _smooth_images(seed, batch, size):
  """Random images in [0, 1] with only low spatial frequencies (bilinear upsampled 4x4)."""
  coarse = np.random.default_rng(seed).uniform(size=(batch, 4, 4, 3))
  fine = ndimage.zoom(coarse, (1, size / 4, size / 4, 1), order=1)
  return jnp.asarray(np.clip(fine, 0.0, 1.0), jnp.float32)


def _loss(params, images, key, beta, *, model):
  outputs = model.apply(
    {"params": params}, images, temperature=1.0, train=True, rngs={"gumbel": key}
  )
  return dvae.elbo_loss(outputs, images, beta)


# Shared by the gradient and training tests, so that it is compiled once.
_value_and_grad = jax.jit(jax.value_and_grad(_loss, has_aux=True), static_argnames="model")


def _dall_e_layout(kind, n_hid, n_blk, vocab, n_init):
  """{torch state_dict key: torch shape} of dall_e's Encoder/Decoder, built from its spec."""
  shapes = {}

  def conv(name, n_in, n_out, kw):
    shapes[name + ".w"] = (n_out, n_in, kw, kw)
    shapes[name + ".b"] = (n_out,)

  if kind == "encoder":
    conv("blocks.input", 3, n_hid, 7)
    n_prev, mults, kernels = n_hid, (1, 2, 4, 8), (3, 3, 3, 1)
  else:
    conv("blocks.input", vocab, n_init, 1)
    n_prev, mults, kernels = n_init, (8, 4, 2, 1), (1, 3, 3, 3)
  for g, mult in enumerate(mults, start=1):
    width, hid = mult * n_hid, mult * n_hid // 4
    for j in range(1, n_blk + 1):
      prefix = f"blocks.group_{g}.block_{j}"
      if n_prev != width:
        conv(prefix + ".id_path", n_prev, width, 1)
      for i, (kw, n_in, n_out) in enumerate(
        zip(kernels, (n_prev, hid, hid, hid), (hid, hid, hid, width)), start=1
      ):
        conv(f"{prefix}.res_path.conv_{i}", n_in, n_out, kw)
      n_prev = width
  conv("blocks.output.conv", n_prev, vocab if kind == "encoder" else 6, 1)
  return shapes


def test_shapes_112_to_14x14():
  enc = dvae.Encoder(n_hid=8, n_blk_per_group=1, vocab_size=32)
  x = jax.ShapeDtypeStruct((2, 112, 112, 3), jnp.float32)
  logits = jax.eval_shape(lambda x: enc.init_with_output(jax.random.key(0), x)[0], x)
  assert logits.shape == (2, 14, 14, 32) and logits.dtype == jnp.float32
  dec = dvae.Decoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=32)
  out = jax.eval_shape(lambda z: dec.init_with_output(jax.random.key(0), z)[0], logits)
  assert out.shape == (2, 112, 112, 6) and out.dtype == jnp.float32


def test_conv2d_init():
  conv = dvae.Conv2d(n_out=64, kw=3)
  params = jax.jit(conv.init)(jax.random.key(0), jnp.zeros((1, 3, 3, 48)))["params"]
  assert params["w"].shape == (3, 3, 48, 64)  # HWIO
  np.testing.assert_allclose(np.std(params["w"]), 1 / math.sqrt(48 * 9), rtol=0.03)
  np.testing.assert_allclose(np.mean(params["w"]), 0.0, atol=0.003)
  np.testing.assert_array_equal(params["b"], np.zeros(64))


def test_full_size_layout_and_param_count_match_dall_e():
  model = dvae.DiscreteVAE()  # n_hid 256, vocab 8192, 2 blocks per group, n_init 128
  shapes = jax.eval_shape(
    lambda: model.init(
      {"params": jax.random.key(0)}, jnp.zeros((1, 112, 112, 3)), temperature=1.0, train=False
    )
  )["params"]
  for kind in ("encoder", "decoder"):
    expected = _dall_e_layout(kind, 256, 2, 8192, 128)
    got = {
      ".".join(path): leaf.shape for path, leaf in traverse_util.flatten_dict(shapes[kind]).items()
    }
    assert set(got) == set(expected), kind
    for key, torch_shape in expected.items():
      if key.endswith(".w"):  # torch OIHW <-> flax HWIO
        torch_shape = tuple(torch_shape[i] for i in (2, 3, 1, 0))
      assert got[key] == torch_shape, key
  # Closed forms of the totals: a conv has n_out*n_in*kw*kw + n_out parameters, a block's
  # hidden width is n_out/4 and it has a 1x1 id_path conv only when the width changes.
  conv = lambda n_in, n_out, kw: n_out * n_in * kw * kw + n_out
  id_path = lambda n_in, n_out: conv(n_in, n_out, 1) if n_in != n_out else 0
  enc_blk = lambda n_in, n_out: (
    id_path(n_in, n_out)
    + conv(n_in, n_out // 4, 3)
    + 2 * conv(n_out // 4, n_out // 4, 3)
    + conv(n_out // 4, n_out, 1)
  )
  dec_blk = lambda n_in, n_out: (
    id_path(n_in, n_out)
    + conv(n_in, n_out // 4, 1)
    + 2 * conv(n_out // 4, n_out // 4, 3)
    + conv(n_out // 4, n_out, 3)
  )
  n, vocab = 256, 8192
  enc_total = (
    conv(3, n, 7)
    + enc_blk(n, n)
    + enc_blk(n, n)
    + enc_blk(n, 2 * n)
    + enc_blk(2 * n, 2 * n)
    + enc_blk(2 * n, 4 * n)
    + enc_blk(4 * n, 4 * n)
    + enc_blk(4 * n, 8 * n)
    + enc_blk(8 * n, 8 * n)
    + conv(8 * n, vocab, 1)
  )
  dec_total = (
    conv(vocab, 128, 1)
    + dec_blk(128, 8 * n)
    + dec_blk(8 * n, 8 * n)
    + dec_blk(8 * n, 4 * n)
    + dec_blk(4 * n, 4 * n)
    + dec_blk(4 * n, 2 * n)
    + dec_blk(2 * n, 2 * n)
    + dec_blk(2 * n, n)
    + dec_blk(n, n)
    + conv(n, 6, 1)
  )
  count = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))
  assert count(shapes["encoder"]) == enc_total
  assert count(shapes["decoder"]) == dec_total


@pytest.mark.parametrize("block_cls", [dvae.EncoderBlock, dvae.DecoderBlock])
@pytest.mark.parametrize("n_layers", [8, 2])
def test_post_gain_scales_res_path(block_cls, n_layers):
  block = block_cls(n_out=8, n_layers=n_layers)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 5, 8)), jnp.float32)
  params = _numpy_init(_abstract_params(block, x))
  assert "id_path" not in params  # identity when the width does not change
  # Last res-path conv outputs exactly 1 everywhere, so block(x) - x is the post-gain.
  conv_4 = params["res_path"]["conv_4"]
  params["res_path"]["conv_4"] = {"w": jnp.zeros_like(conv_4["w"]), "b": jnp.ones_like(conv_4["b"])}
  out = jax.jit(block.apply)({"params": params}, x)
  np.testing.assert_allclose(out - x, 1 / n_layers**2, atol=1e-6)
  assert block.post_gain == 1 / n_layers**2
  assert "id_path" in _abstract_params(block_cls(n_out=12, n_layers=n_layers), x)


def test_map_unmap_pixels():
  x = jnp.linspace(0.0, 1.0, 11)
  mapped = dvae.map_pixels(x)
  np.testing.assert_allclose([mapped.min(), mapped.max()], [0.1, 0.9], atol=1e-7)
  np.testing.assert_allclose(dvae.unmap_pixels(mapped), x, atol=1e-6)
  np.testing.assert_array_equal(dvae.unmap_pixels(jnp.array([0.0, 1.0])), [0.0, 1.0])


def test_logit_laplace_nll_matches_density():
  xs = np.array([0.1, 0.3, 0.5, 0.77, 0.9])
  mu, log_scale = 0.4, -0.7
  nll = dvae.logit_laplace_nll(jnp.asarray(xs), mu, log_scale)
  # Change of variables: p(x) = Laplace(logit x; mu, b) / (x (1 - x)).
  logit = np.log(xs / (1 - xs))
  expected = -stats.laplace.logpdf(logit, loc=mu, scale=np.exp(log_scale)) + np.log(xs * (1 - xs))
  np.testing.assert_allclose(nll, expected, rtol=1e-5)

  # Integrates to 1 over (0, 1) (scales b <= 1 keep the density bounded for the quadrature).
  grid = np.linspace(0.0, 1.0, 200_001)[1:-1]
  for m, s in [(0.0, 0.0), (1.5, -1.0), (-0.8, -0.3)]:
    density = np.exp(-np.asarray(dvae.logit_laplace_nll(jnp.asarray(grid), m, s), np.float64))
    np.testing.assert_allclose(np.trapezoid(density, grid), 1.0, atol=1e-3)

  # For a fixed pixel the NLL is minimised at mu = logit(x).
  mus = jnp.linspace(-3, 3, 601)
  for x in (0.2, 0.5, 0.85):
    best = mus[jnp.argmin(dvae.logit_laplace_nll(jnp.full_like(mus, x), mus, 0.0))]
    np.testing.assert_allclose(best, math.log(x / (1 - x)), atol=0.01)


def test_kl_to_uniform():
  vocab = 64
  np.testing.assert_allclose(dvae.kl_to_uniform(jnp.zeros((2, 3, 3, vocab))), 0.0, atol=1e-6)
  one_hot = 100.0 * jax.nn.one_hot(jnp.arange(18).reshape(2, 3, 3) % vocab, vocab)
  np.testing.assert_allclose(dvae.kl_to_uniform(one_hot), math.log(vocab), rtol=1e-5)


def test_elbo_loss_normalisation():
  b, h, w, vocab = 2, 2, 3, 16
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(size=(b, 8 * h, 8 * w, 3)), jnp.float32)
  mu = jnp.asarray(rng.normal(size=images.shape), jnp.float32)
  outputs = {
    "logits": jnp.asarray(rng.normal(size=(b, h, w, vocab)), jnp.float32),
    "mu": mu,
    "log_scale": jnp.full(images.shape, -0.5),
    "recon": dvae.unmap_pixels(jax.nn.sigmoid(mu)),
  }
  loss, metrics = dvae.elbo_loss(outputs, images, kl_weight=6.6)
  nll = dvae.logit_laplace_nll(dvae.map_pixels(images), mu, -0.5)
  # Recon is summed over each image's pixels, then divided by its h*w latent positions.
  np.testing.assert_allclose(metrics["recon_nll"], nll.sum() / (b * h * w), rtol=1e-5)
  np.testing.assert_allclose(metrics["kl"], dvae.kl_to_uniform(outputs["logits"]), rtol=1e-6)
  np.testing.assert_allclose(loss, metrics["recon_nll"] + 6.6 * metrics["kl"], rtol=1e-6)
  np.testing.assert_allclose(metrics["mse"], jnp.mean((outputs["recon"] - images) ** 2), rtol=1e-6)


def test_tokenize_and_decode(tiny):
  model, params = tiny
  images = _smooth_images(3, 2, 32)
  tokenize = jax.jit(dvae.tokenize, static_argnames="model")
  tokens = tokenize(params, images, model=model)
  assert tokens.dtype == jnp.int32 and tokens.shape == (2, 4, 4)
  assert int(tokens.min()) >= 0 and int(tokens.max()) < TINY["vocab_size"]
  outputs = jax.jit(lambda p, x: model.apply({"params": p}, x, temperature=1.0, train=False))(
    params, images
  )
  np.testing.assert_array_equal(tokens, jnp.argmax(outputs["logits"], -1))
  # The encoder params alone suffice (what the MIM train step carries).
  np.testing.assert_array_equal(
    tokenize({"encoder": params["encoder"]}, images, model=model), tokens
  )
  # Eval mode decodes the hard tokens: the same images as `decode_tokens`.
  recon = jax.jit(
    lambda p, t: model.apply({"params": p}, t, method=dvae.DiscreteVAE.decode_tokens)
  )(params, tokens)
  assert recon.shape == images.shape
  assert float(recon.min()) >= 0.0 and float(recon.max()) <= 1.0
  np.testing.assert_allclose(outputs["recon"], recon, atol=1e-6)


def test_gradient_flows_through_relaxation(tiny):
  model, params = tiny
  # kl_weight 0: the reconstruction term reaches the encoder only through the relaxed codes.
  (loss, _), grads = _value_and_grad(
    params, _smooth_images(5, 8, 32), jax.random.key(6), 0.0, model=model
  )
  leaves = jax.tree_util.tree_leaves(grads["encoder"])
  assert np.isfinite(float(loss))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)


def test_schedules():
  steps = jnp.arange(0, 121)
  temp = np.asarray(jax.jit(lambda s: dvae.gumbel_temperature(s, anneal_steps=100))(steps))
  np.testing.assert_allclose(
    temp[[0, 50, 100, 120]], [1.0, (1 + 1 / 16) / 2, 1 / 16, 1 / 16], rtol=1e-6
  )
  assert np.all(np.diff(temp[:101]) < 0)
  beta = np.asarray(dvae.kl_weight(steps, end=6.6, warmup_steps=40))
  np.testing.assert_allclose(beta[[0, 20, 40, 120]], [0.0, 3.3, 6.6, 6.6], rtol=1e-6, atol=1e-6)
  assert np.all(np.diff(beta[:41]) > 0)
  np.testing.assert_allclose(dvae.kl_weight(0, end=2.0, warmup_steps=0), 2.0)
  with pytest.raises(ValueError, match="^kl_weight: warmup_steps -1 is not >= 0$"):
    dvae.kl_weight(0, end=2.0, warmup_steps=-1)


def test_bad_sizes_and_shapes_are_value_errors_naming_them():
  with pytest.raises(ValueError, match=r"^dVAE Encoder: n_hid 6 is not a positive multiple of 4"):
    _abstract_params(dvae.Encoder(n_hid=6), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(
    ValueError,
    match=r"^dVAE Encoder: images \[1, 60, 60, 3\]: height and "
    "width must be multiples of 8",
  ):
    _abstract_params(dvae.Encoder(n_hid=8), jnp.zeros((1, 60, 60, 3)))
  with pytest.raises(
    ValueError,
    match=r"^dVAE Decoder: codes \[1, 2, 2, 8\]: expected "
    r"\[B, h, w, 16\] \(vocab_size\)",
  ):
    _abstract_params(dvae.Decoder(n_hid=8, vocab_size=16), jnp.zeros((1, 2, 2, 8)))
  with pytest.raises(ValueError, match=r"^dVAE Decoder: group_count 0 is not >= 1"):
    _abstract_params(dvae.Decoder(n_hid=8, vocab_size=16, group_count=0), jnp.zeros((1, 2, 2, 16)))


def test_few_adam_steps_reduce_loss(tiny):
  model, params = tiny
  images = _smooth_images(7, 8, 32)
  tx = optax.adam(2e-3)
  update = jax.jit(lambda g, o, p: tx.update(g, o, p))
  eval_key = jax.random.key(8)  # the same Gumbel noise before and after
  (initial, metrics0), _ = _value_and_grad(params, images, eval_key, 0.1, model=model)
  p, opt_state = params, tx.init(params)
  for i in range(60):
    _, grads = _value_and_grad(
      p, images, jax.random.fold_in(jax.random.key(9), i), 0.1, model=model
    )
    updates, opt_state = update(grads, opt_state, p)
    p = optax.apply_updates(p, updates)
  (final, metrics), _ = _value_and_grad(p, images, eval_key, 0.1, model=model)
  initial, final = float(initial), float(final)
  assert np.isfinite(final) and final < initial - 0.5 * abs(initial), (initial, final)
  # Not only a sharper likelihood: the reconstructions themselves get closer.
  assert float(metrics["mse"]) < 0.75 * float(metrics0["mse"]), (metrics0, metrics)
