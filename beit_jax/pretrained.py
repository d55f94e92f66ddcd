"""ViT weights of any beit-jax checkpoint, adapted to the ViT they start.

Fine-tuning, linear probing and segmentation start from pretraining runs or imported
weights arranged otherwise than the model: a shared relative position bias to copy
into every block, position parameters of another resolution, heads the model lacks.
"""
import fnmatch
import json
from typing import Any

import ml_collections
from absl import logging
from etils import epath
from flax import traverse_util

from beit_jax.params import blocks
from beit_jax import params as params_lib
from beit_jax.params import vit as vit_params
from beit_jax.errors import ConfigError
from beit_jax.models import vit

# Params a classifier learns from scratch: not in a pretraining checkpoint.
CLASSIFIER_PARAMS = ("fc_norm", "head")
# Params of a checkpoint a model may lack: heads and final norms of another use, and BEiT
# v2's patch-aggregation decoder (`cls_pt_layers_<j>`, thrown away after pretraining).
_DROPPABLE = ("lm_head", "norm", "fc_norm", "head", params_lib.DECODER)


def load_pretrained(path: str, target: Any, config: ml_collections.ConfigDict, *,
                    fresh: tuple[str, ...] = CLASSIFIER_PARAMS, field: str = "init_from"
                    ) -> Any:
  """ViT weights of a beit-jax checkpoint, adapted to the model whose params are `target`.

  The checkpoint's relative position bias becomes per-block (or shared) as the model has
  it, position parameters are resized to `input.image_size`, the MIM head and whatever
  else the model lacks (its final norm under mean pooling, a head of another size) are
  dropped. Params whose top-level name is in `fresh` may be missing (they keep `target`'s
  init); any other missing or misshapen param is a ConfigError.

  Returns:
    `target`'s tree with the loaded values, in its dtypes, shardings and scanned or
    unscanned blocks.
  """
  what = f"{field}={path}"
  if not epath.Path(path).exists():
    raise ConfigError(f"{what} does not exist")
  params = vit_params.read(path)
  config_file = epath.Path(path) / "config.json"
  saved = json.loads(config_file.read_text()) if config_file.exists() else None
  m = config.model
  kw = vit_params.infer_model_kwargs(
      params, what, config=saved, num_heads=vit.size_kwargs(m)["num_heads"],
      fallback_image_size=config.input.image_size)
  source = kw
  rel_pos = ("per_layer" if m.use_rel_pos_bias else
             "shared" if m.use_shared_rel_pos_bias else "keep")
  params, kw = vit_params.adapt(params, kw, rel_pos=rel_pos, image_size=config.input.image_size)
  if kw["image_size"] != source["image_size"]:
    logging.info("%s: position parameters resized from %d to %d pixels", what,
                 source["image_size"], kw["image_size"])

  want = traverse_util.flatten_dict(blocks.unstacked(target), sep="/")  # as params
  top = lambda k: k.split("/")[0]
  misshapen_head = [k for k in params if top(k) in fresh and k in want
                    and tuple(params[k].shape) != tuple(want[k].shape)]
  dropped = sorted(k for k in params if k not in want) + misshapen_head
  params = {k: v for k, v in params.items() if k in want and k not in misshapen_head}
  missing = sorted(k for k in want if k not in params and top(k) not in fresh)
  # Heads and final norms may go; any other weight the model lacks would change its function.
  extra = [k for k in dropped
           if not any(fnmatch.fnmatchcase(top(k), p) for p in _DROPPABLE + fresh)]
  if missing or extra:
    problem = (f"the checkpoint lacks {_listing(missing)}" if missing else
               f"the model has no place for {_listing(extra)}")
    raise ConfigError(f"{what}: {problem}; set the model fields to the checkpoint's: "
                      f"{vit_params.config_flags(source)}")
  if dropped:
    logging.info("%s: not used: %s", what, ", ".join(sorted(set(dropped))))
  kept = [k for k in want if k not in params]
  if kept:
    logging.info("%s: initialised from scratch: %s", what, ", ".join(kept))
  full = {k: params.get(k, want[k]) for k in want}
  return params_lib.cast(target, traverse_util.unflatten_dict(full, sep="/"), field)


def _listing(names: list[str]) -> str:
  return f"{len(names)} parameters ({', '.join(names[:6])}" + (", ...)" if len(names) > 6 else ")")
