"""The benchmark runs on a config whose data set is not on this machine (ImageNet's), and
times the input pipeline per CPU core when the data are there."""
import os

import pytest

from beit_jax import benchmark
from beit_jax import hardware
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
      out["pipeline_images_per_sec"] / cores)
  assert f"per CPU core ({cores} cores)" in printed


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
