"""Tests of the DALL-E discrete VAE (beit_jax/models/dvae.py)."""
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import integrate, stats

from beit_jax.errors import ConfigError
from beit_jax.models import dvae

TINY = dict(vocab_size=64, n_hid=16, n_blk_per_group=1, n_init=16)


@pytest.fixture(scope="module")
def tiny():
  """A tiny dVAE and its params (initialised at 32x32, usable at any multiple of 8)."""
  model = dvae.DiscreteVAE(**TINY)
  params = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)),
                      temperature=1.0, train=False)["params"]
  return model, params


def _smooth_images(key, batch, size):
  """Random images in [0, 1] with only low spatial frequencies (bilinear upsampled 4x4)."""
  coarse = jax.random.uniform(key, (batch, 4, 4, 3))
  return jax.image.resize(coarse, (batch, size, size, 3), "bilinear")


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
          zip(kernels, (n_prev, hid, hid, hid), (hid, hid, hid, width)), start=1):
        conv(f"{prefix}.res_path.conv_{i}", n_in, n_out, kw)
      n_prev = width
  conv("blocks.output.conv", n_prev, vocab if kind == "encoder" else 6, 1)
  return shapes


def test_shapes_112_to_14x14():
  enc = dvae.Encoder(n_hid=8, n_blk_per_group=1, vocab_size=32)
  x = jnp.zeros((2, 112, 112, 3))
  logits, _ = enc.init_with_output(jax.random.key(0), x)
  assert logits.shape == (2, 14, 14, 32) and logits.dtype == jnp.float32
  dec = dvae.Decoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=32)
  out, _ = dec.init_with_output(jax.random.key(1), jax.nn.softmax(logits))
  assert out.shape == (2, 112, 112, 6)


def test_full_size_layout_and_param_count_match_dall_e():
  model = dvae.DiscreteVAE()  # n_hid 256, vocab 8192, 2 blocks per group, n_init 128
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0)}, jnp.zeros((1, 112, 112, 3)), temperature=1.0,
      train=False))["params"]
  for kind in ("encoder", "decoder"):
    expected = _dall_e_layout(kind, 256, 2, 8192, 128)
    got = {".".join(path): leaf.shape
           for path, leaf in flax.traverse_util.flatten_dict(shapes[kind]).items()}
    assert set(got) == set(expected), kind
    for key, torch_shape in expected.items():
      if key.endswith(".w"):  # torch OIHW <-> flax HWIO
        torch_shape = tuple(torch_shape[i] for i in (2, 3, 1, 0))
      assert got[key] == torch_shape, key
    n_params = sum(math.prod(s) for s in got.values())
    assert n_params == sum(math.prod(s) for s in expected.values())
  conv = lambda n_in, n_out, kw: n_out * n_in * kw * kw + n_out
  # Closed form of one encoder block with hidden width n_out/4, and the encoder total.
  enc_blk = lambda n_in, n_out: ((conv(n_in, n_out, 1) if n_in != n_out else 0)
                                 + conv(n_in, n_out // 4, 3) + 2 * conv(n_out // 4, n_out // 4, 3)
                                 + conv(n_out // 4, n_out, 1))
  n = 256
  enc_total = (conv(3, n, 7) + 2 * enc_blk(n, n) + enc_blk(n, 2 * n) + enc_blk(2 * n, 2 * n)
               + enc_blk(2 * n, 4 * n) + enc_blk(4 * n, 4 * n) + enc_blk(4 * n, 8 * n)
               + enc_blk(8 * n, 8 * n) + conv(8 * n, 8192, 1))
  assert sum(x.size for x in jax.tree_util.tree_leaves(shapes["encoder"])) == enc_total


@pytest.mark.parametrize("block_cls", [dvae.EncoderBlock, dvae.DecoderBlock])
@pytest.mark.parametrize("n_layers", [8, 2])
def test_post_gain_scales_res_path(block_cls, n_layers):
  block = block_cls(n_out=8, n_layers=n_layers)
  x = jax.random.normal(jax.random.key(0), (1, 5, 5, 8))
  params = block.init(jax.random.key(1), x)["params"]
  assert "id_path" not in params  # identity when the width does not change
  # Last res-path conv outputs exactly 1 everywhere, so block(x) - x is the post-gain.
  conv_4 = params["res_path"]["conv_4"]
  params["res_path"]["conv_4"] = {"w": jnp.zeros_like(conv_4["w"]),
                                  "b": jnp.ones_like(conv_4["b"])}
  out = block.apply({"params": params}, x)
  np.testing.assert_allclose(out - x, 1 / n_layers**2, atol=1e-6)
  assert block.post_gain == 1 / n_layers**2
  assert "id_path" in block_cls(n_out=12, n_layers=n_layers).init(
      jax.random.key(1), x)["params"]


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
  expected = -stats.laplace.logpdf(logit, loc=mu, scale=np.exp(log_scale)) + np.log(
      xs * (1 - xs))
  np.testing.assert_allclose(nll, expected, rtol=1e-5)

  density = lambda x, m, s: float(np.exp(-dvae.logit_laplace_nll(jnp.float32(x), m, s)))
  for m, s in [(0.0, 0.0), (1.5, -1.0), (-0.8, 0.5)]:
    total, _ = integrate.quad(density, 1e-6, 1 - 1e-6, args=(m, s), points=[
        1 / (1 + math.exp(-m))], limit=200)
    np.testing.assert_allclose(total, 1.0, atol=2e-3)

  # For a fixed pixel the NLL is minimised at mu = logit(x).
  mus = jnp.linspace(-3, 3, 601)
  for x in (0.2, 0.5, 0.85):
    best = mus[jnp.argmin(dvae.logit_laplace_nll(jnp.full_like(mus, x), mus, 0.0))]
    np.testing.assert_allclose(best, math.log(x / (1 - x)), atol=0.01)


def test_kl_to_uniform():
  vocab = 64
  np.testing.assert_allclose(dvae.kl_to_uniform(jnp.zeros((2, 3, 3, vocab))), 0.0,
                             atol=1e-6)
  one_hot = 100.0 * jax.nn.one_hot(jnp.arange(18).reshape(2, 3, 3) % vocab, vocab)
  np.testing.assert_allclose(dvae.kl_to_uniform(one_hot), math.log(vocab), rtol=1e-5)


def test_elbo_loss_normalisation():
  b, h, w, vocab = 2, 2, 3, 16
  key1, key2, key3 = jax.random.split(jax.random.key(0), 3)
  images = jax.random.uniform(key1, (b, 8 * h, 8 * w, 3))
  mu = jax.random.normal(key2, images.shape)
  outputs = {"logits": jax.random.normal(key3, (b, h, w, vocab)), "mu": mu,
             "log_scale": jnp.full(images.shape, -0.5),
             "recon": dvae.unmap_pixels(jax.nn.sigmoid(mu))}
  loss, metrics = dvae.elbo_loss(outputs, images, kl_weight=6.6)
  nll = dvae.logit_laplace_nll(dvae.map_pixels(images), mu, -0.5)
  # Recon is summed over each image's pixels, then divided by its h*w latent positions.
  np.testing.assert_allclose(metrics["recon_nll"], nll.sum() / (b * h * w), rtol=1e-5)
  np.testing.assert_allclose(metrics["kl"], dvae.kl_to_uniform(outputs["logits"]),
                             rtol=1e-6)
  np.testing.assert_allclose(loss, metrics["recon_nll"] + 6.6 * metrics["kl"], rtol=1e-6)
  np.testing.assert_allclose(metrics["mse"], jnp.mean((outputs["recon"] - images)**2),
                             rtol=1e-6)


def test_tokenize(tiny):
  model, params = tiny
  images = _smooth_images(jax.random.key(3), 3, 64)
  tokens = jax.jit(dvae.tokenize, static_argnames="model")(params, images, model=model)
  assert tokens.dtype == jnp.int32 and tokens.shape == (3, 8, 8)
  assert int(tokens.min()) >= 0 and int(tokens.max()) < TINY["vocab_size"]
  logits = model.apply({"params": params}, images, method=dvae.DiscreteVAE.encode)
  np.testing.assert_array_equal(tokens, jnp.argmax(logits, -1))
  # The encoder params alone suffice (what the MIM train step carries).
  enc_only = dvae.tokenize({"encoder": params["encoder"]}, images, model=model)
  np.testing.assert_array_equal(enc_only, tokens)


def test_eval_mode_uses_hard_tokens(tiny):
  model, params = tiny
  images = _smooth_images(jax.random.key(4), 2, 32)
  outputs = model.apply({"params": params}, images, temperature=1.0, train=False)
  tokens = dvae.tokenize(params, images, model=model)
  recon = model.apply({"params": params}, tokens, method=dvae.DiscreteVAE.decode_tokens)
  assert recon.shape == images.shape
  assert float(recon.min()) >= 0.0 and float(recon.max()) <= 1.0
  np.testing.assert_allclose(outputs["recon"], recon, atol=1e-6)


def test_gradient_flows_through_relaxation(tiny):
  model, params = tiny
  images = _smooth_images(jax.random.key(5), 2, 32)

  def encoder_grads(train):
    def loss_fn(p):
      outputs = model.apply({"params": p}, images, temperature=0.5, train=train,
                            rngs={"gumbel": jax.random.key(6)})
      return dvae.elbo_loss(outputs, images, kl_weight=0.0)[0]  # reconstruction only
    return jax.tree_util.tree_leaves(jax.grad(loss_fn)(params)["encoder"])

  relaxed = encoder_grads(train=True)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in relaxed)
  assert sum(float(jnp.sum(jnp.abs(g))) for g in relaxed) > 0
  # Hard argmax codes pass no gradient: the relaxation is what trains the encoder.
  assert sum(float(jnp.sum(jnp.abs(g))) for g in encoder_grads(train=False)) == 0


def test_schedules():
  steps = jnp.arange(0, 121)
  temp = jax.jit(lambda s: dvae.gumbel_temperature(s, anneal_steps=100))(steps)
  np.testing.assert_allclose(temp[[0, 50, 100, 120]], [1.0, (1 + 1 / 16) / 2, 1 / 16, 1 / 16],
                             rtol=1e-6)
  assert bool(jnp.all(jnp.diff(temp[:101]) < 0))
  beta = dvae.kl_weight(steps, end=6.6, warmup_steps=40)
  np.testing.assert_allclose(beta[[0, 20, 40, 120]], [0.0, 3.3, 6.6, 6.6], rtol=1e-6,
                             atol=1e-6)
  assert bool(jnp.all(jnp.diff(beta[:41]) > 0))
  np.testing.assert_allclose(dvae.kl_weight(0, end=2.0, warmup_steps=0), 2.0)
  with pytest.raises(ConfigError, match="warmup_steps"):
    dvae.kl_weight(0, end=2.0, warmup_steps=-1)


def test_config_errors():
  with pytest.raises(ConfigError, match="n_hid"):
    dvae.Encoder(n_hid=6).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ConfigError, match="multiples of 8"):
    dvae.Encoder(n_hid=8).init(jax.random.key(0), jnp.zeros((1, 60, 60, 3)))
  with pytest.raises(ConfigError, match="vocab"):
    dvae.Decoder(n_hid=8, vocab_size=16).init(jax.random.key(0), jnp.zeros((1, 2, 2, 8)))


def test_few_adam_steps_reduce_loss(tiny):
  model, params = tiny
  images = _smooth_images(jax.random.key(7), 8, 32)
  tx = optax.adam(2e-3)

  def loss_fn(p, key):
    outputs = model.apply({"params": p}, images, temperature=1.0, rngs={"gumbel": key})
    return dvae.elbo_loss(outputs, images, kl_weight=0.1)[0]

  @jax.jit
  def step(p, opt_state, key):
    loss, grads = jax.value_and_grad(loss_fn)(p, key)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  eval_key = jax.random.key(8)
  initial = float(loss_fn(params, eval_key))
  p, opt_state = params, tx.init(params)
  for i in range(60):
    p, opt_state, _ = step(p, opt_state, jax.random.fold_in(jax.random.key(9), i))
  final = float(loss_fn(p, eval_key))
  assert np.isfinite(final) and final < initial - 0.5 * abs(initial), (initial, final)
