"""The pretrained-vs-random experiment: its summary, and a tiny run of it from the command line."""

import json
import subprocess
import sys

import pytest

from beit_jax.experiments import summary as results_table
from tests import runs

# One device, as the experiment runs: with conftest's 8 host devices on 2 busy cores, the
# segmentation evaluation's all-gather stalled past XLA's 40 s rendezvous limit (abort).
ONE_DEVICE = runs.cpu_env(1)


def test_summary_pairs_the_seeds():
  runs = {
    "finetune/v1": [0.9, 0.8, 0.7],
    "finetune/random": [0.8, 0.9, 0.5],
    "finetune/v2": [0.95, 0.85, 0.7],
    "probe/v1": [0.5, 0.5, 0.5],
    "probe/random": [0.2, 0.3, 0.4],
    "probe/v2": [0.6, 0.4, 0.7],
  }
  summary = results_table.summarise(runs, ("v1", "v2"))
  assert "segment" not in summary  # no segmentation runs: no table
  summary = results_table.summarise(
    {
      **runs,
      "segment/random": [0.1, 0.2, 0.3],
      "segment/v1": [0.2, 0.1, 0.4],
      "segment/v2": [0.3, 0.3, 0.3],
    },
    ("v1", "v2"),
  )
  ft, probe, seg = summary["finetune"], summary["probe"], summary["segment"]
  assert seg["v1"]["wins"] == 2 and seg["v2_vs_v1"]["wins"] == 2
  assert ft["v1"]["wins"] == 2 and probe["v1"]["wins"] == 3
  mean, std = ft["v1"]["difference"]  # paired: 0.1, -0.1, 0.2
  assert mean == pytest.approx(0.2 / 3) and std == pytest.approx(0.152753, abs=1e-6)
  assert probe["random"]["top1"] == pytest.approx((0.3, 0.1))
  assert ft["v2_vs_v1"]["difference"][0] == pytest.approx(0.1 / 3)  # 0.05, 0.05, 0
  assert ft["v2_vs_v1"]["wins"] == 2 and probe["v2_vs_v1"]["wins"] == 2
  meta = dict(
    seeds=3,
    dataset="digits",
    labels="train",
    num_train=1433,
    num_eval=364,
    mim={
      "v1": dict(mim_accuracy=(0.5, 0.01), majority_baseline=(0.1, 0.0)),
      "v2": dict(mim_accuracy=(0.2, 0.02), majority_baseline=(0.05, 0.0)),
    },
    minutes=1.0,
    segmentation_steps=1000,
  )
  table = results_table.markdown(summary, meta)
  assert "| BEiT v1 (dVAE tokens) | 23.3 ± 15.3 | +3.3 ± 11.5 (2 of 3) |" in table
  assert "linear probe +6.7 ± 15.3 (2 of 3), segmentation +6.7 ± 15.3 (2 of 3)." in table
  assert "Per seed, segmentation mIoU: random init 10.0, 20.0, 30.0;" in table
  assert "Per seed, fine-tuning: random init 80.0, 90.0, 50.0;" in table
  assert "1000 steps per run" in table
  assert "| random init | 73.3 ± 20.8 | | 30.0 ± 10.0 | | |" in table
  assert (
    "| BEiT v1 (dVAE tokens) | 80.0 ± 10.0 | +6.7 ± 15.3 (2 of 3) | 50.0 ± 0.0 | "
    "+20.0 ± 10.0 (3 of 3) | 50.0 ± 1.0 (10.0 ± 0.0) |"
  ) in table
  assert "| BEiT v2 (VQ-KD tokens) | 83.3 ± 12.6 |" in table
  assert "fine-tuning +3.3 ± 2.9 (2 of 3)" in table
  only_v2 = results_table.summarise(runs, ("v2",))
  assert "v2_vs_v1" not in only_v2["finetune"] and "v1" not in only_v2["probe"]


@pytest.mark.slow
def test_tiny_experiment_then_fewer_labels_reusing_pretraining(tmp_path):
  def run(*flags, fails=False, workdir=tmp_path):
    proc = subprocess.run(
      [
        sys.executable,
        "-m",
        "beit_jax.experiments.pretraining_helps",
        f"--workdir={workdir}",
        "--seeds=1",
        "--tokenizer_steps=2",
        "--pretrain_steps=2",
        "--finetune_steps=2",
        "--probe_steps=2",
        "--teacher_steps=2",
        "--width=32",
        "--segmentation_steps=2",
        *flags,
      ],
      cwd=runs.ROOT,
      capture_output=True,
      text=True,
      timeout=900,
      check=False,
      env=ONE_DEVICE,
    )
    assert (proc.returncode != 0) == fails, proc.stderr[-3000:]
    return proc.stderr if fails else proc.stdout

  # v1 only: v2's stages are the trainers of tests/test_vqkd_trainer.py and
  # test_patch_aggregation.py, and its tables are test_summary_pairs_the_seeds's (they would
  # double this test, the longest of the suite).
  out = run("--method=v1")
  assert "| BEiT v1 (dVAE tokens) |" in out and "BEiT v2" not in out
  assert "| validation mIoU (%) | segmentation | vs random |" in out
  results = json.loads((tmp_path / "results.json").read_text())
  assert all(len(v) == 1 for v in results["runs"].values())
  segment = {i: results["runs"][f"segment/{i}"][0] for i in ("random", "v1")}
  assert all(0 < v <= 1 for v in segment.values()), segment
  assert results["num_train"] == 1433 and (tmp_path / "results.png").stat().st_size > 0
  pretrained = tmp_path / "seed_0" / "pretrain" / "checkpoints" / "2"
  segmented = [
    tmp_path / "seed_0" / f"segment_{n}" / "results.json" for n in ("random", "pretrained")
  ]
  stamps = [p.stat().st_mtime_ns for p in [pretrained] + segmented]

  out = run("--labels=train[:70]", "--method=v1")
  labelled = tmp_path / "labels_train__70_"
  results = json.loads((labelled / "results.json").read_text())
  assert results["num_train"] == 70 and "70 labelled training images" in out
  assert (labelled / "seed_0" / "finetune_pretrained").is_dir()
  # The pretrained model and the segmentation runs (no `--labels`) were reused, not rerun.
  assert [p.stat().st_mtime_ns for p in [pretrained] + segmented] == stamps
  assert results["runs"]["segment/v1"] == [segment["v1"]]

  # Other pretraining settings in the same workdir would reuse the runs: refused, one line.
  err = run("--mask_patches=4", fails=True)
  assert "--mask_patches=6 (this run: 4)" in err.strip().splitlines()[-1]
  err = run("--segmentation_steps=3", fails=True)
  assert "--segmentation_steps=2 (this run: 3)" in err.strip().splitlines()[-1]
  # A teacher that is no run's workdir: one line naming the flag, before any compute.
  err = run(
    "--method=v2",
    f"--teacher={tmp_path / 'nothing'}",
    fails=True,
    workdir=tmp_path / "other_teacher",
  )
  assert (
    err.strip()
    .splitlines()[-1]
    .startswith(f"pretraining_helps: error: --teacher={tmp_path / 'nothing'} holds no config.json")
  )
