"""What every converter shares: reading torch / safetensors files safely, key checks."""

import argparse
import json
from typing import Any, Iterable

import numpy as np
from etils import epath

from beit_jax.errors import ConfigError

StateDict = dict[str, np.ndarray]

_MAX_LISTED = 8


def listing(names: Iterable[str]) -> str:
  """'a, b, c', cut after a few names so an error stays one readable line."""
  names = sorted(names)
  shown = ", ".join(names[:_MAX_LISTED])
  if len(names) > _MAX_LISTED:
    shown += f", ... ({len(names)} in all)"
  return shown


def first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def require_file(path: str, what: str) -> epath.Path:
  p = epath.Path(path)
  if not p.is_file():
    raise ConfigError(f"{what} is not a file")
  return p


class PickledModule:
  """Stands in for a pickled `torch.nn.Module` class: keeps its state, runs nothing.

  Lets a pickled module (OpenAI's `encoder.pkl`) be read without the package that
  defined it and without unpickling arbitrary code.
  """

  pickled_name: str = ""

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)

  def state_dict(self, prefix: str = "") -> dict[str, Any]:
    """Parameters and buffers by their torch `state_dict` names."""
    out = {}
    for group in ("_parameters", "_buffers"):
      for name, value in (self.__dict__.get(group) or {}).items():
        if value is not None:
          out[prefix + name] = value
    for name, sub in (self.__dict__.get("_modules") or {}).items():
      if isinstance(sub, PickledModule):
        out.update(sub.state_dict(f"{prefix}{name}."))
    return out


def _stand_in(name: str) -> type[PickledModule]:
  return type(name.rpartition(".")[2], (PickledModule,), {"pickled_name": name})


def load_torch(path: str, what: str, module_classes: Iterable[str] = ()) -> Any:
  """`torch.load(weights_only=True)`: the file's pickle may build tensors, not run code.

  Args:
    path: a `torch.save` file.
    what: how errors name the file, e.g. 'unilm checkpoint /x.pth'.
    module_classes: 'package.module.Class' names of pickled modules to accept; they
      load as `PickledModule` stand-ins.

  Returns:
    the unpickled object, tensors on the CPU.
  """
  p = require_file(path, what)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError(
      f"reading {what} needs torch: pip install -r requirements-interop.txt"
    ) from None
  # unilm checkpoints also pickle their argparse arguments.
  safe = [argparse.Namespace] + [(_stand_in(n), n) for n in module_classes]
  try:
    with torch.serialization.safe_globals(safe):
      return torch.load(str(p), map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(
      f"{what} cannot be read as a PyTorch checkpoint of that kind ({first_line(e)})"
    ) from None


def tensors_to_numpy(tree: dict[str, Any], what: str) -> StateDict:
  """A flat dict of torch tensors -> float32 (or integer) numpy arrays."""
  import torch  # pylint: disable=g-import-not-at-top

  out = {}
  for key, value in tree.items():
    if not isinstance(value, torch.Tensor):
      raise ConfigError(f"{what}: entry {key!r} is a {type(value).__name__}, not a tensor")
    value = value.detach().cpu()
    out[key] = (value.float() if value.is_floating_point() else value).numpy()
  return out


def load_safetensors(path: str, what: str) -> StateDict:
  """A safetensors file via its numpy API (no torch); floats become float32."""
  p = require_file(path, what)
  try:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError(f"reading {what} needs the safetensors package") from None
  try:
    sd = load_file(str(p))
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(
      f"{what} is not a safetensors file numpy can read ({first_line(e)})"
    ) from None
  return {
    k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in sd.items()
  }


def check_keys(what: str, *, missing: Iterable[str] = (), unexpected: Iterable[str] = ()) -> None:
  """One ConfigError naming every missing and unexpected key."""
  missing, unexpected = set(missing), set(unexpected)
  parts = []
  if missing:
    parts.append(f"missing keys {listing(missing)}")
  if unexpected:
    parts.append(f"unexpected keys {listing(unexpected)}")
  if parts:
    raise ConfigError(f"{what}: {'; '.join(parts)}")


def ensure_new_dir(path: str, what: str) -> epath.Path:
  """Converters never write into a folder that already holds something."""
  p = epath.Path(path)
  if p.exists() and (not p.is_dir() or any(p.iterdir())):
    raise ConfigError(f"{what} {path} already exists and is not an empty folder")
  p.mkdir(parents=True, exist_ok=True)
  return p


def read_hf_weights(folder: epath.Path, what: str) -> StateDict:
  """A save_pretrained folder's model.safetensors or pytorch_model.bin, either possibly
  sharded (*.index.json)."""

  def bin_(path):
    return tensors_to_numpy(load_torch(path, f"HF weights {path}"), f"HF weights {path}")

  def safetensors(path):
    return load_safetensors(path, f"HF weights {path}")

  for name, reader in (("model.safetensors", safetensors), ("pytorch_model.bin", bin_)):
    index = folder / f"{name}.index.json"
    if index.exists():
      shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
      return {k: v for shard in shards for k, v in reader(str(folder / shard)).items()}
    if (folder / name).exists():
      return reader(str(folder / name))
  raise ConfigError(f"{what} has no model.safetensors or pytorch_model.bin")


def read_hf_config(path: str) -> tuple[epath.Path, dict[str, Any], str]:
  """(folder, its config.json, a name for messages) of a save_pretrained folder."""
  what = f"HF folder {path}"
  folder = epath.Path(path)
  if not (folder / "config.json").is_file():
    raise ConfigError(f"{what} is not a HuggingFace save_pretrained folder (no config.json)")
  try:
    config = json.loads((folder / "config.json").read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{what}: config.json is not JSON ({e})") from None
  return folder, config, what
