"""The benchmark runs on a config whose data set is not on this machine (ImageNet's), and
times the input pipeline per CPU core when the data are there; `--compare-pytorch` runs each
framework in processes of its own, alternating, and prints both steps' rates, their ratio and
a final json line; its PyTorch step's loss reads the masked positions only, and without torch
it is a one-line error."""

import contextlib
import io
import json
import os
import re
import sys

import pytest

from beit_jax import benchmark
from beit_jax.training import hardware
from beit_jax.errors import ConfigError
from configs import beit_base
from tests.tiny_config import tiny_config, tiny_finetune_config


def _shrunk(config):
  """`config`'s recipe on a seconds-sized model, batch and images."""
  config.model.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
  config.input.update(dict(batch_size=8, image_size=32, tokenizer_image_size=16))
  config.input.mask.update(dict(num_masking_patches=2, min_num_patches=1))
  config.tokenizer.update(dict(vocab_size=64, n_hid=8, n_blk_per_group=1, n_init=16))
  return config


@pytest.mark.slow
def test_beit_base_without_imagenet_times_the_step_and_skips_the_pipeline(tmp_path, capsys):
  config = _shrunk(beit_base.get_config())
  config.input.data_dir = str(tmp_path)  # surely no ImageNet there
  out = benchmark.benchmark(config, steps=2, pipeline_batches=2, matmul_size=256)
  printed = capsys.readouterr().out
  assert out["images_per_sec"] > 0 and out["flops_per_step"] > 0 and out["ceiling_flops"] > 0
  assert "pipeline_images_per_sec" not in out
  assert f"{out['images_per_sec']:.1f} images/s" in printed
  assert "% of ceiling" in printed
  assert f"host: CPU {benchmark.sig3(out['cpu_seconds_per_step'])} s per step" in printed
  assert 0 <= out["kernel_seconds_per_step"] <= out["cpu_seconds_per_step"]
  skipped = [line for line in printed.splitlines() if line.startswith("input pipeline")]
  assert len(skipped) == 1 and "skipped" in skipped[0]
  assert "tfds:imagenet2012" in skipped[0] and str(tmp_path) in skipped[0]


@pytest.mark.slow
def test_the_pipeline_rate_per_core_when_the_data_are_here(capsys):
  out = benchmark.benchmark(tiny_config(), steps=2, pipeline_batches=2, matmul_size=256)
  printed = capsys.readouterr().out
  cores = len(os.sched_getaffinity(0))
  assert out["pipeline_images_per_sec"] > 0
  assert out["pipeline_images_per_sec_per_core"] == pytest.approx(
    out["pipeline_images_per_sec"] / cores
  )
  assert f"per CPU core ({cores} cores)" in printed
  # Per CPU-second of the process: at most what its cores could give in the wall time.
  assert 0 < out["pipeline_images_per_cpu_second"]
  assert f"{out['pipeline_images_per_cpu_second']:.1f} per CPU-second used" in printed


def test_a_config_of_another_trainer_is_a_one_line_error():
  with pytest.raises(ConfigError, match="trainer='finetune'.*MIM"):
    benchmark.benchmark(tiny_finetune_config())


def test_known_devices_by_their_jax_kind():
  assert hardware.known_device("TPU v5 lite").peak_tflops == 197
  assert hardware.known_device("TPU v5").peak_tflops == 459
  assert hardware.known_device("NVIDIA H100 80GB HBM3").peak_tflops == 989
  assert hardware.known_device("NVIDIA H100 PCIe") is None
  assert hardware.known_device("cpu") is None


def test_the_peak_of_cpu_devices_is_a_measured_ceiling_they_share():
  import jax  # pylint: disable=g-import-not-at-top

  peak, source = hardware.peak_flops("float32", 128)
  assert peak > 0
  assert f"shared by {jax.local_device_count()} CPU device(s)" in source


def _three_significant_digits(printed: str) -> bool:
  """'0.862', '12.3', '8.00', '1230' (an integer rounded to its third digit) are."""
  digits = printed.replace(".", "").lstrip("0")
  return len(digits) == 3 or ("." not in printed and digits[3:].strip("0") == "")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
  """One `compare_pytorch` of a seconds-sized B/16 recipe, 2 rounds of 1 step: (what it
  returned, what it printed)."""
  for package in ("torch", "transformers", "dall_e"):
    pytest.importorskip(package)
  config = _shrunk(beit_base.get_config())
  config.input.data_dir = str(tmp_path_factory.mktemp("no_imagenet"))
  config.model.dtype = "float32"
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    out = benchmark.compare_pytorch(config, steps=1, rounds=2, matmul_size=128)
  return out, printed.getvalue()


@pytest.mark.slow
def test_compare_pytorch_prints_both_rates_to_3_digits_and_their_ratio(compared):
  out, printed = compared
  summary = printed[printed.index("\nsummary: ") :]  # the block after the processes' output
  jax_rate = re.search(r"JAX +(\S+) images/s", summary).group(1)
  torch_rate = re.search(r"PyTorch +(\S+) images/s", summary).group(1)
  ratio = re.search(r"JAX/PyTorch: (\S+)x", summary).group(1)
  assert jax_rate == benchmark.sig3(out["jax_images_per_sec"])
  assert torch_rate == benchmark.sig3(out["torch_images_per_sec"])
  assert all(map(_three_significant_digits, (jax_rate, torch_rate, ratio)))
  assert ratio == benchmark.sig3(out["jax_images_per_sec"] / out["torch_images_per_sec"])
  assert float(ratio) == pytest.approx(float(jax_rate) / float(torch_rate), rel=0.011)
  assert "XLA's count of the compiled JAX step" in summary
  assert summary.count("% of the") == 2 and "where the time goes" in summary
  assert out["jax_tokenizer_seconds"] > 0 and out["torch_tokenizer_seconds"] > 0
  for name, key in (("JAX", "jax"), ("PyTorch", "torch")):  # each process's step, the costs
    line = re.search(
      rf"{name} +steps (\S+) \| (\S+) s \(\| between processes\); CPU (\S+) s "
      r"per step, (\d+)% of it in the kernel; ([\d,]+) minor page faults",
      summary,
    )
    assert line, summary
    steps = out[f"{key}_steps"]
    assert [len(s) for s in steps] == [1, 1]
    assert line.group(1, 2) == tuple(benchmark.sig3(s[0]) for s in steps)
    median = (steps[0][0] + steps[1][0]) / 2
    assert out[f"{key}_step_seconds"] == pytest.approx(median)
    assert out[f"{key}_images_per_sec"] == pytest.approx(8 / median)  # batch 8
    assert line.group(3) == benchmark.sig3(out[f"{key}_cpu_seconds"])
    assert line.group(5).replace(",", "") == f"{out[f'{key}_page_faults']:.0f}"
  # The output ends with all of it on one line.
  last = printed.rstrip("\n").splitlines()[-1]
  assert last.startswith("json: ") and json.loads(last[len("json: ") :]) == out


@pytest.mark.slow
def test_compare_pytorch_alternates_processes_of_each_framework(compared):
  out, printed = compared
  order = [tuple(o) for o in out["order"]]
  assert [role for role, _ in order] == ["jax", "torch", "jax", "torch"]
  pids = [pid for _, pid in order]
  assert len(set(pids)) == 4 and os.getpid() not in pids
  said = re.findall(r"^ +(jax|torch) process: pid (\d+)$", printed, re.M)  # each child, first
  assert [(role, int(pid)) for role, pid in said] == order
  assert not out["torch_process_loaded_jax"]  # the PyTorch processes import no JAX
  # Both frameworks' processes timed the same batch (the parent checks their fingerprints).
  assert re.search(r"^  round 2/2: PyTorch process$", printed, re.M)


def test_a_childs_config_error_comes_back_as_one_line(tmp_path):
  torch = pytest.importorskip("torch")
  for package in ("transformers", "dall_e"):
    pytest.importorskip(package)
  if torch.cuda.is_available():
    pytest.skip("needs a torch without CUDA")
  spec = dict(device="cuda", steps=1, warmup=0, matmul_size=64, dtype="float32")
  with pytest.raises(ConfigError) as e:
    benchmark._run_child("torch", spec, str(tmp_path), 0)  # pylint: disable=protected-access
  assert "sees no CUDA device" in str(e.value) and "\n" not in str(e.value)


def test_host_cost_counts_the_first_touches_of_fresh_memory():
  import mmap  # pylint: disable=g-import-not-at-top

  pages = 16384  # 64 MiB of anonymous memory, not advised to use huge pages

  def touch_each_page():
    with mmap.mmap(-1, pages * mmap.PAGESIZE) as m:
      for i in range(pages):
        m[i * mmap.PAGESIZE] = 1
    return pages

  touched, cost = benchmark._host_cost(touch_each_page)  # pylint: disable=protected-access
  assert touched == pages and cost.wall > 0 and cost.cpu >= cost.kernel >= 0
  assert cost.faults >= pages  # each page faulted in on its first write
  _, idle = benchmark._host_cost(lambda: sum(range(1000)))  # pylint: disable=protected-access
  assert idle.faults < 100


def test_the_torch_reference_loss_reads_the_masked_positions_only():
  pytest.importorskip("dall_e")
  torch = pytest.importorskip("torch")
  from beit_jax.convert import torch_reference  # pylint: disable=g-import-not-at-top
  from beit_jax.convert import hf  # pylint: disable=g-import-not-at-top

  kw = dict(
    width=32,
    depth=1,
    num_heads=2,
    mlp_dim=64,
    patch_size=8,
    image_size=16,
    vocab_size=64,
    num_classes=0,
    use_abs_pos_emb=True,
    use_rel_pos_bias=False,
    use_shared_rel_pos_bias=False,
    layer_scale_init=0.0,
  )
  step = torch_reference.build(
    hf.config_json(kw),
    drop_path_rate=0.0,
    tokenizer=dict(n_hid=8, n_blk_per_group=1, vocab_size=64),
    optim=dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, grad_clip=3.0),
    autocast=None,
  )
  images = torch.rand(2, 3, 16, 16)
  mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
  tokens = torch.randint(0, 64, (2, 4))

  def loss(tokens):
    with torch.no_grad():
      return torch_reference.masked_loss(step.model, images, mask, tokens).item()

  unmasked, masked = tokens.clone(), tokens.clone()
  unmasked[~mask] = (unmasked[~mask] + 1) % 64
  masked[0, 3] = (masked[0, 3] + 1) % 64
  assert loss(unmasked) == loss(tokens)
  assert loss(masked) != loss(tokens)


def test_compare_pytorch_without_torch_is_a_one_line_error(monkeypatch):
  from beit_jax import convert  # pylint: disable=g-import-not-at-top

  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails
  monkeypatch.delitem(sys.modules, "beit_jax.convert.torch_reference", raising=False)
  monkeypatch.delattr(convert, "torch_reference", raising=False)
  with pytest.raises(ConfigError) as e:
    benchmark.compare_pytorch(_shrunk(beit_base.get_config()))
  assert "'torch'" in str(e.value) and "pip install -r requirements-interop.txt" in str(e.value)
  assert "\n" not in str(e.value)
