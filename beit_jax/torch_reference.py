"""The unilm-equivalent PyTorch MIM step that `python -m beit_jax.benchmark --compare-pytorch`
times beside beit-jax's: OpenAI's DALL-E encoder tokenizes the tokenizer view under
`no_grad` (argmax tokens), then HF transformers' BEiT runs forward and backward with the
cross-entropy on the masked positions only (the MIM head on those rows alone, as unilm's
`return_all_tokens=False`), global-norm clipping and AdamW.

Only torch, transformers and dall_e: the benchmark hands in plain values, so this module
needs no JAX, and torch stays an optional dependency (requirements-interop.txt).
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


def masked_loss(model: transformers.BeitForMaskedImageModeling, images: torch.Tensor,
                mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
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
  return [dict(params=decay, weight_decay=weight_decay),
          dict(params=no_decay, weight_decay=0.0)]


@dataclasses.dataclass
class Step:
  """One MIM train step; `autocast` None runs float32, else torch's CPU autocast dtype."""
  tokenizer: Encoder
  model: transformers.BeitForMaskedImageModeling
  optimizer: torch.optim.Optimizer
  grad_clip: float
  autocast: torch.dtype | None

  def __call__(self, images: torch.Tensor, tokenizer_images: torch.Tensor,
               mask: torch.Tensor) -> dict[str, float]:
    """Trains on the batch; returns the seconds of each of `PHASES` and the loss."""
    t0 = time.perf_counter()
    with torch.no_grad():  # unilm tokenizes outside autocast
      mapped = (1 - 2 * LOGIT_LAPLACE_EPS) * tokenizer_images + LOGIT_LAPLACE_EPS
      tokens = self.tokenizer(mapped).argmax(1).flatten(1)  # [B, N]
    t1 = time.perf_counter()
    amp = (torch.autocast(device_type="cpu", dtype=self.autocast) if self.autocast
           else contextlib.nullcontext())
    with amp:
      loss = masked_loss(self.model, images, mask, tokens)
    t2 = time.perf_counter()
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t3 = time.perf_counter()
    if self.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
    self.optimizer.step()
    t4 = time.perf_counter()
    return dict(tokenizer=t1 - t0, forward=t2 - t1, backward=t3 - t2, optimizer=t4 - t3,
                loss=loss.item())


def build(hf_config: dict[str, Any], *, drop_path_rate: float, tokenizer: dict[str, int],
          optim: dict[str, float], autocast: str | None, seed: int = 0) -> Step:
  """The step of a BeitConfig (`beit_jax.convert.hf.config_json`'s fields), a DALL-E
  encoder (n_hid, n_blk_per_group, vocab_size), AdamW (lr, b1, b2, eps, weight_decay,
  grad_clip); random weights. `autocast`: None (float32) or a torch dtype name."""
  torch.manual_seed(seed)
  config = transformers.BeitConfig(**hf_config, drop_path_rate=drop_path_rate)
  model = transformers.BeitForMaskedImageModeling(config).train()
  encoder = Encoder(requires_grad=False, **tokenizer).eval()
  opt = torch.optim.AdamW(_decay_groups(model, optim["weight_decay"]), lr=optim["lr"],
                          betas=(optim["b1"], optim["b2"]), eps=optim["eps"])
  return Step(encoder, model, opt, optim["grad_clip"],
              getattr(torch, autocast) if autocast else None)


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
  """The benchmark's NHWC host batch -> NCHW images and the bool mask, as `Step` takes."""
  nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  return dict(images=nchw(batch["image"]), tokenizer_images=nchw(batch["tokenizer_image"]),
              mask=torch.from_numpy(batch["mask"]).bool())


def matmul_ceiling(size: int, dtype: str, repeats: int = 5) -> float:
  """Achieved FLOP/s of a [size, size] @ [size, size] torch matmul in `dtype` (what
  autocast hands oneDNN), the counterpart of `beit_jax.hardware.matmul_ceiling`."""
  a = torch.ones((size, size), dtype=getattr(torch, dtype))
  torch.mm(a, a)  # warm-up
  t = time.perf_counter()
  for _ in range(repeats):
    torch.mm(a, a)
  return 2 * size**3 * repeats / (time.perf_counter() - t)


def describe(step: Step) -> str:
  """The versions and settings the timing depends on, for the benchmark's output."""
  return (f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__} (attention {step.model.config._attn_implementation})")
