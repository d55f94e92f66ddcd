"""Visual tokenizers behind one interface: the discrete targets a MIM run predicts.

A kind (the DALL-E dVAE; BEiT v2's VQ-KD next) is one registry `Entry`: how to build and
initialise its model, `tokenize(params, images) -> int32 [B, h, w]` (run on device inside
the MIM step, its params a jit argument), its vocabulary and token grid, the input view it
was trained on (size, resize method, value range), an optional `decode` for the pictures,
and the trainer that trains it. Nothing here trains: a MIM run without
`tokenizer.init_from` runs `tokenizer.recipe` first, a whole config of that trainer
(`configs/dvae.py`, `configs/vqkd_*.py`), whose `tokenizer` group `check_recipe` holds to
the MIM run's.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath

from beit_jax import params as params_lib
from beit_jax.training import validate
from beit_jax.data.views import View, vit_view
from beit_jax.errors import ConfigError
from beit_jax.tokenizers import dvae, vqkd
from beit_jax.tokenizers.base import Entry


KINDS: dict[str, Entry] = {"dvae": dvae.ENTRY, "vqkd": vqkd.ENTRY}
_TRAINERS = tuple(e.trainer for e in KINDS.values())
RULES = (
  ("tokenizer.kind", lambda v: v in KINDS, f"one of {tuple(KINDS)}"),
  (
    "tokenizer.recipe",
    lambda v: isinstance(v, ml_collections.ConfigDict) and v.get("trainer") in _TRAINERS,
    f"a config whose trainer (one of {_TRAINERS}) trains the tokenizer",
  ),
  (
    "tokenizer.vocab_size",
    lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 2,
    "an integer >= 2",
  ),
  ("input.tokenizer_image_size", *validate.POSITIVE_INT),
) + tuple(rule for entry in KINDS.values() for rule in entry.rules)


def _check_view_size(config: ml_collections.ConfigDict) -> None:
  """The tokenizer's view fits its kind: a multiple of the dVAE's 8x, of VQ-KD's patch."""
  tok, size = config.get("tokenizer"), config.get("input", {}).get("tokenizer_image_size")
  if tok is None or size is None or tok.get("kind") not in KINDS:
    return
  kind = KINDS[tok.kind]
  if size % kind.image_multiple(tok):
    raise ConfigError(
      f"input.tokenizer_image_size={size} must be a multiple of "
      f"{kind.image_multiple(tok)} for a {kind.name} tokenizer"
    )


CHECKS = (_check_view_size,)
# The fields of a MIM run's `tokenizer` group that are not the tokenizer's own.
_NOT_RECIPES = ("init_from", "recipe")


def _flat(group: Any, prefix: str) -> dict[str, Any]:
  if not isinstance(group, (dict, ml_collections.ConfigDict)):
    return {prefix: group}
  return {k: v for key in group for k, v in _flat(group[key], f"{prefix}.{key}").items()}


def check_recipe(config: ml_collections.ConfigDict) -> None:
  """A MIM run without `tokenizer.init_from` reads the tokenizer `tokenizer.recipe` trains:
  the recipe's trainer is its kind's, and its `tokenizer` group and view size are this run's
  (the recipe may add fields of its own, e.g. a VQ-KD's `teacher`)."""
  tok = config.tokenizer
  recipe = tok.get("recipe")
  if recipe is None:
    raise ConfigError(
      "tokenizer.init_from is empty and there is no tokenizer.recipe: give a "
      "trained tokenizer (--config.tokenizer.init_from) or the run that "
      "trains one"
    )
  want = entry(tok.kind).trainer
  if recipe.get("trainer") != want:
    raise ConfigError(
      f"tokenizer.recipe.trainer={recipe.get('trainer')!r} but a "
      f"{entry(tok.kind).name} tokenizer is trained by trainer={want!r}"
    )
  ours = {
    k: v
    for key in tok
    if key not in _NOT_RECIPES
    for k, v in _flat(tok[key], f"tokenizer.{key}").items()
  }
  theirs = _flat(recipe.get("tokenizer", {}), "tokenizer")
  ours["input.tokenizer_image_size"] = config.input.tokenizer_image_size
  theirs["input.tokenizer_image_size"] = recipe.get("input", {}).get("tokenizer_image_size")
  for field, value in ours.items():
    if theirs.get(field) != value:
      raise ConfigError(
        f"{field}={value!r} but tokenizer.recipe.{field}={theirs.get(field)!r}: this run "
        "reads the tokenizer its recipe trains; set both alike (or tokenizer.init_from)"
      )


def entry(kind: str) -> Entry:
  if kind not in KINDS:
    raise ConfigError(f"tokenizer.kind={kind!r} is not supported; accepted: {tuple(KINDS)}")
  return KINDS[kind]


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A built tokenizer. Its params stay outside, so jitted steps take them as arguments."""

  kind: str
  model: nn.Module

  @property
  def entry(self) -> Entry:
    return KINDS[self.kind]

  def init(self, rng: jax.Array, image_size: int) -> Any:
    return self.entry.init(self.model, rng, image_size)

  def tokenize(self, params: Any, images: jax.Array) -> jax.Array:
    """Images in the tokenizer's view -> int32 [B, h, w] codes (no gradient)."""
    return self.entry.tokenize(self.model, jax.lax.stop_gradient(params), images)

  def decode(self, params: Any, tokens: jax.Array) -> jax.Array | None:
    """int [B, h, w] codes -> [B, H, W, 3] pictures in [0, 1]; None if it cannot draw."""
    if self.entry.decode is None:
      return None
    return self.entry.decode(self.model, params, tokens)

  def vocab_size(self, params: Any) -> int:
    return self.entry.vocab_size(params)


def check_kind(kind: str, params: Any, where: str) -> None:
  """One line naming `tokenizer.kind` when `params` are not a checkpoint of `kind`."""
  want = entry(kind)
  if want.owns(params):
    return
  other = [k for k, e in KINDS.items() if e.owns(params)]
  hint = (
    f": it is a {KINDS[other[0]].name} one; set --config.tokenizer.kind={other[0]}"
    if other
    else f" (it holds {sorted(params) if isinstance(params, dict) else params})"
  )
  raise ConfigError(f"tokenizer.kind='{kind}' but {where} is not a {want.name} tokenizer" + hint)


def build(tok: ml_collections.ConfigDict) -> Tokenizer:
  return Tokenizer(tok.kind, entry(tok.kind).build(tok))


def grid(config: ml_collections.ConfigDict) -> int:
  """Side of the token grid of `config.tokenizer` on `config.input`."""
  return entry(config.tokenizer.kind).grid(config.input)


def view(config: ml_collections.ConfigDict) -> View:
  """The input view `config.tokenizer` wants."""
  return entry(config.tokenizer.kind).view(config.input)


def pretrain_views(config: ml_collections.ConfigDict) -> dict[str, View]:
  """The views a MIM run reads of each crop: the ViT's `image`, the tokenizer's own."""
  return {"image": vit_view(config.input.image_size), "tokenizer_image": view(config)}


def load(
  tok: ml_collections.ConfigDict, path: str, field: str = "tokenizer.init_from"
) -> tuple[Tokenizer, Any]:
  """The tokenizer `tok` describes with the weights of the beit-jax checkpoint at `path`.

  Raises ConfigError naming `field` when the path does not exist, when its vocabulary is
  not `tok.vocab_size`, or when its weights do not fit the model.
  """
  tokenizer = build(tok)
  if not epath.Path(path).exists():
    raise ConfigError(f"{field}={path} does not exist")
  params = params_lib.read(path)
  check_kind(tok.kind, params, f"{field}={path}")
  got = tokenizer.vocab_size(params)
  if got != tok.vocab_size:
    raise ConfigError(
      f"tokenizer.vocab_size={tok.vocab_size} but the tokenizer at {path} has {got} codes"
    )
  params = tokenizer.entry.check_params(tokenizer.model, params, f"{field}={path}")
  logging.info("Tokenizer: %s from %s", tok.kind, path)
  return tokenizer, jax.tree.map(jnp.asarray, params)
