r"""Converts BEiT checkpoints between beit-jax and the PyTorch world.

  python -m beit_jax.convert --from=unilm --to=beit_jax beit_base_patch16_224_pt22k.pth DST
  python -m beit_jax.convert --from=unilm --to=beit_jax \
      vqkd_encoder_base_decoder_3x768x12_clip.pth DST
  python -m beit_jax.convert --from=hf --to=beit_jax ./beit-base-patch16-224-pt22k DST
  python -m beit_jax.convert --from=dalle --to=beit_jax ./dall_e DST   # encoder.pkl, decoder.pkl
  python -m beit_jax.convert --from=beit_jax --to=hf WORKDIR ./beit_hf

A beit-jax DST is what `--config.init_from=DST` (ViT) or
`--config.tokenizer.init_from=DST` (dVAE) starts a run from; a hf DST is a
`save_pretrained` folder. Model sizes come from the weights; `--num_heads` /
`--variant` / `--image_size` fill in what they do not record. Errors are one line.

`--from=unilm` reads BEiT / BEiT v2 ViTs and BEiT v2's VQ-KD tokenizers, told apart by
their keys (a VQ-KD has `encoder.*` and `quantize.embedding.weight`, a ViT a top-level
`cls_token`): both are unilm `.pth` files, and the keys cannot be mistaken. A v2
pretraining checkpoint keeps its patch-aggregation decoder (`cls_pt_layers.*`, so a v2 run
can resume from it) unless `--patch_aggregation=drop`; HF export always drops it.
"""

import argparse
import sys
from typing import Any

from beit_jax.convert import dalle
from beit_jax.convert import hf
from beit_jax.params import vit as vit_params
from beit_jax.convert import unilm
from beit_jax.convert import vqkd
from beit_jax.errors import ConfigError
from beit_jax.models import vit

SOURCES = ("unilm", "hf", "dalle", "beit_jax")
TARGETS = ("beit_jax", "hf")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m beit_jax.convert",
    description="Convert BEiT / DALL-E checkpoints to beit-jax or HuggingFace.",
  )
  parser.add_argument(
    "--from",
    dest="source",
    required=True,
    choices=SOURCES,
    help="unilm: a .pth state dict; hf: a save_pretrained folder; dalle: "
    "a folder with encoder.pkl and decoder.pkl; beit_jax: a checkpoint "
    "folder or run workdir",
  )
  parser.add_argument("--to", dest="target", required=True, choices=TARGETS)
  parser.add_argument("src")
  parser.add_argument("dst", help="output folder (must not exist or be empty)")
  parser.add_argument(
    "--image_size",
    type=int,
    default=None,
    help="image size of the output model: position parameters are "
    "resized to its patch grid (default: the source's)",
  )
  parser.add_argument(
    "--rel_pos",
    choices=vit_params.REL_POS_CHOICES,
    default="keep",
    help="relative position bias of the output: one table shared by all "
    "blocks, or one per block (a shared one is copied to each)",
  )
  parser.add_argument(
    "--num_heads",
    type=int,
    default=None,
    help="heads, for weights without a relative position table",
  )
  parser.add_argument(
    "--variant", default=None, help="e.g. B/16: heads from it, and a check of the other sizes"
  )
  parser.add_argument(
    "--encoder_only", action="store_true", help="dalle: convert encoder.pkl alone (no decoder.pkl)"
  )
  parser.add_argument(
    "--patch_aggregation",
    choices=("keep", "drop"),
    default="keep",
    help="BEiT v2 pretraining checkpoints: keep the patch-aggregation "
    "decoder (cls_pt_layers, to resume v2 pretraining) or drop it",
  )
  parser.add_argument(
    "--patch_aggregation_layer",
    type=int,
    default=None,
    help="the block whose outputs v2's decoder aggregates (unilm "
    "--early_layers), when the checkpoint does not record it",
  )
  return parser.parse_args(argv)


def _variant_kwargs(variant: str) -> dict[str, Any]:
  try:
    return vit.variant_kwargs(variant)
  except ValueError as e:
    raise ConfigError(f"--variant={variant}: {e}") from None


def _check_variant(kw: dict[str, Any], variant: str) -> None:
  for field, value in _variant_kwargs(variant).items():
    if kw[field] != value:
      raise ConfigError(f"--variant={variant} has {field}={value} but the weights have {kw[field]}")


def _load_vit(
  args: argparse.Namespace, unilm_checkpoint: tuple | None = None
) -> tuple[dict, dict[str, Any]]:
  heads = args.num_heads
  if heads is None and args.variant:
    heads = _variant_kwargs(args.variant)["num_heads"]
  if args.source == "unilm":
    what = f"unilm checkpoint {args.src}"
    sd, ckpt_args = unilm_checkpoint or unilm.load_checkpoint(args.src)
    kw = unilm.infer_model_kwargs(sd, what, num_heads=heads, fallback_image_size=args.image_size)
    # The backbone first, so that its errors come before the decoder's.
    params = (
      unilm.to_params(sd, kw, what)
      if args.patch_aggregation == "drop"
      else (unilm.to_params({k: v for k, v in sd.items() if not k.startswith("cls_pt_")}, kw, what))
    )
    if args.patch_aggregation == "keep" and unilm.has_patch_aggregation(sd):
      kw.update(
        unilm.patch_aggregation_kwargs(
          sd, kw, what, layer=args.patch_aggregation_layer, checkpoint_args=ckpt_args
        )
      )
      params = unilm.to_params(sd, kw, what)
    return params, kw
  if args.source == "hf":
    return hf.load(args.src)
  params, kw = vit_params.load(
    args.src,
    num_heads=heads,
    fallback_image_size=args.image_size,
    patch_aggregation_layer=args.patch_aggregation_layer,
  )
  if args.patch_aggregation == "drop":
    params, kw = _drop_patch_aggregation(params, kw)
  return params, kw


def _drop_patch_aggregation(params: dict, kw: dict[str, Any]) -> tuple[dict, dict[str, Any]]:
  """The backbone alone (v2's decoder is thrown away after pretraining)."""
  return (
    {k: v for k, v in params.items() if not k.startswith("cls_pt_layers_")},
    unilm.without_patch_aggregation(kw),
  )


def _convert_vqkd(args: argparse.Namespace, sd: dict) -> str:
  if args.target != "beit_jax":
    raise ConfigError("a VQ-KD tokenizer converts --to=beit_jax only (transformers has no VQ-KD)")
  if args.image_size or args.rel_pos != "keep" or args.variant:
    raise ConfigError(
      "--image_size, --rel_pos and --variant apply to ViT checkpoints, not to a VQ-KD tokenizer"
    )
  variables, fields = vqkd.load(sd, f"unilm VQ-KD checkpoint {args.src}", num_heads=args.num_heads)
  vqkd.save(args.dst, variables, fields, f"unilm:{args.src}")
  return (
    f"Wrote the VQ-KD tokenizer to {args.dst}. Start a BEiT v2 run from it with "
    f"--config.tokenizer.init_from={args.dst} {vqkd.config_flags(fields)}"
  )


def convert(args: argparse.Namespace) -> str:
  """Runs one conversion; returns what to tell the user."""
  if args.source == "dalle":
    if args.target != "beit_jax":
      raise ConfigError(
        "--from=dalle converts --to=beit_jax only (transformers has no DALL-E dVAE)"
      )
    if args.image_size or args.rel_pos != "keep" or args.num_heads or args.variant:
      raise ConfigError(
        "--image_size, --rel_pos, --num_heads and --variant apply to ViT "
        "checkpoints, not --from=dalle"
      )
    params, fields = dalle.load(args.src, encoder_only=args.encoder_only)
    dalle.save(args.dst, params, fields, f"dalle:{args.src}")
    return (
      f"Wrote the DALL-E dVAE to {args.dst}. Start a MIM run from it with "
      f"--config.tokenizer.init_from={args.dst} {dalle.config_flags(fields)}"
    )
  if args.encoder_only:
    raise ConfigError("--encoder_only applies to --from=dalle")
  loaded = unilm.load_checkpoint(args.src) if args.source == "unilm" else None
  if loaded is not None and vqkd.is_vqkd(loaded[0]):
    return _convert_vqkd(args, loaded[0])

  params, kw = _load_vit(args, loaded)
  if args.num_heads is not None and kw["num_heads"] != args.num_heads:
    raise ConfigError(f"--num_heads={args.num_heads} but {args.src} has {kw['num_heads']} heads")
  if args.variant:
    _check_variant(kw, args.variant)
  params, kw = vit_params.adapt(params, kw, rel_pos=args.rel_pos, image_size=args.image_size)
  if args.target == "hf":
    params, kw = _drop_patch_aggregation(params, kw)
    arch = hf.save_pretrained(args.dst, params, kw)
    return (
      f"Wrote a HuggingFace folder to {args.dst}: transformers.{arch}.from_pretrained({args.dst!r})"
    )
  vit_params.save(args.dst, params, kw, f"{args.source}:{args.src}")
  return (
    f"Wrote beit-jax params to {args.dst}. Start a run from them with "
    f"--config.init_from={args.dst}; the matching model: {vit_params.config_flags(kw)}"
  )


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    print(convert(args))
  except ConfigError as e:
    print(f"beit_jax.convert: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
