"""Attention (`vit.dot_product_attention`) and mixed precision, on CPU.

The fused path (`jax.nn.dot_product_attention`: cuDNN's kernel on a GPU) against the
explicit einsum-softmax formulation, the padding cuDNN needs at BEiT's odd length, that
the CPU path is today's formulation bit for bit (the recorded CPU figures depend on it),
and bfloat16 compute with float32 parameters, softmax and loss. The cuDNN cases run only
on a CUDA GPU.
"""

import flax
import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from beit_jax.training import hardware
from beit_jax.training import mim_objective
from beit_jax.models import vit

TINY = dict(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, image_size=24)
VOCAB = 10
ON_CUDA = vit._on_cuda()  # pylint: disable=protected-access


def _qkv(shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3)]


def _bias(heads, t, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(0, 0.5, (heads, t, t)), jnp.float32)


def _old_attention(q, k, v, biases, dtype):
  """The attention of models/vit.py before `dot_product_attention` (commit 0e19f7e)."""
  q = q * q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
  for b in biases:
    logits = logits + b
  attn = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", attn.astype(dtype), v), attn


def _reference(q, k, v, bias):
  """float64 numpy: softmax(q k^T / sqrt(hd) + bias) v."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def _f32(x):
  return np.asarray(x, np.float32)


# ----------------------------------------------------------------- the function
@pytest.mark.parametrize("t", [17, 16])  # odd: the padded path (BEiT's N+1); even: none
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_matches_einsum_float32(t, with_bias):
  q, k, v = _qkv((2, t, 4, 16), jnp.float32)
  bias = _bias(4, t) if with_bias else None
  run = jax.jit(vit.dot_product_attention, static_argnames=("implementation",))
  einsum, probs = run(q, k, v, bias, implementation="einsum")
  fused, none = run(q, k, v, bias, implementation="xla")
  assert none is None and probs.dtype == jnp.float32 and fused.dtype == jnp.float32
  np.testing.assert_allclose(fused, einsum, atol=2e-6, rtol=0)
  np.testing.assert_allclose(einsum, _reference(q, k, v, bias), atol=2e-6, rtol=0)

  def grads(impl):
    def loss(q, k, v, bias):
      return jnp.sum(vit.dot_product_attention(q, k, v, bias, implementation=impl)[0] ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3) if with_bias else (0, 1, 2)))(q, k, v, bias)

  for a, b in zip(grads("xla"), grads("einsum")):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_matches_einsum_bfloat16(with_bias):
  q, k, v = _qkv((2, 17, 4, 16), jnp.bfloat16)
  bias = _bias(4, 17) if with_bias else None
  ref = _reference(q, k, v, bias)
  for impl in ("einsum", "xla"):
    out, _ = vit.dot_product_attention(q, k, v, bias, implementation=impl)
    assert out.dtype == jnp.bfloat16
    # bfloat16 keeps 8 bits: outputs of size ~1 within a few of its ulps (2^-8).
    np.testing.assert_allclose(_f32(out), ref, atol=3e-2, rtol=0)


def test_default_is_todays_formulation_on_cpu():
  """The path a CPU run takes is the old code's, bit for bit, with both biases."""
  q, k, v = _qkv((2, 17, 4, 16), jnp.float32)
  biases = [_bias(4, 17, 1), _bias(4, 17, 2)]
  assert vit.attention_implementation(jnp.float32, 16) == "einsum"
  if not ON_CUDA:
    assert vit.attention_implementation(jnp.bfloat16, 64) == "einsum"
  new, p_new = jax.jit(vit.dot_product_attention)(q, k, v, biases)
  old, p_old = jax.jit(lambda *a: _old_attention(*a, jnp.float32))(q, k, v, biases)
  np.testing.assert_array_equal(new, old)
  np.testing.assert_array_equal(p_new, p_old)


def test_implementation_choice(monkeypatch):
  monkeypatch.setattr(vit, "_on_cuda", lambda: True)
  pick = vit.attention_implementation
  assert pick(jnp.bfloat16, 64) == "cudnn" and pick(jnp.float16, 80) == "cudnn"
  assert pick(jnp.float32, 64) == "einsum"  # cuDNN's kernel: half precision only
  assert pick(jnp.bfloat16, 12) == "einsum"  # head dim not a multiple of 8
  assert pick(jnp.bfloat16, 64, return_probs=True) == "einsum"  # the maps asked for
  q, k, v = _qkv((1, 5, 2, 8), jnp.float32)
  with pytest.raises(
    ValueError,
    match=r"^dot_product_attention: implementation 'xla' has no "
    r"probabilities \(return_probs\); use 'einsum'$",
  ):
    vit.dot_product_attention(q, k, v, return_probs=True, implementation="xla")
  with pytest.raises(
    ValueError,
    match=r"^dot_product_attention: implementation 'flash' is "
    r"not one of \('einsum', 'xla', 'cudnn'\)$",
  ):
    vit.dot_product_attention(q, k, v, implementation="flash")


# -------------------------------------------------------------------- the model
def _model_and_params(**kw):
  model = vit.VisionTransformer(**TINY, vocab_size=VOCAB, **kw)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 24, 24, 3)), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype), shapes)
  return model, params, images


def _fused_everywhere(monkeypatch):
  """Makes the model take the fused path ('xla': cuDNN's stand-in on CPU) where a GPU
  would take cuDNN's, i.e. whenever the maps are not asked for."""
  monkeypatch.setattr(
    vit,
    "attention_implementation",
    lambda dtype, head_dim, return_probs=False: "einsum" if return_probs else "xla",
  )


@pytest.mark.parametrize("bias", ["shared", "per_block", "none"])
def test_vit_mim_logits_fused_vs_einsum(monkeypatch, bias):
  kw = dict(
    shared=dict(),
    per_block=dict(use_shared_rel_pos_bias=False, use_rel_pos_bias=True),
    none=dict(use_shared_rel_pos_bias=False, use_abs_pos_emb=True),
  )[bias]
  model, params, images = _model_and_params(**kw)
  mask = np.random.default_rng(4).random((2, 9)) < 0.4
  run = lambda m: jax.jit(m.apply)({"params": params}, images, mask)["mim_logits"]
  ref = run(model)
  with monkeypatch.context() as m:
    _fused_everywhere(m)
    np.testing.assert_allclose(run(model.clone()), ref, atol=1e-5, rtol=0)
    bf16 = model.clone(dtype=jnp.bfloat16)
    out = run(bf16)
  assert out.dtype == jnp.float32
  # Logits of size ~1: fused vs einsum in bfloat16 (measured 2e-3), and vs float32 (5e-3).
  np.testing.assert_allclose(out, run(bf16), atol=1e-2, rtol=0)
  np.testing.assert_allclose(out, ref, atol=2e-2, rtol=0)


@pytest.mark.parametrize("scan", [False, True])
def test_attention_maps_still_returned_on_the_fused_path(monkeypatch, scan):
  model, params, images = _model_and_params()
  if scan:  # the same blocks, stacked
    model = model.clone(scan_layers=True)
    blocks = [params.pop(f"blocks_{i}") for i in range(2)]
    params["blocks"] = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
  ref = model.apply({"params": params}, images, return_attention=True)
  _fused_everywhere(monkeypatch)
  out = model.apply({"params": params}, images, return_attention=True)
  assert len(out["attention"]) == 2
  for a, b in zip(out["attention"], ref["attention"]):
    assert a.dtype == jnp.float32 and a.shape == (2, 2, 10, 10)
    np.testing.assert_array_equal(a, b)
  plain = model.apply({"params": params}, images)
  np.testing.assert_allclose(plain["mim_logits"], ref["mim_logits"], atol=1e-5, rtol=0)


# ------------------------------------------------------------ mixed precision
def _eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax_core.jaxprs_in_params(eqn.params):
      yield from _eqns(sub)


def test_bfloat16_compute_with_float32_params_softmax_and_loss():
  model, _, images = _model_and_params()
  model = model.clone(dtype=jnp.bfloat16)
  params = jax.jit(model.init)(jax.random.key(0), images)["params"]
  assert {str(p.dtype) for p in jax.tree.leaves(params)} == {"float32"}
  positions = jnp.asarray([[0, 3, 5], [1, 2, 8]])
  targets = jnp.asarray([[1, 2, 3], [4, 5, 6]])

  def loss_fn(params):
    out = model.apply({"params": params}, images, mim_positions=positions)
    assert out["mim_logits"].dtype == jnp.float32 and out["tokens"].dtype == jnp.float32
    return mim_objective.mim_loss(out["mim_logits"], targets, jnp.ones((2, 3)))[0]

  loss, grads = jax.value_and_grad(loss_fn)(params)
  assert loss.dtype == jnp.float32 and np.isfinite(loss)
  assert {str(g.dtype) for g in jax.tree.leaves(grads)} == {"float32"}
  # Every matmul and convolution, forward and backward (dense layers, attention, the
  # head), multiplies bfloat16; every exp of the forward pass (the attention softmax, the
  # loss's log-softmax) is float32.
  eqns = list(_eqns(jax.make_jaxpr(jax.value_and_grad(loss_fn))(params).jaxpr))
  dots = [e for e in eqns if e.primitive.name in ("dot_general", "conv_general_dilated")]
  assert len(dots) > 3 * 2 * 6  # forward and backward of 2 blocks' 6 matmuls and more
  assert {str(v.aval.dtype) for e in dots for v in e.invars} == {"bfloat16"}
  exps = [e for e in _eqns(jax.make_jaxpr(loss_fn)(params).jaxpr) if e.primitive.name == "exp"]
  assert len(exps) >= 3  # 2 blocks' softmax, the loss
  assert {str(v.aval.dtype) for e in exps for v in e.invars} == {"float32"}


# ------------------------------------------------------------------ FLOP count
def test_fused_attention_flops_from_hlo_text():
  fwd = (
    "%cc = (bf16[8,198,12,64]{3,2,1,0}, f32[8,12,198]{2,1,0}) custom-call("
    "bf16[8,198,12,64]{3,2,1,0} %q, bf16[8,198,12,64]{3,2,1,0} %k), "
    'custom_call_target="__cudnn$fmhaScaleBiasSoftmax", backend_config={}'
  )
  bwd = fwd.replace('Softmax"', 'SoftmaxBackward"')
  one = 4.0 * 8 * 12 * 198**2 * 64
  assert hardware.fused_attention_flops(fwd) == one
  assert hardware.fused_attention_flops("\n".join([fwd, bwd, "%d = f32[2] add(%a, %b)"])) == 3 * one
  assert hardware.fused_attention_flops('custom_call_target="__cublas$gemm"') == 0


# ----------------------------------------------------------- on a CUDA GPU only
@pytest.mark.skipif(not ON_CUDA, reason="cuDNN fused attention needs a CUDA GPU")
@pytest.mark.parametrize("with_bias", [True, False])
def test_cudnn_matches_einsum_at_b16_shapes(with_bias):
  q, k, v = _qkv((4, 197, 12, 64), jnp.bfloat16)
  bias = _bias(12, 197) if with_bias else None
  assert vit.attention_implementation(jnp.bfloat16, 64) == "cudnn"

  def loss(impl):
    return lambda q, k, v, bias: jnp.sum(
      vit.dot_product_attention(q, k, v, bias, implementation=impl)[0].astype(jnp.float32) ** 2
    )

  argnums = (0, 1, 2, 3) if with_bias else (0, 1, 2)
  cudnn = jax.jit(jax.grad(loss("cudnn"), argnums=argnums))
  assert "__cudnn$fmha" in cudnn.lower(q, k, v, bias).compile().as_text()
  out, _ = vit.dot_product_attention(q, k, v, bias, implementation="cudnn")
  np.testing.assert_allclose(_f32(out), _reference(q, k, v, bias), atol=3e-2, rtol=0)
  ref = jax.jit(jax.grad(loss("einsum"), argnums=argnums))(q, k, v, bias)
  for a, b in zip(cudnn(q, k, v, bias), ref):
    scale = float(np.abs(_f32(b)).max())
    np.testing.assert_allclose(_f32(a), _f32(b), atol=0.05 * scale, rtol=0)


def test_param_tree_unchanged():
  """Names and shapes as before (checkpoints and converters depend on them)."""
  model, params, _ = _model_and_params(use_rel_pos_bias=True)
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  attn = {k: v.shape for k, v in flat.items() if k.startswith("blocks_0/attn/")}
  assert attn == {
    "blocks_0/attn/qkv/kernel": (32, 3, 32),
    "blocks_0/attn/q_bias": (32,),
    "blocks_0/attn/v_bias": (32,),
    "blocks_0/attn/proj/kernel": (32, 32),
    "blocks_0/attn/proj/bias": (32,),
    "blocks_0/attn/relative_position_bias_table": (5 * 5 + 3, 2),
  }
