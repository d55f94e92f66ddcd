"""The `config.model` group (the ViT every trainer builds): its start-up rules and checks.

`trainers.validate_config` runs them once, before any compute, so a bad value stops a run
with one line naming the field and what it accepts. The modules themselves
(`beit_jax/models/`) guard their attributes and input shapes with plain ValueErrors for
direct users of the API; they never name config fields.
"""

import ml_collections

from beit_jax.training import validate
from beit_jax.errors import ConfigError
from beit_jax.models import vit

_DTYPES = ("float32", "bfloat16", "float16")

RULES = (
  (
    "model.variant",
    validate.accepted_by(vit.variant_kwargs),
    f"one of {sorted(vit.VARIANTS)} or another patch size, e.g. 'Ti/8'",
  ),
  *((f"model.{k}", validate.optional_positive_int, "None or an int >= 1") for k in vit.SIZE_FIELDS),
  ("model.drop_path_rate", validate.number(0, 1, hi_open=True), "a number in [0, 1)"),
  ("model.layer_scale_init", validate.number(0), "a number >= 0 (0: no LayerScale)"),
  ("model.dtype", lambda v: v in _DTYPES, f"one of {_DTYPES}"),
  ("model.head_init_scale", validate.number(0, lo_open=True), "a number > 0"),
  ("model.remat", lambda v: isinstance(v, bool), "True or False"),
  ("model.remat_policy", lambda v: v in vit.REMAT_POLICIES, f"one of {vit.REMAT_POLICIES}"),
  ("model.scan_layers", lambda v: isinstance(v, bool), "True or False"),
)


def _check_sizes(config: ml_collections.ConfigDict) -> None:
  model, inp = config.get("model"), config.get("input")
  if model is None:
    return
  sizes = vit.size_kwargs(model)
  width, heads = sizes["width"], sizes["num_heads"]
  if width % heads:
    field = lambda k, v: (
      f"model.{k}={v}"
      if model.get(k) is not None
      else f"the {k} {v} of model.variant={model.variant!r}"
    )
    raise ConfigError(f"{field('width', width)} must be divisible by {field('num_heads', heads)}")
  if inp is not None and "patch_size" in inp and inp.patch_size != sizes["patch_size"]:
    raise ConfigError(
      f"input.patch_size={inp.patch_size} differs from the patch size "
      f"{sizes['patch_size']} of model.variant={model.variant!r}"
    )


CHECKS = (_check_sizes,)
