r"""Does BEiT pretraining help downstream? Measured on a labelled set that ships here.

  python -m beit_jax.experiments.pretraining_helps --workdir=/tmp/pretraining_helps

On scikit-learn's handwritten digits (`embedded:digits`: 1433 training, 364 validation
images; `--dataset=photos` for the photo tiles): a tiny dVAE tokenizer is trained on the
training images (stage 1, shared by all seeds), then for each seed

  1. a tiny BEiT is pretrained with masked image modeling on the training images, labels
     unused (`trainers/mim.py`);
  2. it and a randomly initialised twin (same architecture, same seed) are fine-tuned with
     the same recipe and budget (`trainers/finetune.py`);
  3. both are linear-probed with the same budget (`trainers/linear_probe.py`; the random
     twin's features are those of the untrained network).

Every stage is an ordinary run of this codebase in `<workdir>/...` (rerunning resumes and
skips finished stages). `--labels=train[:10%]` fine-tunes and probes on a tenth of the labels,
reusing the tokenizer and the pretrained models of an earlier run in the same workdir. The table (mean ± std over seeds of the final validation top-1, and
the paired difference) is printed and written to `<workdir>/results.{md,json,png}`.
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

_WORKDIR = flags.DEFINE_string("workdir", None, "Where every run and the results go.")
_DATASET = flags.DEFINE_enum("dataset", "digits", ["digits", "photos"],
                             "The embedded labelled set (beit_jax/data/embedded.py).")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds 0..N-1 (pretraining, fine-tuning, probe).")
_TOKENIZER_STEPS = flags.DEFINE_integer("tokenizer_steps", 400, "dVAE training steps.")
_VOCAB = flags.DEFINE_integer("vocab_size", 64, "dVAE codebook size.")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 2000, "MIM steps per seed.")
_MASK = flags.DEFINE_integer("mask_patches", 6, "Patches masked (blockwise) of the 4x4 grid.")
_FINETUNE_STEPS = flags.DEFINE_integer("finetune_steps", 500, "Fine-tuning steps per run.")
_PROBE_STEPS = flags.DEFINE_integer("probe_steps", 300, "Linear probe steps per run.")
_WIDTH = flags.DEFINE_integer("width", 64, "ViT width (4 blocks, 4 heads, 8x8 patches).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "A trained dVAE (workdir) to use instead "
                                 "of training one in <workdir>/tokenizer.")
_LABELS = flags.DEFINE_string(
    "labels", "train", "The labelled split of fine-tuning and probing, e.g. 'train[:10%]' "
    "(pretraining always sees every training image, unlabelled). Other than 'train', its runs "
    "and results go to <workdir>/labels_<split>, reusing the tokenizer and pretraining.")

IMAGE_SIZE, PATCH = 32, 8  # a 4x4 patch grid; the dVAE sees 32x32 (8x downsampling)
BATCH = 64


def _model(c: ml_collections.ConfigDict) -> None:
  width = _WIDTH.value
  c.model.update(dict(variant=f"Ti/{PATCH}", width=width, depth=4, num_heads=4,
                      mlp_dim=4 * width, dtype="float32"))


def _data(c: ml_collections.ConfigDict) -> None:
  c.input.update(dict(dataset=f"embedded:{_DATASET.value}", split="train",
                      image_size=IMAGE_SIZE, patch_size=PATCH, batch_size=BATCH,
                      crop_scale=(0.8, 1.0), flip=_DATASET.value == "photos",
                      shuffle_buffer=1000))


def pretrain_config(seed: int, tokenizer: str) -> ml_collections.ConfigDict:
  """MIM on the training images (their labels unused), against the shared tokenizer."""
  steps = _PRETRAIN_STEPS.value
  c = beit_tiny_local.get_config(f"steps={steps},tokenizer_steps={_TOKENIZER_STEPS.value},"
                                 f"batch={BATCH}")
  c.seed = seed
  c.log_every_steps = 100
  c.images_every_steps = steps
  _model(c)
  _data(c)
  c.input.update(dict(tokenizer_image_size=IMAGE_SIZE, color_jitter=0.0, crop_scale=(0.5, 1.0),
                      mask=common.mask_config(num_masking_patches=_MASK.value,
                                              min_num_patches=2)))
  c.tokenizer.vocab_size = _VOCAB.value
  c.tokenizer.init_from = tokenizer
  c.checkpoint = dict(every_steps=steps, keep=1)
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


# --------------------------------------------------------------------------- the runs


def _settings() -> dict:
  """The flags its runs depend on (`--labels` runs have their own folder)."""
  return {f.name: f.value for f in (_DATASET, _TOKENIZER, _TOKENIZER_STEPS, _VOCAB,
                                    _PRETRAIN_STEPS, _MASK, _FINETUNE_STEPS, _PROBE_STEPS,
                                    _WIDTH)}


def check_settings(root: epath.Path) -> None:
  """Refuses a workdir whose runs were made with other flags (they would be reused)."""
  path, settings = root / "settings.json", _settings()
  if path.exists():
    before = json.loads(path.read_text())
    changed = [f"--{k}={v!r} (this run: {settings[k]!r})" for k, v in before.items()
               if settings.get(k) != v]
    if changed:
      sys.exit(f"pretraining_helps: error: {root} holds runs made with "
               f"{', '.join(changed)}; use another --workdir for other settings")
  root.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(settings, indent=2))


def run_experiment(workdir: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from beit_jax.data import classification  # pylint: disable=g-import-not-at-top
  from beit_jax import trainers  # pylint: disable=g-import-not-at-top
  root = epath.Path(workdir)
  check_settings(root)
  start = time.time()
  # Runs of the same shapes (the pretrained and random twins) compile once.
  jax.config.update("jax_compilation_cache_dir", str(root / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  tokenizer = _TOKENIZER.value or str(root / "tokenizer")
  if not _TOKENIZER.value:
    tok_config = pretrain_config(0, "")
    tok_config.trainer = "dvae"
    trainers.run(tok_config, tokenizer)
  stage_minutes = {"tokenizer": (time.time() - start) / 60}

  runs: dict[str, list[float]] = {k: [] for k in (
      "finetune/pretrained", "finetune/random", "probe/pretrained", "probe/random")}
  mim_acc, majority = [], []

  def timed(stage, config, run_dir):
    t = time.time()
    out = trainers.run(config, run_dir)
    stage_minutes[stage] = stage_minutes.get(stage, 0.0) + (time.time() - t) / 60
    return out

  downstream = root
  if _LABELS.value != "train":
    downstream = root / ("labels_" + re.sub(r"\W", "_", _LABELS.value.replace("%", "pct")))
  for seed in range(_SEEDS.value):
    seed_dir = root / f"seed_{seed}"
    pretrained = str(seed_dir / "pretrain")
    metrics = timed("pretrain", pretrain_config(seed, tokenizer), pretrained)
    if "mim_accuracy" in metrics:
      (seed_dir / "pretrain_metrics.json").write_text(json.dumps(metrics))
    else:  # finished earlier: its last logged values
      metrics = json.loads((seed_dir / "pretrain_metrics.json").read_text())
    mim_acc.append(metrics["mim_accuracy"])
    majority.append(metrics["majority_baseline"])
    for init, init_from in (("pretrained", pretrained), ("random", "")):
      ft = timed("finetune", finetune_config(seed, init_from),
                 str(downstream / f"seed_{seed}" / f"finetune_{init}"))
      runs[f"finetune/{init}"].append(ft["val_top1"])
      probe = timed("probe", probe_config(seed, init_from),
                    str(downstream / f"seed_{seed}" / f"probe_{init}"))
      runs[f"probe/{init}"].append(probe["val_top1"])
      logging.info("seed %d, %s: fine-tuned %.4f, probed %.4f", seed, init, ft["val_top1"],
                   probe["val_top1"])

  summary = results_table.summarise(runs)
  info = classification.dataset_info(finetune_config(0, ""))
  meta = dict(dataset=_DATASET.value, seeds=_SEEDS.value, labels=_LABELS.value,
              num_train=info.num_train, num_eval=info.num_eval,
              mim_accuracy=results_table.mean_std(mim_acc),
              majority_baseline=results_table.mean_std(majority),
              minutes=(time.time() - start) / 60, stage_minutes=stage_minutes,
              settings=_settings(),
              command=" ".join(["python -m beit_jax.experiments.pretraining_helps"] +
                               sys.argv[1:]))
  table = results_table.markdown(summary, meta)
  (downstream / "results.md").write_text(table + f"\n`{meta['command']}`\n")
  (downstream / "results.json").write_text(json.dumps(
      {"summary": summary, "runs": runs, "mim_accuracy_per_seed": mim_acc, **meta}, indent=2))
  results_table.plot(downstream / "results.png", summary, runs)
  print(table)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    sys.exit("pretraining_helps: error: --workdir is required")
  logs.quiet_libraries()
  run_experiment(_WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
