"""Start-up checks of a run config: a bad value stops the run before any compute.

Each rule names the field and what it accepts, so the one-line error says what to
fix. Checks that need the outside world (data set present, `init_from` readable,
devices for the batch) run where that is known: the trainers and the input pipeline.
"""
import math
from typing import Any, Callable

import ml_collections

from beit_jax import embedded_data
from beit_jax import randaugment
from beit_jax import tokenizers
from beit_jax.errors import ConfigError
from beit_jax.models import vit
from beit_jax.trainers import linear_probe

_DTYPES = ("float32", "bfloat16", "float16")
TRAINERS = ("mim", "dvae", "finetune", "linear_probe")
_EMBEDDED = ("embedded",) + tuple(f"embedded:{n}" for n in embedded_data.LABELLED)

# (field, test, what is accepted). A field missing from the config is skipped: the
# trainers that need it read it with a default.
Rule = tuple[str, Callable[[Any], bool], str]


def _num(lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False, integer=False):
  def test(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      return False
    if integer and not float(v).is_integer():
      return False
    return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
  return test


def _accepted(fn, value) -> bool:
  try:
    fn(value)
  except (ConfigError, TypeError, ValueError):
    return False
  return True


def _dataset(v) -> bool:
  return isinstance(v, str) and (v in _EMBEDDED or (
      v.startswith(("tfds:", "folder:")) and len(v.partition(":")[2]) > 0))


def _pair(lo, hi):
  return lambda v: (isinstance(v, (tuple, list)) and len(v) == 2
                    and all(_num(lo, hi)(x) for x in v) and v[0] <= v[1])


POSITIVE_INT = (_num(1, integer=True), "an integer >= 1")
RULES: tuple[Rule, ...] = (
    ("trainer", lambda v: v in TRAINERS, f"one of {TRAINERS}"),
    ("seed", _num(integer=True), "an integer"),
    ("num_epochs", _num(0, lo_open=True), "a number > 0"),
    ("total_steps", _num(0, integer=True), "an integer >= 0 (0: use num_epochs)"),
    ("log_every_steps", *POSITIVE_INT),
    ("images_every_steps", *POSITIVE_INT),
    ("max_bad_steps", *POSITIVE_INT),
    ("eval_every_steps", *POSITIVE_INT),
    ("label_smoothing", _num(0, 1, hi_open=True), "a number in [0, 1)"),
    ("mixup.mixup_alpha", _num(0), "a number >= 0 (0: no Mixup)"),
    ("mixup.cutmix_alpha", _num(0), "a number >= 0 (0: no CutMix)"),
    ("mixup.prob", _num(0, 1), "a probability in [0, 1]"),
    ("mixup.switch_prob", _num(0, 1), "a probability in [0, 1]"),
    ("probe.layers", lambda v: isinstance(v, (tuple, list)) and all(
        _num(integer=True)(i) for i in v), "a list of block indices (empty: every block)"),
    ("probe.pool", lambda v: v in linear_probe.POOLS, f"one of {linear_probe.POOLS}"),
    ("probe.norm", lambda v: v in linear_probe.NORMS, f"one of {linear_probe.NORMS}"),
    ("model.variant", lambda v: _accepted(vit.variant_kwargs, v),
     f"one of {sorted(vit.VARIANTS)} or another patch size, e.g. 'Ti/8'"),
    ("model.width", lambda v: v is None or _num(1, integer=True)(v), "None or an int >= 1"),
    ("model.depth", lambda v: v is None or _num(1, integer=True)(v), "None or an int >= 1"),
    ("model.num_heads", lambda v: v is None or _num(1, integer=True)(v), "None or an int >= 1"),
    ("model.mlp_dim", lambda v: v is None or _num(1, integer=True)(v), "None or an int >= 1"),
    ("model.drop_path_rate", _num(0, 1, hi_open=True), "a number in [0, 1)"),
    ("model.layer_scale_init", _num(0), "a number >= 0 (0: no LayerScale)"),
    ("model.dtype", lambda v: v in _DTYPES, f"one of {_DTYPES}"),
    ("model.head_init_scale", _num(0, lo_open=True), "a number > 0"),
    ("input.dataset", _dataset, f"one of {_EMBEDDED}, 'tfds:NAME' or 'folder:/path'"),
    ("input.eval_dataset", lambda v: v == "" or _dataset(v),
     "'' (the training data set) or a data set like input.dataset"),
    ("input.eval_split", lambda v: isinstance(v, str) and len(v) > 0,
     "a split name, e.g. 'validation'"),
    ("input.eval_batch_size", lambda v: v in (None, 0) or _num(1, integer=True)(v),
     "an integer >= 1 (None or 0: input.batch_size)"),
    ("input.randaugment", lambda v: isinstance(v, str) and _accepted(randaugment.parse, v),
     "'' (off) or a timm RandAugment string, e.g. 'rand-m9-mstd0.5-inc1'"),
    ("input.random_erase", _num(0, 1), "a probability in [0, 1]"),
    ("input.eval_crop_pct", _num(0, 1, lo_open=True), "a number in (0, 1]"),
    ("input.batch_size", *POSITIVE_INT),
    ("input.image_size", *POSITIVE_INT),
    ("input.tokenizer_image_size", lambda v: _num(8, integer=True)(v) and v % 8 == 0,
     "a multiple of 8 (the dVAE downsamples 8x)"),
    ("input.crop_scale", _pair(0, 1), "(min, max) with 0 <= min <= max <= 1"),
    ("input.crop_ratio", _pair(0.0001, 100), "(min, max) aspect ratios, min <= max"),
    ("input.color_jitter", _num(0), "a number >= 0 (0: off)"),
    ("input.shuffle_buffer", *POSITIVE_INT),
    ("optim.lr", _num(0, lo_open=True), "a number > 0"),
    ("optim.min_lr", _num(0), "a number >= 0"),
    ("optim.warmup_epochs", _num(0), "a number >= 0"),
    ("optim.warmup_steps", _num(0, integer=True), "an integer >= 0"),
    ("optim.b1", _num(0, 1, hi_open=True), "a number in [0, 1)"),
    ("optim.b2", _num(0, 1, hi_open=True), "a number in [0, 1)"),
    ("optim.eps", _num(0), "a number >= 0"),
    ("optim.weight_decay", _num(0), "a number >= 0"),
    ("optim.grad_clip", _num(0), "a number >= 0 (0: off)"),
    ("optim.layer_decay", _num(0, 1, lo_open=True), "a number in (0, 1] (1: no decay)"),
    ("checkpoint.every_steps", *POSITIVE_INT),
    ("checkpoint.keep", *POSITIVE_INT),
    ("tokenizer.kind", lambda v: v in tokenizers.KINDS, f"one of {tokenizers.KINDS}"),
    ("tokenizer.vocab_size", _num(2, integer=True), "an integer >= 2"),
    ("tokenizer.n_hid", lambda v: _num(4, integer=True)(v) and v % 4 == 0,
     "a positive multiple of 4"),
    ("tokenizer.train.num_steps", *POSITIVE_INT),
    ("tokenizer.train.batch_size", *POSITIVE_INT),
    ("tokenizer.train.kl_weight", _num(0), "a number >= 0"),
    ("tokenizer.train.temperature_end", _num(0, lo_open=True), "a number > 0"),
    ("tokenizer.train.optim.lr", _num(0, lo_open=True), "a number > 0"),
)


def _get(config: ml_collections.ConfigDict, field: str):
  node = config
  for key in field.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or key not in node:
      return _MISSING
    node = node[key]
  return node


_MISSING = object()


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first field that breaks a rule."""
  for field, test, accepted in RULES:
    value = _get(config, field)
    if value is not _MISSING and not test(value):
      raise ConfigError(f"{field}={value!r} is invalid; accepted: {accepted}")
  model = config.get("model")
  if model is not None and model.get("width") and model.get("num_heads") and \
      model.width % model.num_heads:
    raise ConfigError(f"model.width={model.width} must be divisible by "
                      f"model.num_heads={model.num_heads}")
  inp = config.get("input")
  if inp is not None and inp.image_size % inp.patch_size:
    raise ConfigError(f"input.image_size={inp.image_size} must be a multiple of "
                      f"input.patch_size={inp.patch_size}")
  if model is not None and inp is not None:
    patch = vit.variant_kwargs(model.variant)["patch_size"]
    if inp.patch_size != patch:
      raise ConfigError(f"input.patch_size={inp.patch_size} differs from the patch size "
                        f"{patch} of model.variant={model.variant!r}")
