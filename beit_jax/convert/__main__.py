r"""Converts BEiT checkpoints between beit-jax and the PyTorch world.

  python -m beit_jax.convert --from=unilm --to=beit_jax beit_base_patch16_224_pt22k.pth DST
  python -m beit_jax.convert --from=hf --to=beit_jax ./beit-base-patch16-224-pt22k DST
  python -m beit_jax.convert --from=dalle --to=beit_jax ./dall_e DST   # encoder.pkl, decoder.pkl
  python -m beit_jax.convert --from=beit_jax --to=hf WORKDIR ./beit_hf

A beit-jax DST is what `--config.init_from=DST` (ViT) or
`--config.tokenizer.init_from=DST` (dVAE) starts a run from; a hf DST is a
`save_pretrained` folder. Model sizes come from the weights; `--num_heads` /
`--variant` / `--image_size` fill in what they do not record. Errors are one line.
"""
import argparse
import sys
from typing import Any

from beit_jax.convert import dalle
from beit_jax.convert import hf
from beit_jax.convert import layout
from beit_jax.convert import unilm
from beit_jax.errors import ConfigError
from beit_jax.models import vit

SOURCES = ("unilm", "hf", "dalle", "beit_jax")
TARGETS = ("beit_jax", "hf")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m beit_jax.convert",
      description="Convert BEiT / DALL-E checkpoints to beit-jax or HuggingFace.")
  parser.add_argument("--from", dest="source", required=True, choices=SOURCES,
                      help="unilm: a .pth state dict; hf: a save_pretrained folder; dalle: "
                      "a folder with encoder.pkl and decoder.pkl; beit_jax: a checkpoint "
                      "folder or run workdir")
  parser.add_argument("--to", dest="target", required=True, choices=TARGETS)
  parser.add_argument("src")
  parser.add_argument("dst", help="output folder (must not exist or be empty)")
  parser.add_argument("--image_size", type=int, default=None,
                      help="image size of the output model: position parameters are "
                      "resized to its patch grid (default: the source's)")
  parser.add_argument("--rel_pos", choices=layout.REL_POS_CHOICES, default="keep",
                      help="relative position bias of the output: one table shared by all "
                      "blocks, or one per block (a shared one is copied to each)")
  parser.add_argument("--num_heads", type=int, default=None,
                      help="heads, for weights without a relative position table")
  parser.add_argument("--variant", default=None,
                      help="e.g. B/16: heads from it, and a check of the other sizes")
  parser.add_argument("--encoder_only", action="store_true",
                      help="dalle: convert encoder.pkl alone (no decoder.pkl)")
  return parser.parse_args(argv)


def _check_variant(kw: dict[str, Any], variant: str) -> None:
  for field, value in vit.variant_kwargs(variant).items():
    if kw[field] != value:
      raise ConfigError(f"--variant={variant} has {field}={value} but the weights have "
                        f"{kw[field]}")


def _load_vit(args: argparse.Namespace) -> tuple[dict, dict[str, Any]]:
  heads = args.num_heads
  if heads is None and args.variant:
    heads = vit.variant_kwargs(args.variant)["num_heads"]
  if args.source == "unilm":
    what = f"unilm checkpoint {args.src}"
    sd = unilm.load_state_dict(args.src)
    kw = unilm.infer_model_kwargs(sd, what, num_heads=heads,
                                  fallback_image_size=args.image_size)
    return unilm.to_params(sd, kw, what), kw
  if args.source == "hf":
    return hf.load(args.src)
  return layout.load(args.src, num_heads=heads, fallback_image_size=args.image_size)


def convert(args: argparse.Namespace) -> str:
  """Runs one conversion; returns what to tell the user."""
  if args.source == "dalle":
    if args.target != "beit_jax":
      raise ConfigError("--from=dalle converts --to=beit_jax only (transformers has no "
                        "DALL-E dVAE)")
    if args.image_size or args.rel_pos != "keep" or args.num_heads or args.variant:
      raise ConfigError("--image_size, --rel_pos, --num_heads and --variant apply to ViT "
                        "checkpoints, not --from=dalle")
    params, fields = dalle.load(args.src, encoder_only=args.encoder_only)
    dalle.save(args.dst, params, fields, f"dalle:{args.src}")
    return (f"Wrote the DALL-E dVAE to {args.dst}. Start a MIM run from it with "
            f"--config.tokenizer.init_from={args.dst} {dalle.config_flags(fields)}")
  if args.encoder_only:
    raise ConfigError("--encoder_only applies to --from=dalle")

  params, kw = _load_vit(args)
  if args.num_heads is not None and kw["num_heads"] != args.num_heads:
    raise ConfigError(f"--num_heads={args.num_heads} but {args.src} has {kw['num_heads']} "
                      "heads")
  if args.variant:
    _check_variant(kw, args.variant)
  params, kw = layout.adapt(params, kw, rel_pos=args.rel_pos, image_size=args.image_size)
  if args.target == "hf":
    arch = hf.save_pretrained(args.dst, params, kw)
    return (f"Wrote a HuggingFace folder to {args.dst}: "
            f"transformers.{arch}.from_pretrained({args.dst!r})")
  layout.save(args.dst, params, kw, f"{args.source}:{args.src}")
  return (f"Wrote beit-jax params to {args.dst}. Start a run from them with "
          f"--config.init_from={args.dst}; the matching model: {layout.config_flags(kw)}")


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
