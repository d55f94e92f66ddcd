"""gs:// workdirs against a local GCS emulator (see tests/gcs_emulator.py).

What goes through etils.epath (fsspec/gcsfs) and orbax (tensorstore) reaches the
emulator and is tested here for real: file operations, checkpoints, and tiny MIM runs
through `main.run` and the CLI (resume after SIGKILL, fallback, keep-N, init_from,
TensorBoard events, unusable buckets). TensorFlow's GCS filesystem (tf.summary, so clu's
default TensorBoard writer, tf.io.gfile) cannot be pointed at it -- the reason
beit_jax/training/events.py writes events through epath: that is shown in a network namespace
with no way out, so it fails at once instead of going to GCS.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from beit_jax.training import checkpoint
from beit_jax import params as params_lib
from beit_jax.errors import ConfigError
from tests import gcs_emulator as gcs_emulator_module
from tests import runs
from tests.gcs_emulator import gcs_bucket, gcs_dir, gcs_emulator  # noqa: F401  pylint: disable=unused-import

for _needed in ("gcp_storage_emulator", "gcsfs"):
  pytest.importorskip(_needed, reason="pip install -r requirements-gcs-test.txt")


def _state(seed: int) -> dict:
  return {
    "params": {
      "dense": {
        "kernel": jax.random.normal(jax.random.key(seed), (4, 8)),
        "bias": jnp.arange(8.0) + seed,
      }
    },
    "step": jnp.array(seed, jnp.int32),
  }


def _many_arrays(seed: int, n: int = 40) -> dict:
  """Enough leaves that tensorstore's OCDBT reads back and rewrites its manifest.

  With 40 leaves that fails on the bare emulator ("Malformed StorageGeneration"); the
  fixture adds the generation support it needs (see gcs_emulator._patch_handlers).
  """
  return {
    f"layer_{i}": {"w": jnp.full((16, 8), float(seed * 100 + i)), "b": jnp.arange(8.0) + i}
    for i in range(n)
  }


def _abstract(state: dict) -> dict:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _files(root: epath.Path) -> list[epath.Path]:
  out = []
  for p in root.iterdir():
    out += _files(p) if p.is_dir() else [p]
  return out


def test_epath_file_operations(gcs_dir):  # pylint: disable=redefined-outer-name
  root = epath.Path(gcs_dir)
  assert type(root._backend).__name__ == "_FileSystemSpecBackend"  # pylint: disable=protected-access
  assert not root.exists()
  (root / "sub").mkdir(parents=True, exist_ok=True)
  (root / "sub" / "a.txt").write_text("hello")
  (root / "b.bin").write_bytes(b"\x00\x01")
  assert (root / "sub" / "a.txt").read_text() == "hello"
  assert (root / "b.bin").read_bytes() == b"\x00\x01"
  assert root.is_dir() and (root / "sub").is_dir() and (root / "b.bin").is_file()
  assert sorted(p.name for p in root.iterdir()) == ["b.bin", "sub"]
  assert [p.name for p in root.glob("sub/*.txt")] == ["a.txt"]
  (root / "sub" / "a.txt").rename(root / "sub" / "c.txt")  # objects.move (see gcs_emulator)
  assert [p.name for p in (root / "sub").iterdir()] == ["c.txt"]
  (root / "sub").rename(root / "moved")  # a "directory": every object under it
  assert (root / "moved" / "c.txt").read_text() == "hello" and not (root / "sub").exists()
  (root / "b.bin").unlink()
  root.rmtree()
  assert not root.exists()


def test_checkpoints_keep_n_and_restore_latest(gcs_dir):  # pylint: disable=redefined-outer-name
  manager = checkpoint.make_manager(gcs_dir, every_steps=1, keep=2)  # async, as in training
  for step in (1, 2, 3):
    checkpoint.save(manager, step, _many_arrays(step), {"skipped_images": {"undecodable": step}})
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 3]
  names = sorted(p.name for p in (epath.Path(gcs_dir) / "checkpoints").iterdir())
  assert names == ["2", "3"], names  # step 1 deleted from the bucket, no tmp folders left
  state, meta = checkpoint.restore_latest(manager, _abstract(_many_arrays(0)))
  assert meta == {"skipped_images": {"undecodable": 3}, "step": 3}
  _assert_same(state, _many_arrays(3))
  manager.close()
  # A second manager (a resumed run) sees the same steps.
  again = checkpoint.make_manager(gcs_dir, every_steps=1, keep=2)
  assert again.all_steps() == [2, 3]
  again.close()


def test_unreadable_checkpoint_is_moved_aside(gcs_dir):  # pylint: disable=redefined-outer-name
  manager = checkpoint.make_manager(gcs_dir, every_steps=1, keep=3, async_save=False)
  checkpoint.save(manager, 1, _state(1))
  checkpoint.save(manager, 2, _state(2))
  for f in _files(epath.Path(gcs_dir) / "checkpoints" / "2" / "state"):  # no rglob on gs://
    if f.stat().length:
      f.write_bytes(f.read_bytes()[: f.stat().length // 3])  # truncated
  state, meta = checkpoint.restore_latest(manager, _abstract(_state(0)))
  assert meta["step"] == 1
  _assert_same(state, _state(1))
  ckpts = epath.Path(gcs_dir) / "checkpoints"
  assert sorted(p.name for p in ckpts.iterdir()) == ["1", "2.unreadable"]
  assert manager.all_steps() == [1]
  manager.close()


def test_a_step_unreadable_twice(gcs_dir):  # pylint: disable=redefined-outer-name
  """Step 2 unreadable, moved aside; the run saves step 2 again, and it is unreadable again."""
  manager = checkpoint.make_manager(gcs_dir, every_steps=1, keep=3, async_save=False)
  checkpoint.save(manager, 1, _state(1))
  for _ in range(2):
    checkpoint.save(manager, 2, _state(2))
    for f in _files(epath.Path(gcs_dir) / "checkpoints" / "2" / "state"):
      if f.stat().length:
        f.write_bytes(f.read_bytes()[: f.stat().length // 3])
    _, meta = checkpoint.restore_latest(manager, _abstract(_state(0)))
    assert meta["step"] == 1
  names = sorted(p.name for p in (epath.Path(gcs_dir) / "checkpoints").iterdir())
  assert names == ["1", "2.unreadable", "2.unreadable.2"]
  manager.close()


def test_best_checkpoint_pattern(gcs_dir):  # pylint: disable=redefined-outer-name
  """What fine-tuning's `best/` does: keep=1, delete the old step, save, reopen, meta only."""
  best = f"{gcs_dir}/best"
  manager = checkpoint.make_manager(best, every_steps=1, keep=1, async_save=False)
  for step in (10, 20):
    for old in manager.all_steps():
      manager.delete(old)
    checkpoint.save(
      manager,
      step,
      {"params": _state(step)["params"]},
      {"metrics": {"top1": step / 100}},
      force=True,
    )
  manager.wait_until_finished()
  manager.close()
  assert sorted(p.name for p in (epath.Path(best) / "checkpoints").iterdir()) == ["20"]
  reopened = checkpoint.make_manager(best, every_steps=1, keep=1, async_save=False)
  meta = reopened.restore(
    reopened.latest_step(), args=ocp.args.Composite(meta=ocp.args.JsonRestore())
  )
  assert meta.meta == {"metrics": {"top1": 0.2}, "step": 20}
  reopened.close()
  _assert_same(params_lib.read(best), _state(20)["params"])


def test_check_writable(gcs_bucket):  # pylint: disable=redefined-outer-name
  checkpoint.check_writable(f"gs://{gcs_bucket}/new/run")
  assert not list(epath.Path(f"gs://{gcs_bucket}/new/run").glob(".write_probe_*"))
  with pytest.raises(
    ConfigError,
    match=r"workdir=gs://no-such-bucket-x/run is not writable: "
    r"FileNotFoundError",
  ):
    checkpoint.check_writable("gs://no-such-bucket-x/run")
  read_only = f"gs://{gcs_emulator_module.READ_ONLY_BUCKET}/run"
  assert epath.Path(f"gs://{gcs_emulator_module.READ_ONLY_BUCKET}").exists()  # it is there
  with pytest.raises(
    ConfigError,
    match=rf"^workdir={read_only} is not writable: OSError: "
    r"Forbidden: .* does not have storage.objects.create access",
  ) as e:
    checkpoint.check_writable(read_only)
  assert "\n" not in str(e.value)


def test_save_params_and_load_params(gcs_dir):  # pylint: disable=redefined-outer-name
  params = _state(5)["params"]
  checkpoint.save_params(gcs_dir, params, config={"variant": "tiny"})
  assert json.loads((epath.Path(gcs_dir) / "config.json").read_text()) == {"variant": "tiny"}
  for where in (gcs_dir, f"{gcs_dir}/checkpoints", f"{gcs_dir}/checkpoints/0"):
    _assert_same(params_lib.read(where), params)
  with pytest.raises(ConfigError, match="no beit-jax checkpoint found"):
    params_lib.read(f"{gcs_dir}/nothing")


def test_config_json_of_a_run(gcs_dir):  # pylint: disable=redefined-outer-name
  from beit_jax.training import workdir  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict({"model": {"variant": "tiny", "patch": (16, 16)}})
  workdir.prepare(config, gcs_dir)
  assert workdir.load_config(gcs_dir).to_dict() == config.to_dict()


def test_png_of_visuals(gcs_dir):  # pylint: disable=redefined-outer-name
  from beit_jax.training import visuals  # pylint: disable=g-import-not-at-top

  image_dir = epath.Path(gcs_dir) / "images"
  image_dir.mkdir(parents=True, exist_ok=True)
  visuals.write_png(image_dir / "x_0000001.png", np.full((4, 6, 3), 0.5, np.float32))
  assert (image_dir / "x_0000001.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- TensorFlow

_TF_PROBE = textwrap.dedent("""
    import json, os, sys
    from tests import gcs_emulator
    out = {}
    with gcs_emulator.running() as emu:
      from etils import epath
      run = f"gs://{emu.bucket}/run"
      (epath.Path(run) / "config.json").write_text("{}")  # the emulator has it
      import tensorflow as tf
      from clu import metric_writers
      def attempt(name, fn):
        try:
          out[name] = "ok: " + repr(fn())
        except Exception as e:  # pylint: disable=broad-except
          out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      attempt("gfile_exists", lambda: tf.io.gfile.exists(run + "/config.json"))
      attempt("writer", lambda: metric_writers.create_default_writer(run, asynchronous=True))
    print("RESULT " + json.dumps(out), flush=True)
""")


def _netns_available() -> bool:
  if not (shutil.which("unshare") and shutil.which("ip")):
    return False
  return (
    subprocess.run(
      ["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, check=False
    ).returncode
    == 0
  )


@pytest.mark.slow  # ~10 s: a TensorFlow import in a subprocess
def test_tensorflow_gcs_does_not_reach_the_emulator():
  """tf.io.gfile and clu's TensorBoard writer go to www.googleapis.com, emulator or not.

  Run in a network namespace of its own (loopback only), so the attempt fails at DNS
  and nothing leaves the machine. This is why beit_jax/training/events.py writes TensorBoard
  events through epath (test_mim_run_on_gcs_init_from_keep_n_and_fallback reads them).
  """
  if not _netns_available():
    pytest.skip("needs `unshare -n` (root) to keep TensorFlow off the network")
  env = dict(os.environ, PYTHONPATH=runs.ROOT, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  try:
    proc = subprocess.run(
      [
        "unshare",
        "-n",
        "sh",
        "-c",
        'ip link set lo up && exec "$0" -c "$1"',
        sys.executable,
        _TF_PROBE,
      ],
      cwd=runs.ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
    )
  except subprocess.TimeoutExpired:
    pytest.fail("TensorFlow's GCS filesystem hung for 120 s (no network)")
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
  result = json.loads(lines[-1][len("RESULT ") :])
  for name in ("gfile_exists", "writer"):
    assert result[name].startswith("FailedPreconditionError"), result
    assert "Could not resolve host: www.googleapis.com" in result[name], result


# --------------------------------------------------------------------------- runs through main


def _gcs_events(workdir: str, local: str, tag: str) -> list[int]:
  """Steps of scalar `tag` in the gs:// workdir's event files (read back by TensorBoard)."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top

  os.makedirs(local, exist_ok=True)
  for f in epath.Path(workdir).glob("events.out.tfevents.*"):
    (epath.Path(local) / f.name).write_bytes(f.read_bytes())
  acc = event_accumulator.EventAccumulator(local)
  acc.Reload()
  return [e.step for e in acc.Tensors(tag)] if tag in acc.Tags()["tensors"] else []


def _steps(workdir: str) -> list[str]:
  return sorted(
    (p.name for p in (epath.Path(workdir) / "checkpoints").iterdir()),
    key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n),
  )


def _flat(params) -> dict:
  return {
    jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)
  }


def _random_vit(config, path: str) -> dict:
  """Random params of the MIM model of `config`, saved at `path` (for `init_from`)."""
  from beit_jax.training import mim_objective  # pylint: disable=g-import-not-at-top

  size, grid = config.input.image_size, config.input.image_size // config.input.patch_size
  shapes = jax.eval_shape(
    lambda: mim_objective.make_model(config).init(
      {"params": jax.random.key(0)},
      jnp.zeros((1, size, size, 3)),
      jnp.zeros((1, grid * grid), bool),
    )
  )["params"]
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  checkpoint.save_params(path, params)
  return _flat(params)


def test_mim_run_on_gcs_init_from_keep_n_and_fallback(gcs_dir, tmp_path, caplog):  # pylint: disable=redefined-outer-name
  """A tiny MIM run with a gs:// workdir, init_from and tokenizer.init_from, through main.run;
  then a truncated object in its latest checkpoint, and the rerun falls back."""
  from beit_jax import main  # pylint: disable=g-import-not-at-top
  from tests.tiny_config import tiny_config  # pylint: disable=g-import-not-at-top

  config = tiny_config()
  config.tokenizer.init_from = runs.random_tokenizer(f"{gcs_dir}/tok")
  source = _random_vit(config, f"{gcs_dir}/init")
  config.init_from = f"{gcs_dir}/init"
  config.checkpoint = dict(every_steps=2, keep=2)
  config.images_every_steps = 6
  run = f"{gcs_dir}/run"
  metrics = main.run(config, run)
  assert np.isfinite(metrics["loss"])
  root = epath.Path(run)
  assert json.loads((root / "config.json").read_text())["init_from"] == f"{gcs_dir}/init"
  assert _steps(run) == ["4", "6"]  # keep=2: step 2 deleted from the bucket
  assert [p.name for p in (root / "images").iterdir()] == ["mim_0000006.png"]
  assert _gcs_events(run, str(tmp_path / "events1"), "loss") == [2, 4, 6]
  assert not list(root.glob(".write_probe_*"))
  # It started from init_from: 6 AdamW steps move each weight by a few lr at most, while
  # the model's own init is nowhere near these random values.
  trained = _flat(params_lib.read(run))
  assert trained.keys() == source.keys()
  for k, v in source.items():
    np.testing.assert_allclose(trained[k], v, atol=4 * 6 * config.optim.lr, err_msg=k)

  # A truncated object in the latest checkpoint: the rerun falls back to step 4.
  state_files = [f for f in _files(root / "checkpoints" / "6" / "state") if f.stat().length > 64]
  assert state_files
  for f in state_files:
    f.write_bytes(f.read_bytes()[: f.stat().length // 2])
  config.total_steps = 8
  caplog.set_level(logging.INFO)
  # absl's own logger too: its level is WARNING until some run in this process parses flags.
  caplog.set_level(logging.INFO, logger="absl")
  main.run(config, run)
  assert f"Checkpoint {run}/checkpoints/6 is unreadable" in caplog.text
  assert "Resumed from step 4" in caplog.text
  assert _steps(run) == ["6", "8", "6.unreadable"]  # 6 saved anew, 4 deleted (keep=2)
  # The rerun's reports follow the first run's (step 6 twice: once per run, as tf.summary).
  assert _gcs_events(run, str(tmp_path / "events2"), "loss") == [2, 4, 6, 6, 8]


@pytest.mark.parametrize("bucket", ["no-such-bucket-x", gcs_emulator_module.READ_ONLY_BUCKET])
def test_unusable_bucket_is_one_line_naming_the_workdir(gcs_bucket, bucket):  # pylint: disable=redefined-outer-name,unused-argument
  from beit_jax import main  # pylint: disable=g-import-not-at-top
  from tests.tiny_config import tiny_config  # pylint: disable=g-import-not-at-top

  config = tiny_config()
  config.tokenizer.init_from = "/nowhere/needed/first"  # the workdir is checked before it
  with pytest.raises(ConfigError, match=rf"^workdir=gs://{bucket}/run is not writable: ") as e:
    main.run(config, f"gs://{bucket}/run")
  assert "\n" not in str(e.value)


def _cli(workdir, tokenizer, steps):
  return [
    sys.executable,
    "-m",
    "beit_jax.main",
    "--config=tests/tiny_config.py",
    f"--workdir={workdir}",
    f"--config.tokenizer.init_from={tokenizer}",
    f"--config.total_steps={steps}",
    "--config.checkpoint.every_steps=2",
    "--config.checkpoint.keep=2",
    "--config.model.drop_path_rate=0.1",
  ]


@pytest.mark.slow
def test_sigkill_on_gcs_then_resume_is_bit_identical_to_a_local_run(gcs_dir, tmp_path):  # pylint: disable=redefined-outer-name
  """tests/test_resume.py with --workdir=gs://: the CLI killed after its first checkpoint."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  env = runs.cpu_env(1)  # os.environ holds the fixture's emulator address
  tok = runs.random_tokenizer(str(tmp_path / "tok"))
  steps = 8
  straight = subprocess.Popen(
    _cli(tmp_path / "straight", tok, steps),
    cwd=runs.ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  crashed = f"{gcs_dir}/crashed"
  proc = subprocess.Popen(
    _cli(crashed, tok, steps),
    cwd=runs.ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 600
  ckpts = epath.Path(crashed) / "checkpoints"
  # On gs:// orbax writes a step in place and marks it complete with commit_success.txt
  # (no atomic rename on an object store): kill once the first step is complete.
  while not (
    ckpts.exists()
    and any((p / "commit_success.txt").exists() for p in ckpts.iterdir() if p.name.isdigit())
  ):
    assert proc.poll() is None and time.time() < deadline, "run ended before a checkpoint"
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  gcs_emulator_module.reset_client_caches()  # gcsfs caches listings; others wrote since
  listed = sorted(p.name for p in ckpts.iterdir())
  saved = checkpoint.make_manager(crashed, every_steps=2, keep=2).all_steps()
  assert saved and max(saved) < steps, f"the kill did not land mid-run: {saved}, {listed}"
  rerun = subprocess.run(
    _cli(crashed, tok, steps),
    cwd=runs.ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  said = [l for l in rerun.stderr.splitlines() if "esumed" in l or "nreadable" in l]
  assert f"Resumed from step {max(saved)}" in rerun.stderr, (saved, listed, said)
  assert straight.wait(timeout=600) == 0, straight.stderr.read()[-3000:]
  straight.stderr.close()
  gcs_emulator_module.reset_client_caches()
  assert _steps(crashed) == ["6", "8"]  # keep=2 on gs://

  a = _flat(params_lib.read(str(tmp_path / "straight")))
  b = _flat(params_lib.read(crashed))
  assert a.keys() == b.keys()
  for k, v in a.items():
    np.testing.assert_array_equal(v, b[k], err_msg=k)
