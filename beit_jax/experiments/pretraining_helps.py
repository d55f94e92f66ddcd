r"""Does BEiT pretraining help downstream, and does v2 beat v1? Measured on data that ships here.

  python -m beit_jax.experiments.pretraining_helps --workdir=/tmp/pretraining_helps

On scikit-learn's handwritten digits (`embedded:digits`: 1433 training, 364 validation
images; `--dataset=photos` for the photo tiles), for each method of `--method`:

  v1: a tiny dVAE tokenizer is trained on the training images (shared by all seeds);
  v2: a teacher ViT is trained with labels on the *photos* (`embedded:photos`, 20 classes:
      it never sees a digit's label; `--teacher` takes another, such as a v1 model), then a
      tiny VQ-KD tokenizer distils its patch features on the digits' training images (both
      shared by all seeds);

then for each seed

  1. a tiny BEiT is pretrained with masked image modeling on the training images, labels
     unused (`trainers/mim.py`; v2: the VQ-KD's codes, exact masks, patch aggregation),
     same backbone, masked patches, steps and batch for both methods;
  2. it and a randomly initialised twin (same architecture, same seed) are fine-tuned with
     the same recipe and budget (`trainers/finetune.py`);
  3. both are linear-probed with the same budget (`trainers/linear_probe.py`; the random
     twin's features are those of the untrained network);
  4. both are trained for semantic segmentation (UperNet, `trainers/segmentation.py`) on
     `embedded:digits`' segmentation set (digits pasted onto photos, 11 classes), the same
     recipe and budget (`--segmentation_steps`; 0 skips it), and scored by validation mIoU.

Every stage is an ordinary run of this codebase in `<workdir>/...` (rerunning resumes and
skips finished stages). `--labels=train[:10%]` fine-tunes and probes on a tenth of the labels,
reusing the tokenizers and the pretrained models of an earlier run in the same workdir. The
table (mean ± std over seeds of the final validation top-1 and mIoU, the paired differences,
the per-seed scores) is printed and written to `<workdir>/results.{md,json,png}`. The
segmentation runs do not depend on `--labels`: they live in `<workdir>/seed_*` either way.
"""

import json
import re
import sys
import time

from absl import app
from absl import flags
from absl import logging
import ml_collections
from etils import epath

from beit_jax import logs
from beit_jax.experiments import summary as results_table
from configs import beit_tiny_local
from configs import common
from configs import finetune_tiny_local
from configs import linear_probe as linear_probe_config
from configs import seg_tiny_local
from configs import vqkd_tiny_local

_WORKDIR = flags.DEFINE_string("workdir", None, "Where every run and the results go.")
_METHOD = flags.DEFINE_list(
  "method",
  ["v1", "v2"],
  "Pretraining methods, each against the same random init: v1 "
  "(dVAE tokens), v2 (VQ-KD tokens), and v1's ablations random_masking (uniform instead "
  "of blockwise masks) and pixels (regressing normalised pixels instead of tokens).",
)
_DATASET = flags.DEFINE_enum(
  "dataset",
  "digits",
  ["digits", "photos"],
  "The embedded labelled set (beit_jax/data/embedded.py).",
)
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds 0..N-1 (pretraining, fine-tuning, probe).")
_TOKENIZER_STEPS = flags.DEFINE_integer(
  "tokenizer_steps", 400, "Tokenizer (dVAE, VQ-KD) training steps."
)
_VOCAB = flags.DEFINE_integer("vocab_size", 64, "Tokenizer codebook size (dVAE, VQ-KD).")
_TEACHER_STEPS = flags.DEFINE_integer(
  "teacher_steps", 500, "v2: the teacher's supervised training steps on embedded:photos."
)
_TEACHER = flags.DEFINE_string(
  "teacher",
  "",
  "v2: a beit-jax ViT checkpoint (workdir) to "
  "distil instead of training one on the other embedded set, "
  "e.g. a v1 model pretrained on the digits (no labels).",
)
_TEACHER_BLOCK = flags.DEFINE_integer(
  "teacher_block",
  None,
  "v2: the teacher block (0-based, "
  "negative from the end) whose patch outputs, before the "
  "final norm, are distilled; default: after the norm.",
)
_AGGREGATION = flags.DEFINE_integer(
  "aggregation_layer",
  3,
  "v2: the block (1-based) whose patch outputs the patch-aggregation head reads.",
)
_RESTART = flags.DEFINE_bool("restart_dead_codes", False, "v2: restart the VQ-KD's dead codes.")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 2000, "MIM steps per seed.")
_MASK = flags.DEFINE_integer("mask_patches", 6, "Patches masked (blockwise) of the 4x4 grid.")
_FINETUNE_STEPS = flags.DEFINE_integer("finetune_steps", 500, "Fine-tuning steps per run.")
_PROBE_STEPS = flags.DEFINE_integer("probe_steps", 300, "Linear probe steps per run.")
_SEG_STEPS = flags.DEFINE_integer(
  "segmentation_steps",
  1000,
  "Segmentation steps per run on the pixel labels of "
  "embedded:digits (configs/seg_tiny_local.py's recipe and budget); 0: no segmentation.",
  lower_bound=0,
)
_WIDTH = flags.DEFINE_integer("width", 64, "ViT width (4 blocks, 4 heads, 8x8 patches).")
_TOKENIZER = flags.DEFINE_string(
  "tokenizer",
  "",
  "v1: a trained dVAE (workdir) to use instead of training one in <workdir>/tokenizer.",
)
_LABELS = flags.DEFINE_string(
  "labels",
  "train",
  "The labelled split of fine-tuning and probing, e.g. 'train[:10%]' "
  "(pretraining always sees every training image, unlabelled). Other than 'train', its runs "
  "and results go to <workdir>/labels_<split>, reusing the tokenizer and pretraining.",
)

IMAGE_SIZE, PATCH = 32, 8  # a 4x4 patch grid; the dVAE sees 32x32 (8x downsampling)
BATCH = 64


def _model(c: ml_collections.ConfigDict) -> None:
  width = _WIDTH.value
  c.model.update(
    dict(
      variant=f"Ti/{PATCH}", width=width, depth=4, num_heads=4, mlp_dim=4 * width, dtype="float32"
    )
  )


def _data(c: ml_collections.ConfigDict, vit: bool = True) -> None:
  """The training images; `vit`: and the ViT's crop size and patch (a tokenizer's run reads
  neither)."""
  c.input.update(
    dict(
      dataset=f"embedded:{_DATASET.value}",
      split="train",
      batch_size=BATCH,
      crop_scale=(0.8, 1.0),
      flip=_DATASET.value == "photos",
      shuffle_buffer=1000,
    )
  )
  if vit:
    c.input.update(dict(image_size=IMAGE_SIZE, patch_size=PATCH))


def pretrain_config(seed: int, tokenizer: str) -> ml_collections.ConfigDict:
  """MIM on the training images (their labels unused), against the shared tokenizer."""
  steps = _PRETRAIN_STEPS.value
  c = beit_tiny_local.get_config(
    f"steps={steps},tokenizer_steps={_TOKENIZER_STEPS.value},batch={BATCH}"
  )
  c.seed = seed
  c.log_every_steps = 100
  c.images_every_steps = steps
  _model(c)
  _data(c)
  c.input.update(dict(tokenizer_image_size=IMAGE_SIZE, color_jitter=0.0, crop_scale=(0.5, 1.0)))
  c.input.mask.update(dict(num_masking_patches=_MASK.value, min_num_patches=2))
  c.tokenizer.vocab_size = _VOCAB.value
  c.tokenizer.init_from = tokenizer
  c.checkpoint = dict(every_steps=steps, keep=1)
  # v1's tokenizer: the dVAE's run (without `tokenizer`, trained once for all seeds).
  r = c.tokenizer.recipe
  _data(r, vit=False)
  r.input.update(dict(tokenizer_image_size=IMAGE_SIZE, color_jitter=0.0, crop_scale=(0.5, 1.0)))
  r.tokenizer.vocab_size = _VOCAB.value
  return c


def teacher_config() -> ml_collections.ConfigDict:
  """v2's teacher: a ViT trained with the labels of the *other* embedded set (no leak)."""
  other = {"digits": "photos", "photos": "digits"}[_DATASET.value]
  c = finetune_tiny_local.get_config(f"steps={_TEACHER_STEPS.value},batch={BATCH}")
  c.eval_every_steps = _TEACHER_STEPS.value
  c.input.update(dict(dataset=f"embedded:{other}", flip=other == "photos"))
  c.checkpoint = dict(every_steps=_TEACHER_STEPS.value, keep=1)
  return c


def teacher_width() -> int:
  """The width of v2's teacher: `--teacher`'s (from its config.json, without JAX: the
  check runs before any import or compute) or `teacher_config`'s."""
  if not _TEACHER.value:
    return teacher_config().model.width
  path = epath.Path(_TEACHER.value) / "config.json"
  if not path.exists():
    sys.exit(
      f"pretraining_helps: error: --teacher={_TEACHER.value} holds no config.json; "
      "give the workdir of a beit-jax run (e.g. <workdir>/seed_0/pretrain)"
    )
  return json.loads(path.read_text())["model"]["width"]


def vqkd_config(teacher: str) -> ml_collections.ConfigDict:
  """v2's tokenizer: distils the teacher's patch tokens on the training images."""
  steps = _TOKENIZER_STEPS.value
  c = vqkd_tiny_local.get_config(
    f"steps={steps},batch={BATCH},teacher_dim={teacher_width()},codes={_VOCAB.value}"
  )
  _data(c, vit=False)
  c.input.update(dict(tokenizer_image_size=IMAGE_SIZE, crop_scale=(0.5, 1.0)))
  c.tokenizer.teacher.init_from = teacher
  c.tokenizer.teacher.block = _TEACHER_BLOCK.value
  c.images_every_steps = steps
  c.restart_dead_codes = _RESTART.value
  c.checkpoint = dict(every_steps=steps, keep=1)
  return c


def ablation_config(seed: int, tokenizer: str, method: str) -> ml_collections.ConfigDict:
  """v1's run with one change: uniform random masks, or normalised pixels as targets."""
  c = pretrain_config(seed, tokenizer)
  if method == "random_masking":
    c.input.mask.kind = "random"
  else:
    c.mim_target = "pixels"
    c.tokenizer.init_from = ""  # none is read
  return c


def pretrain_v2_config(seed: int, tokenizer: str, teacher: str) -> ml_collections.ConfigDict:
  """v1's run with v2's targets (the VQ-KD's codes), exact masks and patch aggregation."""
  c = pretrain_config(seed, tokenizer)
  common.set_tokenizer(c, vqkd_config(teacher))
  c.tokenizer.init_from = tokenizer
  c.model.patch_aggregation = dict(layer=_AGGREGATION.value, depth=2)
  c.input.mask.exact = True
  return c


def finetune_config(seed: int, init_from: str) -> ml_collections.ConfigDict:
  c = finetune_tiny_local.get_config(f"steps={_FINETUNE_STEPS.value},batch={BATCH}")
  c.seed, c.init_from = seed, init_from
  c.eval_every_steps = _FINETUNE_STEPS.value
  _model(c)
  _data(c)
  c.input.split = _LABELS.value
  c.checkpoint = dict(every_steps=_FINETUNE_STEPS.value, keep=1)
  return c


def probe_config(seed: int, init_from: str) -> ml_collections.ConfigDict:
  c = linear_probe_config.get_config("local=True")
  c.seed, c.init_from = seed, init_from
  c.total_steps = _PROBE_STEPS.value
  c.eval_every_steps = _PROBE_STEPS.value
  c.probe.norm = "layernorm"
  _model(c)
  _data(c)
  c.input.split = _LABELS.value
  c.checkpoint = dict(every_steps=_PROBE_STEPS.value, keep=1)
  return c


def segmentation_config(seed: int, init_from: str) -> ml_collections.ConfigDict:
  """UperNet on the backbone, `seg_tiny_local`'s recipe: 64-px crops (the 4x4 grid's
  relative position tables resized to 8x8) with digits 28 to 56 px across at scale 1, near
  the 32-px pretraining images' scale; one validation, at the end."""
  steps = _SEG_STEPS.value
  c = seg_tiny_local.get_config(f"steps={steps},batch=16")
  c.seed, c.init_from = seed, init_from
  c.eval_every_steps = steps
  _model(c)
  c.checkpoint.update(every_steps=steps, keep=1)
  return c


# --------------------------------------------------------------------------- the runs


def _settings() -> dict:
  """The flags its runs depend on (`--labels` runs have their own folder; without
  segmentation, `--segmentation_steps` reuses nothing)."""
  flags_used = (
    _DATASET,
    _TOKENIZER,
    _TOKENIZER_STEPS,
    _VOCAB,
    _PRETRAIN_STEPS,
    _MASK,
    _FINETUNE_STEPS,
    _PROBE_STEPS,
    _WIDTH,
    _TEACHER_STEPS,
    _AGGREGATION,
    _RESTART,
    _TEACHER,
    _TEACHER_BLOCK,
  ) + ((_SEG_STEPS,) if _SEG_STEPS.value else ())
  return {f.name: f.value for f in flags_used}


def check_settings(root: epath.Path) -> None:
  """Refuses a workdir whose runs were made with other flags (they would be reused). A
  flag one of the runs does not record (a newer one) or this run does not use is not
  compared: both are kept."""
  path, settings = root / "settings.json", _settings()
  before = json.loads(path.read_text()) if path.exists() else {}
  changed = [
    f"--{k}={v!r} (this run: {settings[k]!r})"
    for k, v in before.items()
    if k in settings and settings[k] != v
  ]
  if changed:
    sys.exit(
      f"pretraining_helps: error: {root} holds runs made with "
      f"{', '.join(changed)}; use another --workdir for other settings"
    )
  root.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({**before, **settings}, indent=2))


# Where each method's runs live (v1's names predate v2: earlier workdirs are reused).
_DIRS = {
  "v1": dict(pretrain="pretrain", downstream="pretrained"),
  "v2": dict(pretrain="pretrain_v2", downstream="v2"),
  "random_masking": dict(pretrain="pretrain_random_masking", downstream="random_masking"),
  "pixels": dict(pretrain="pretrain_pixels", downstream="pixels"),
}


def run_experiment(workdir: str) -> dict:
  methods = tuple(_METHOD.value)
  if not methods or set(methods) - set(_DIRS):
    sys.exit(
      f"pretraining_helps: error: --method={','.join(methods)}: give one or both of "
      f"{', '.join(_DIRS)}"
    )
  if "v2" in methods:
    teacher_width()
  root = epath.Path(workdir)
  check_settings(root)
  # After the checks: a mistaken flag costs no JAX or TensorFlow import.
  import jax  # pylint: disable=g-import-not-at-top
  from beit_jax.data import classification  # pylint: disable=g-import-not-at-top
  from beit_jax import trainers  # pylint: disable=g-import-not-at-top

  start = time.time()
  # Runs of the same shapes (the pretrained and random twins) compile once.
  jax.config.update("jax_compilation_cache_dir", str(root / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  stage_minutes: dict[str, float] = {}

  def timed(stage, config, run_dir):
    t = time.time()
    out = trainers.run(config, str(run_dir))
    stage_minutes[stage] = stage_minutes.get(stage, 0.0) + (time.time() - t) / 60
    return out

  def downstream_run(stage, config, run_dir) -> dict:
    """Its final validation metrics: a finished run's from its results.json (resuming it
    would only validate again, up to a minute per run on this CPU)."""
    results = run_dir / "results.json"
    if results.exists() and json.loads(results.read_text())["step"] == config.total_steps:
      return json.loads(results.read_text())
    return timed(stage, config, run_dir)

  # The tokenizers, shared by all seeds.
  pretrain = {}
  if {"v1", "random_masking"} & set(methods):
    tokenizer = _TOKENIZER.value or str(root / "tokenizer")
    if not _TOKENIZER.value:
      timed("v1 tokenizer", pretrain_config(0, "").tokenizer.recipe, tokenizer)
    pretrain["v1"] = lambda seed: pretrain_config(seed, tokenizer)
    pretrain["random_masking"] = lambda seed: ablation_config(seed, tokenizer, "random_masking")
  pretrain["pixels"] = lambda seed: ablation_config(seed, "", "pixels")
  if "v2" in methods:
    teacher, vqkd = _TEACHER.value or str(root / "teacher"), str(root / "vqkd")
    if not _TEACHER.value:
      timed("v2 teacher", teacher_config(), teacher)
    timed("v2 tokenizer", vqkd_config(teacher), vqkd)
    pretrain["v2"] = lambda seed: pretrain_v2_config(seed, vqkd, teacher)

  inits = ("random",) + methods
  tasks = ("finetune", "probe") + (("segment",) if _SEG_STEPS.value else ())
  runs: dict[str, list[float]] = {f"{t}/{i}": [] for t in tasks for i in inits}
  mim = {m: {"mim_accuracy": [], "majority_baseline": []} for m in methods}
  downstream = root
  if _LABELS.value != "train":
    downstream = root / ("labels_" + re.sub(r"\W", "_", _LABELS.value.replace("%", "pct")))
  for seed in range(_SEEDS.value):
    seed_dir = root / f"seed_{seed}"
    init_from = {"random": ""}
    for m in methods:
      name = _DIRS[m]["pretrain"]
      init_from[m] = str(seed_dir / name)
      done = seed_dir / f"{name}_metrics.json"  # its last logged values, once finished
      if not done.exists():
        done.write_text(json.dumps(timed(f"{m} pretrain", pretrain[m](seed), init_from[m])))
      metrics = json.loads(done.read_text())
      for k, v in mim[m].items():  # pixels: no accuracy
        v.append(metrics.get(k, float("nan")))
    for init in inits:
      name = _DIRS[init]["downstream"] if init in _DIRS else init
      ft = downstream_run(
        "finetune",
        finetune_config(seed, init_from[init]),
        downstream / f"seed_{seed}" / f"finetune_{name}",
      )
      runs[f"finetune/{init}"].append(ft["val_top1"])
      probe = downstream_run(
        "probe", probe_config(seed, init_from[init]), downstream / f"seed_{seed}" / f"probe_{name}"
      )
      runs[f"probe/{init}"].append(probe["val_top1"])
      logging.info(
        "seed %d, %s: fine-tuned %.4f, probed %.4f", seed, init, ft["val_top1"], probe["val_top1"]
      )
      if _SEG_STEPS.value:  # its labels are pixels, not `--labels`: one run per workdir
        miou = downstream_run(
          "segmentation", segmentation_config(seed, init_from[init]), seed_dir / f"segment_{name}"
        )["val_miou"]
        runs[f"segment/{init}"].append(miou)
        logging.info("seed %d, %s: segmentation mIoU %.4f", seed, init, miou)

  summary = results_table.summarise(runs, methods)
  info = classification.dataset_info(finetune_config(0, ""))
  meta = dict(
    dataset=_DATASET.value,
    seeds=_SEEDS.value,
    labels=_LABELS.value,
    method=list(methods),
    num_train=info.num_train,
    num_eval=info.num_eval,
    segmentation_steps=_SEG_STEPS.value,
    mim={m: {k: results_table.mean_std(v) for k, v in d.items()} for m, d in mim.items()},
    minutes=(time.time() - start) / 60,
    stage_minutes=stage_minutes,
    settings=_settings(),
    command=" ".join(["python -m beit_jax.experiments.pretraining_helps"] + sys.argv[1:]),
  )
  table = results_table.markdown(summary, meta)
  (downstream / "results.md").write_text(table + f"\n`{meta['command']}`\n")
  (downstream / "results.json").write_text(
    json.dumps({"summary": summary, "runs": runs, "mim_per_seed": mim, **meta}, indent=2)
  )
  results_table.plot(downstream / "results.png", summary, runs)
  print(table)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    sys.exit("pretraining_helps: error: --workdir is required")
  logs.quiet_libraries()
  from beit_jax.errors import Preempted  # pylint: disable=g-import-not-at-top

  try:
    run_experiment(_WORKDIR.value)
  except Preempted as e:  # its run saved a checkpoint: rerunning the command resumes
    print(f"pretraining_helps: {e}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
