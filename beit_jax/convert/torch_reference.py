"""The unilm-equivalent PyTorch MIM step that `python -m beit_jax.benchmark --compare-pytorch`
times beside beit-jax's: OpenAI's DALL-E encoder tokenizes the tokenizer view under
`no_grad` (argmax tokens), then HF transformers' BEiT runs forward and backward with the
cross-entropy on the masked positions only (the MIM head on those rows alone, as unilm's
`return_all_tokens=False`), global-norm clipping and AdamW.

Only torch, transformers and dall_e: the benchmark hands in plain values, so this module
needs no JAX (the benchmark runs it in a process of its own, without JAX), and torch stays an
optional dependency (requirements-interop.txt). On CPU or on a CUDA device (`device`); the
attention is PyTorch's scaled_dot_product_attention (transformers' "sdpa"), its fused
kernels on a GPU.
"""

import contextlib
import dataclasses
import time
from typing import Any

import numpy as np
import torch
import transformers
from dall_e import Encoder

LOGIT_LAPLACE_EPS = 0.1  # dall_e.map_pixels; beit_jax.models.dvae's
PHASES = ("tokenizer", "forward", "backward", "optimizer")


def masked_loss(
  model: transformers.BeitForMaskedImageModeling,
  images: torch.Tensor,
  mask: torch.Tensor,
  tokens: torch.Tensor,
) -> torch.Tensor:
  """Cross-entropy of the MIM head at the masked patches only (unilm's
  `lm_head(norm(x)[:, 1:][bool_masked_pos])`, not HF's head over every patch).

  images [B, 3, H, W]; mask [B, N] bool; tokens [B, N] int.
  """
  hidden = model.beit(images, bool_masked_pos=mask).last_hidden_state  # [B, N+1, D]
  logits = model.lm_head(model.layernorm(hidden)[:, 1:][mask])  # [masked, V]
  return torch.nn.functional.cross_entropy(logits.float(), tokens[mask])


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
  """AdamW groups as beit-jax's (optim.weight_decay_mask): no decay for 1-D params and
  the [CLS] / position embeddings."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    skip = p.ndim <= 1 or name.endswith(("cls_token", "position_embeddings"))
    (no_decay if skip else decay).append(p)
  return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def _clock(device: torch.device) -> float:
  """The host clock once `device`'s queued work is done (CUDA runs asynchronously)."""
  if device.type == "cuda":
    torch.cuda.synchronize(device)
  return time.perf_counter()


@dataclasses.dataclass
class Step:
  """One MIM train step on `device`; `autocast` None runs float32, else torch's autocast
  dtype (on the device's type)."""

  tokenizer: Encoder
  model: transformers.BeitForMaskedImageModeling
  optimizer: torch.optim.Optimizer
  grad_clip: float
  autocast: torch.dtype | None
  device: torch.device = torch.device("cpu")

  def __call__(
    self, images: torch.Tensor, tokenizer_images: torch.Tensor, mask: torch.Tensor
  ) -> dict[str, float]:
    """Trains on the batch; returns the seconds of each of `PHASES` and the loss."""
    t0 = _clock(self.device)
    with torch.no_grad():  # unilm tokenizes outside autocast
      mapped = (1 - 2 * LOGIT_LAPLACE_EPS) * tokenizer_images + LOGIT_LAPLACE_EPS
      tokens = self.tokenizer(mapped).argmax(1).flatten(1)  # [B, N]
    t1 = _clock(self.device)
    amp = (
      torch.autocast(device_type=self.device.type, dtype=self.autocast)
      if self.autocast
      else contextlib.nullcontext()
    )
    with amp:
      loss = masked_loss(self.model, images, mask, tokens)
    t2 = _clock(self.device)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t3 = _clock(self.device)
    if self.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
    self.optimizer.step()
    t4 = _clock(self.device)
    return dict(
      tokenizer=t1 - t0, forward=t2 - t1, backward=t3 - t2, optimizer=t4 - t3, loss=loss.item()
    )


def build(
  hf_config: dict[str, Any],
  *,
  drop_path_rate: float,
  tokenizer: dict[str, int],
  optim: dict[str, float],
  autocast: str | None,
  seed: int = 0,
  device: str = "cpu",
) -> Step:
  """The step of a BeitConfig (`beit_jax.convert.hf.config_json`'s fields), a DALL-E
  encoder (n_hid, n_blk_per_group, vocab_size), AdamW (lr, b1, b2, eps, weight_decay,
  grad_clip); random weights, on `device` ('cpu', 'cuda'). `autocast`: None (float32) or a
  torch dtype name."""
  torch.manual_seed(seed)
  device = torch.device(device)
  config = transformers.BeitConfig(
    **hf_config, drop_path_rate=drop_path_rate, attn_implementation="sdpa"
  )
  model = transformers.BeitForMaskedImageModeling(config).to(device).train()
  encoder = Encoder(requires_grad=False, **tokenizer).to(device).eval()
  opt = torch.optim.AdamW(
    _decay_groups(model, optim["weight_decay"]),
    lr=optim["lr"],
    betas=(optim["b1"], optim["b2"]),
    eps=optim["eps"],
  )
  return Step(
    encoder, model, opt, optim["grad_clip"], getattr(torch, autocast) if autocast else None, device
  )


def to_torch(batch: dict[str, np.ndarray], device: str = "cpu") -> dict[str, torch.Tensor]:
  """The benchmark's NHWC host batch -> NCHW images and the bool mask on `device`, as
  `Step` takes."""
  nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  return dict(
    images=nchw(batch["image"]).to(device),
    tokenizer_images=nchw(batch["tokenizer_image"]).to(device),
    mask=torch.from_numpy(batch["mask"]).bool().to(device),
  )


def matmul_ceiling(size: int, dtype: str, repeats: int = 5, device: str = "cpu") -> float:
  """Achieved FLOP/s of a [size, size] @ [size, size] torch matmul in `dtype` (what
  autocast hands oneDNN or cuBLAS) on `device`, the counterpart of
  `beit_jax.training.hardware.matmul_ceiling` (ones as its operands, as there)."""
  device = torch.device(device)
  a = torch.ones((size, size), dtype=getattr(torch, dtype), device=device)
  torch.mm(a, a)  # warm-up
  t = _clock(device)
  for _ in range(repeats):
    torch.mm(a, a)
  return 2 * size**3 * repeats / (_clock(device) - t)


def device_kind(device: str) -> str:
  """The device's name as `jax.Device.device_kind` spells it for the same chip
  ('NVIDIA H100 80GB HBM3'; 'cpu' for the host), for `beit_jax.training.hardware.known_device`."""
  device = torch.device(device)
  return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def describe(step: Step) -> str:
  """The versions and settings the timing depends on, for the benchmark's output."""
  where = (
    f"{device_kind(step.device)}, CUDA {torch.version.cuda}"
    if step.device.type == "cuda"
    else f"{torch.get_num_threads()} threads"
  )
  return (
    f"torch {torch.__version__} ({where}), transformers {transformers.__version__} "
    f"(attention {step.model.config._attn_implementation})"
  )
