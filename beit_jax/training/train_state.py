"""The training state every trainer shares, its shardings, the gradient of a step's loss
(over micro-batches with gradient accumulation: `value_and_grad`) and the guarded optimizer
update.

One place builds the state: `abstract` gives its shapes and shardings without allocating
anything (what "will it fit" and ahead-of-time compilation need), `create` allocates it
directly in those shardings.
"""

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from beit_jax.training import sharding
from beit_jax.models.paths import AxesTable


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: steps taken (skipped ones included)
  params: Any
  opt_state: Any
  bad_steps: jax.Array  # int32 scalar: consecutive steps skipped as non-finite


def _initial(
  init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation
) -> Callable[[jax.Array], TrainState]:
  def init(rng):
    params = init_params(rng)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      bad_steps=jnp.zeros((), jnp.int32),
    )

  return init


def abstract(
  init_params: Callable[[jax.Array], Any],
  tx: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
  sharding_cfg,
  param_axes: AxesTable,
) -> tuple[TrainState, Any]:
  """(shape-only state: ShapeDtypeStructs carrying their shardings, the shardings).

  `param_axes`: the logical axes of the model's weights (its module's PARAM_AXES).
  """
  shapes = jax.eval_shape(_initial(init_params, tx), jax.random.key(0))
  shardings = sharding.param_shardings(shapes, mesh, sharding_cfg, param_axes)
  structs = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
  )
  return structs, shardings


def create(
  init_params: Callable[[jax.Array], Any],
  tx: optax.GradientTransformation,
  rng: jax.Array,
  mesh: jax.sharding.Mesh,
  sharding_cfg,
  param_axes: AxesTable,
) -> tuple[TrainState, Any]:
  """Initialises params and optimizer state directly in their shardings.

  Returns the state and its shardings (for the jitted step's in/out shardings).
  """
  _, shardings = abstract(init_params, tx, mesh, sharding_cfg, param_axes)
  return jax.jit(_initial(init_params, tx), out_shardings=shardings)(rng), shardings


def apply_gradients(
  state: TrainState, grads: Any, loss: jax.Array, tx
) -> tuple[TrainState, dict[str, jax.Array]]:
  """The optimizer update, or no change at all when the loss or a gradient is not finite.

  A skipped step leaves params and optimizer state bit-identical (one bad batch
  must not cost the run); it still advances `step`, so the data and random streams
  move on, and it counts in `bad_steps` until a good step resets it.
  """
  grad_norm = optax.global_norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  new_state = TrainState(
    step=state.step + 1,
    params=keep(params, state.params),
    opt_state=keep(opt_state, state.opt_state),
    bad_steps=jnp.where(ok, 0, state.bad_steps + 1),
  )
  return new_state, {"grad_norm": grad_norm, "skipped_steps": 1 - ok.astype(jnp.float32)}


def split_micro(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [k, B/k, ...]: micro-batch i is rows i, i + k, i + 2k, ... (strided, so each
  stays spread over the data-parallel devices: a device's B/D rows hold B/(D k) of each)."""
  micro = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
  return nn.with_logical_constraint(micro, (None, "batch") + (None,) * (x.ndim - 1))


def merge_micro(x: jax.Array) -> jax.Array:
  """`split_micro`'s inverse: [k, B/k, ...] -> [B, ...] in the batch's order."""
  return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def value_and_grad(
  loss_fn: Callable,
  params: Any,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  accum_steps: int = 1,
  *,
  weight: Callable[[dict[str, jax.Array]], jax.Array] | None = None,
):
  """`jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)`, over `accum_steps`
  micro-batches of `batch` when > 1 (gradient accumulation inside one step).

  `loss_fn(params, batch, rng) -> (loss, (metrics, outputs))`: `loss` and every leaf of
  `metrics` are means over the batch's items, the `weight(batch)` of them (default: the
  same count for every micro-batch, e.g. its examples; MIM: its masked patches); `outputs`
  are per-example arrays [b, ...].

  With `accum_steps=1` this is exactly `jax.value_and_grad`. With k > 1 the leading axis of
  every leaf of `batch` is split into k strided micro-batches (`split_micro`), micro-batch i
  gets `fold_in(rng, i)`, and a `jax.lax.scan` runs `loss_fn` and its gradient on each:
  loss, metrics and gradients are combined as weighted means (float32 sums, the gradient
  cast back to the params' dtype), `outputs` re-assembled in the batch's order. So the
  result is the whole batch's to float rounding, where `loss_fn` has no randomness that
  depends on the batch's shape (dropout, drop path); activations are held for one
  micro-batch at a time, the summed gradient (one float32 copy of the params) on top.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    return grad_fn(params, batch, rng)
  k = accum_steps
  sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
  if len(sizes) != 1 or next(iter(sizes)) % k:
    raise ValueError(
      f"accum_steps={k}: the batch's leading sizes {sorted(sizes)} must be one size divisible by it"
    )
  micro = jax.tree.map(lambda x: split_micro(x, k), batch)
  first = jax.tree.map(lambda x: x[0], micro)
  (loss, (metrics, _)), grads = jax.eval_shape(grad_fn, params, first, rng)
  f32 = lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32))
  zeros = jax.tree.map(f32, (loss, metrics, grads))

  def body(carry, xs):
    sums, total = carry
    i, mb = xs
    (loss, (metrics, outputs)), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
    w = jnp.float32(1.0) if weight is None else jnp.asarray(weight(mb), jnp.float32)
    sums = jax.tree.map(lambda s, x: s + w * x.astype(s.dtype), sums, (loss, metrics, grads))
    return (sums, total + w), outputs

  (sums, total), outputs = jax.lax.scan(body, (zeros, jnp.float32(0.0)), (jnp.arange(k), micro))
  denominator = jnp.where(total > 0, total, 1.0)  # no items at all: zeros, as one batch gives
  loss, metrics, grads = jax.tree.map(lambda s: s / denominator, sums)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  return (loss, (metrics, jax.tree.map(merge_micro, outputs))), grads


def steps_from_config(config: ml_collections.ConfigDict, num_train: int) -> tuple[int, int]:
  """(total_steps, warmup_steps): `total_steps` wins over `num_epochs` when set."""
  steps_per_epoch = max(num_train // config.input.batch_size, 1)
  total = config.get("total_steps") or int(config.num_epochs * steps_per_epoch)
  warmup = config.optim.get("warmup_steps") or int(config.optim.warmup_epochs * steps_per_epoch)
  return total, warmup
