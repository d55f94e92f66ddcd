"""The training state every trainer shares, its shardings, and the guarded optimizer update.

One place builds the state: `abstract` gives its shapes and shardings without allocating
anything (what "will it fit" and ahead-of-time compilation need), `create` allocates it
directly in those shardings.
"""
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from beit_jax import sharding
from beit_jax.param_paths import AxesTable


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: steps taken (skipped ones included)
  params: Any
  opt_state: Any
  bad_steps: jax.Array     # int32 scalar: consecutive steps skipped as non-finite


def _initial(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation
             ) -> Callable[[jax.Array], TrainState]:
  def init(rng):
    params = init_params(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), bad_steps=jnp.zeros((), jnp.int32))
  return init


def abstract(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
             mesh: jax.sharding.Mesh, sharding_cfg, param_axes: AxesTable
             ) -> tuple[TrainState, Any]:
  """(shape-only state: ShapeDtypeStructs carrying their shardings, the shardings).

  `param_axes`: the logical axes of the model's weights (its module's PARAM_AXES).
  """
  shapes = jax.eval_shape(_initial(init_params, tx), jax.random.key(0))
  shardings = sharding.param_shardings(shapes, mesh, sharding_cfg, param_axes)
  structs = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         shapes, shardings)
  return structs, shardings


def create(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
           rng: jax.Array, mesh: jax.sharding.Mesh, sharding_cfg, param_axes: AxesTable
           ) -> tuple[TrainState, Any]:
  """Initialises params and optimizer state directly in their shardings.

  Returns the state and its shardings (for the jitted step's in/out shardings).
  """
  _, shardings = abstract(init_params, tx, mesh, sharding_cfg, param_axes)
  return jax.jit(_initial(init_params, tx), out_shardings=shardings)(rng), shardings


def apply_gradients(state: TrainState, grads: Any, loss: jax.Array, tx
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
  new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state),
                         bad_steps=jnp.where(ok, 0, state.bad_steps + 1))
  return new_state, {"grad_norm": grad_norm, "skipped_steps": 1 - ok.astype(jnp.float32)}


def steps_from_config(config: ml_collections.ConfigDict, num_train: int) -> tuple[int, int]:
  """(total_steps, warmup_steps): `total_steps` wins over `num_epochs` when set."""
  steps_per_epoch = max(num_train // config.input.batch_size, 1)
  total = config.get("total_steps") or int(config.num_epochs * steps_per_epoch)
  warmup = config.optim.get("warmup_steps") or int(config.optim.warmup_epochs * steps_per_epoch)
  return total, warmup
