"""The launchers (launch/): the TPU script against a stand-in gcloud, its host-side helper,
the SLURM script with SLURM's environment set by hand, the Colab notebook, the README's
launcher section."""

import ast
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest
from absl import flags
from absl import logging as absl_logging

from tests import runs

ROOT = runs.ROOT
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = sorted(f for f in os.listdir(LAUNCH) if f.endswith((".sh", ".sbatch")))

# gcloud as the TPU script uses it: records every call (its arguments, each ended by \x1f;
# each call by \x1e) and keeps the TPU VM's and the queued resource's states in files. A call to
# the host-side status takes the next line of `events`: a status to print ("|" separates
# lines), or `vm-preempted` / `qr-preempted` (the TPU goes, the ssh fails).
FAKE_GCLOUD = r"""#!/usr/bin/env bash
D=$FAKE_GCLOUD_DIR
{ printf '%s\x1f' "$@"; printf '\x1e'; } >> "$D/calls"
[ "$1" = alpha ] && shift
case "$3 $4" in
  "tpu-vm describe") [ -f "$D/vm" ] || { echo "ERROR: NOT_FOUND" >&2; exit 1; }; cat "$D/vm" ;;
  "tpu-vm create") echo READY > "$D/vm" ;;
  "tpu-vm delete") rm -f "$D/vm" ;;
  "queued-resources create") echo WAITING_FOR_RESOURCES > "$D/qr" ;;
  "queued-resources describe")
    [ -f "$D/qr" ] || { echo "ERROR: NOT_FOUND" >&2; exit 1; }
    s=$(cat "$D/qr"); echo "$s"
    case "$s" in
      WAITING_FOR_RESOURCES) echo PROVISIONING > "$D/qr" ;;
      PROVISIONING) echo ACTIVE > "$D/qr"; echo READY > "$D/vm" ;;
    esac ;;
  "queued-resources delete") rm -f "$D/qr" "$D/vm" ;;
  "tpu-vm ssh")
    [ "$(cat "$D/vm" 2>/dev/null)" = READY ] || exit 255
    if [[ "${*: -1}" == *"tpu_worker.sh status"* ]]; then
      event=$(head -n 1 "$D/events"); sed -i 1d "$D/events"
      case "$event" in
        vm-preempted) echo PREEMPTED > "$D/vm"; exit 255 ;;
        qr-preempted) echo SUSPENDED > "$D/qr"; rm -f "$D/vm"; exit 255 ;;
        *) tr '|' '\n' <<< "$event" ;;
      esac
    fi ;;
  *) echo "fake gcloud: unexpected call: $*" >&2; exit 2 ;;
esac
"""

DONE = "exit 0|I1202 main.py:59] Final metrics: {'loss': 4.01}"
PREEMPTED = (
  "exit 0|beit_jax: MIM preempted at step 3; checkpoint saved in gs://bkt/beit_base;"
  " rerun the same command to resume"
)


def _executable(path, text):
  path.write_text(text)
  path.chmod(0o755)


def _tpu_vm(tmp_path, *args, events=(), **env):
  """Runs launch/tpu_vm.sh ARGS against the stand-in gcloud; (process, calls)."""
  (tmp_path / "bin").mkdir(exist_ok=True)
  _executable(tmp_path / "bin" / "gcloud", FAKE_GCLOUD)
  (tmp_path / "events").write_text("".join(e + "\n" for e in events))
  proc = subprocess.run(
    ["bash", os.path.join(LAUNCH, "tpu_vm.sh"), *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
    env=dict(
      os.environ,
      PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
      FAKE_GCLOUD_DIR=str(tmp_path),
      NAME="beit-test",
      ZONE="us-central2-b",
      TYPE="v4-8",
      BUCKET="gs://bkt",
      REPO="https://git.example/beit-jax.git",
      REF="0123abc",
      POLL="0",
      **env,
    ),
  )
  calls_file = tmp_path / "calls"
  records = calls_file.read_text().split("\x1e")[:-1] if calls_file.exists() else []
  calls = [r.split("\x1f")[:-1] for r in records]
  return proc, calls


def _summary(call):
  """A call as a short label: `create vm --spot`, `ssh all install`, `delete qr`, ..."""
  track = "alpha " if call[0] == "alpha" else ""
  call = call[1:] if track else call
  kind = {"tpu-vm": "vm", "queued-resources": "qr"}[call[2]]
  verb = call[3]
  if verb == "ssh":
    command = call[-1]
    what = next(
      w
      for w in ("install", "start", "status", "stop")
      if {"install": "uv pip install"}.get(w, f"tpu_worker.sh {w}") in command
    )
    worker = next(a.split("=", 1)[1] for a in call if a.startswith("--worker="))
    return f"ssh {worker} {what}"
  tiers = [a for a in call if a in ("--spot", "--best-effort")]
  return " ".join([track + verb, kind, *tiers])


def _actions(calls):
  """The calls that change something or run something (describe calls left out)."""
  return [s for s in map(_summary, calls) if not s.startswith("describe")]


def _started_commands(calls):
  """The argv of `python -m beit_jax.main ...` of every start on the hosts."""
  found = []
  for call in calls:
    if _summary(call).endswith(" start"):
      words = shlex.split(call[-1])
      found.append(words[words.index("start") + 1 :])
  return found


def _parse_main_flags(argv, monkeypatch):
  """`argv` (after `python -m beit_jax.main`) parsed by main's own flags; (config, flags)."""
  from beit_jax import main  # noqa: F401  (defines main's flags)  # pylint: disable=unused-import
  from beit_jax import trainers  # pylint: disable=g-import-not-at-top

  monkeypatch.chdir(ROOT)  # config paths are relative to the repo, as on every host
  # config_flags reads its `--config.*` overrides from sys.argv.
  monkeypatch.setattr(sys, "argv", ["beit_jax.main", *argv])
  verbosity = absl_logging.get_verbosity()  # unparse_flags resets it to WARNING
  try:
    flags.FLAGS(sys.argv)
    values = {name: flags.FLAGS[name].value for name in ("workdir", "multihost")}
    config = flags.FLAGS.config
    trainers.validate_config(config)
    return config, values
  finally:
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # defined by this parse
      delattr(flags.FLAGS, name)
    absl_logging.set_verbosity(verbosity)


# ---------------------------------------------------------------- launch/tpu_vm.sh


def test_on_demand_run_creates_installs_starts_and_ends_when_the_run_finishes(
  tmp_path, monkeypatch
):
  proc, calls = _tpu_vm(tmp_path, "run", "configs/beit_base.py", events=["running", DONE])
  assert proc.returncode == 0, proc.stderr
  assert _actions(calls) == [
    "create vm",
    "ssh all install",
    "ssh all start",
    "ssh 0 status",
    "ssh 0 status",
  ]
  create = next(c for c in calls if c[3] == "create")
  assert create[:5] == ["compute", "tpus", "tpu-vm", "create", "beit-test"]
  assert {"--accelerator-type", "v4-8", "--version", "tpu-ubuntu2204-base"} <= set(create)
  install = next(c[-1] for c in calls if _summary(c) == "ssh all install")
  assert "jax[tpu]==0.10.2" in install and "0123abc" in install and "git.example" in install
  for command in (c[-1] for c in calls if _summary(c).startswith("ssh")):  # the hosts' bash
    subprocess.run(["bash", "-n", "-c", command], check=True)
  assert "the run finished" in proc.stderr
  (argv,) = _started_commands(calls)
  assert argv[:3] == ["python", "-m", "beit_jax.main"]
  config, values = _parse_main_flags(argv[3:], monkeypatch)
  assert values == {"workdir": "gs://bkt/beit_base", "multihost": True}
  assert config.input.data_dir == "gs://bkt/tensorflow_datasets"
  assert config.trainer == "mim"


def test_spot_vm_preempted_is_deleted_created_again_and_the_same_command_rerun(
  tmp_path, monkeypatch
):
  proc, calls = _tpu_vm(
    tmp_path,
    "--spot",
    "run",
    "configs/beit_base.py",
    "--config.input.batch_size=1024",
    events=["running", "vm-preempted", "running", DONE],
  )
  assert proc.returncode == 0, proc.stderr
  assert _actions(calls) == [
    "create vm --spot",
    "ssh all install",
    "ssh all start",
    "ssh 0 status",
    "ssh 0 status",
    "delete vm",
    "create vm --spot",
    "ssh all install",
    "ssh all start",
    "ssh 0 status",
    "ssh 0 status",
  ]
  assert "beit-test is PREEMPTED: creating it again" in proc.stderr
  first, again = _started_commands(calls)
  assert first == again
  config, _ = _parse_main_flags(first[3:], monkeypatch)
  assert config.input.batch_size == 1024


def test_queued_spot_resource_waits_for_active_and_is_recreated_when_suspended(tmp_path):
  proc, calls = _tpu_vm(
    tmp_path,
    "--queued",
    "--spot",
    "run",
    "configs/beit_base.py",
    events=["running", "qr-preempted", DONE],
  )
  assert proc.returncode == 0, proc.stderr
  assert _actions(calls) == [
    "create qr --spot",
    "ssh all install",
    "ssh all start",
    "ssh 0 status",
    "ssh 0 status",
    "delete qr",
    "create qr --spot",
    "ssh all install",
    "ssh all start",
    "ssh 0 status",
  ]
  create = next(c for c in calls if c[3] == "create")
  assert create[create.index("--node-id") + 1] == "beit-test"
  assert create[create.index("--runtime-version") + 1] == "tpu-ubuntu2204-base"
  assert "--force" in next(c for c in calls if c[3] == "delete")
  # No install before the queued resource is ACTIVE and its TPU READY.
  states = [l for l in proc.stderr.splitlines() if "beit-test is" in l]
  assert states[:2] == [
    "tpu_vm.sh: beit-test is WAITING_FOR_RESOURCES",
    "tpu_vm.sh: beit-test is PROVISIONING",
  ]
  first, again = _started_commands(calls)
  assert first == again


@pytest.mark.parametrize(
  "events, expected",
  [
    # exited 0 saying "preempted", TPU still READY: rerun in place
    (
      [PREEMPTED, "running", DONE],
      ["ssh 0 status", "ssh all start", "ssh 0 status", "ssh 0 status"],
    ),
    # a host rebooted: no run, no exit code: install and start again
    (["lost", DONE], ["ssh 0 status", "ssh all install", "ssh all start", "ssh 0 status"]),
  ],
)
def test_rerun_in_place_on_a_live_tpu(tmp_path, events, expected):
  proc, calls = _tpu_vm(tmp_path, "run", "configs/beit_base.py", events=events)
  assert proc.returncode == 0, proc.stderr
  assert _actions(calls) == ["create vm", "ssh all install", "ssh all start"] + expected
  starts = _started_commands(calls)
  assert len(starts) == 2 and starts[0] == starts[1]


def test_a_failed_run_stops_the_loop_without_a_rerun(tmp_path):
  failed = "exit 1|beit_jax: error: input.data_dir=gs://bkt/tensorflow_datasets has no imagenet2012"
  proc, calls = _tpu_vm(tmp_path, "run", "configs/beit_base.py", events=[failed, failed])
  assert proc.returncode == 1
  assert "the run failed (exit 1)" in proc.stderr and "has no imagenet2012" in proc.stderr
  assert _actions(calls) == [
    "create vm",
    "ssh all install",
    "ssh all start",
    "ssh 0 status",
    "ssh 0 status",
  ]


def test_best_effort_is_a_queued_tier_of_gcloud_alpha(tmp_path):
  proc, calls = _tpu_vm(tmp_path, "--queued", "--best-effort", "create")
  assert proc.returncode == 0, proc.stderr
  assert _actions(calls) == ["alpha create qr --best-effort", "ssh all install"]
  proc, _ = _tpu_vm(tmp_path, "--best-effort", "create")
  assert proc.returncode == 2 and "add --queued" in proc.stderr


def test_dry_run_prints_the_commands_and_runs_no_gcloud(tmp_path):
  proc, calls = _tpu_vm(tmp_path, "--spot", "run", "configs/beit_base.py", DRY_RUN="1")
  assert proc.returncode == 0, proc.stderr
  assert calls == []
  printed = [shlex.split(l[2:]) for l in proc.stderr.splitlines() if l.startswith("+ gcloud ")]
  assert [_summary(c[1:]) for c in printed] == [
    "create vm --spot",
    "ssh all install",
    "ssh all start",
  ]
  assert printed[2][-1].startswith(
    "cd beit-jax && . .venv/bin/activate && bash "
    "launch/tpu_worker.sh start python -m beit_jax.main "
  )


# ---------------------------------------------------------------- launch/tpu_worker.sh


def _worker(checkout, *args):
  return subprocess.run(
    ["bash", str(checkout / "launch" / "tpu_worker.sh"), *args],
    capture_output=True,
    text=True,
    timeout=30,
    check=True,
  ).stdout


def _status_when(checkout, first_line, timeout=20):
  deadline = time.time() + timeout
  while True:
    out = _worker(checkout, "status")
    if out.splitlines()[0] == first_line or time.time() > deadline:
      return out
    time.sleep(0.1)


def test_worker_starts_in_background_reports_and_stops_with_sigterm(tmp_path):
  checkout = tmp_path / "beit-jax"
  (checkout / "launch").mkdir(parents=True)
  worker = open(os.path.join(LAUNCH, "tpu_worker.sh")).read()
  (checkout / "launch" / "tpu_worker.sh").write_text(worker)
  assert _worker(checkout, "status").splitlines() == ["none"]
  # A stand-in run that, like beit_jax.main, saves and exits 0 with one line at a SIGTERM.
  run = (
    "import signal, sys, time\n"
    "def stop(*_):\n"
    "  print('beit_jax: MIM preempted at step 3; rerun the same command', flush=True)\n"
    "  sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, stop)\n"
    "print('training', flush=True)\n"
    "time.sleep(60)\n"
  )
  _worker(checkout, "start", sys.executable, "-c", run)
  assert _status_when(checkout, "running").splitlines()[0] == "running"
  deadline = time.time() + 20  # its handler is in place once it has said "training"
  while "training" not in (checkout / "run.log").read_text() and time.time() < deadline:
    time.sleep(0.1)
  assert (
    "already going"
    in subprocess.run(
      ["bash", str(checkout / "launch" / "tpu_worker.sh"), "start", "true"],
      capture_output=True,
      text=True,
      check=True,
    ).stderr
  )
  _worker(checkout, "stop")
  out = _status_when(checkout, "exit 0").splitlines()
  assert out[0] == "exit 0" and "preempted at step 3" in out[-1]

  # The next start's status shows only its own lines: no "preempted" left from before.
  _worker(checkout, "start", sys.executable, "-c", "print('Final metrics'); raise SystemExit(3)")
  out = _status_when(checkout, "exit 3").splitlines()
  assert out[0] == "exit 3" and out[-1] == "Final metrics"
  assert not any("preempted" in l for l in out)
  assert (checkout / "run.log").read_text().count("=== ") == 2

  (checkout / "run.rc").unlink()  # as after a reboot: a pid that is gone, no exit code
  assert _worker(checkout, "status").splitlines()[0] == "lost"


# ---------------------------------------------------------------- launch/slurm_gpu.sbatch

# srun on one machine: SLURM_NTASKS local tasks, each with its SLURM_PROCID and SLURM_LOCALID
# (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS come from the test, as srun would set
# them), each task's output in task<i>.log; SIGTERM is passed on to the tasks, as srun does.
FAKE_SRUN = r"""#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" > "$FAKE_SLURM_DIR/task$i.log" 2>&1 &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
rc=0
for p in "${pids[@]}"; do
  while :; do r=0; wait "$p" || r=$?; kill -0 "$p" 2>/dev/null || break; done
  [ "$r" = 0 ] || rc=$r
done
exit "$rc"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_SLURM_DIR/scontrol"
"""


def _slurm_env(tmp_path, srun, job_id, ntasks, **extra):
  (tmp_path / "bin").mkdir(exist_ok=True)
  _executable(tmp_path / "bin" / "srun", srun)
  _executable(tmp_path / "bin" / "scontrol", FAKE_SCONTROL)
  path = f"{tmp_path / 'bin'}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
  return dict(
    os.environ,
    PATH=path,
    FAKE_SLURM_DIR=str(tmp_path),
    SLURM_JOB_ID=str(job_id),
    SLURM_NTASKS=str(ntasks),
    SLURM_JOB_NUM_NODES="1",
    SLURM_SUBMIT_DIR=ROOT,
    SLURM_STEP_NODELIST="127.0.0.1",
    VENV=str(tmp_path / "no-venv"),
    **extra,
  )


def _free_slurm_port() -> int:
  """A free port among those jax's SLURM detection derives from a job id."""
  for port in range(61440 + os.getpid() % 4000, 65536):
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
      return port
  raise RuntimeError("no free port in 61440-65535")


def test_sbatch_header_one_process_per_gpu_requeue_and_signal():
  header = [
    l.split(None, 1)[1].strip()
    for l in open(os.path.join(LAUNCH, "slurm_gpu.sbatch"))
    if l.startswith("#SBATCH")
  ]
  options = dict(o.split("=", 1) if "=" in o else (o, "") for o in header)
  assert options["--ntasks-per-node"] == options["--gpus-per-node"]
  assert options["--gpu-bind"] == "none" and "--gpus-per-task" not in options
  assert "--requeue" in options and options["--open-mode"] == "append"
  assert re.fullmatch(r"B:TERM@\d+", options["--signal"])


@pytest.mark.slow
def test_slurm_environment_joins_two_processes_into_one_run(tmp_path):
  port = _free_slurm_port()
  job_id = port - 61440 + 4096  # jax: port = 61440 + job_id % 4096
  env = _slurm_env(
    tmp_path,
    FAKE_SRUN,
    job_id,
    ntasks=2,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=runs.cpu_env(2)["XLA_FLAGS"],
  )
  # A bad value that main reports only after jax.distributed.initialize(): both processes
  # join, say so, then stop with the one-line error, without compiling anything.
  proc = subprocess.run(
    [
      "bash",
      os.path.join(LAUNCH, "slurm_gpu.sbatch"),
      "tests/tiny_config.py",
      str(tmp_path / "run"),
      "--config.total_steps=-1",
    ],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  logs = [(tmp_path / f"task{i}.log").read_text() for i in range(2)]
  assert proc.returncode == 1, proc.stdout + proc.stderr + logs[0][-2000:]
  for i, log in enumerate(logs):
    assert f"Connecting to JAX distributed service on 127.0.0.1:{port}" in log, log[-2000:]
    assert f"process {i}/2, 2 local / 4 global devices (cpu)" in log, log[-2000:]
    assert (
      "beit_jax: error: total_steps=-1 is invalid; accepted: an integer >= 0 (0: use num_epochs)"
    ) in log, log[-2000:]
  assert not (tmp_path / "scontrol").exists()


SLEEPING_SRUN = r"""#!/usr/bin/env bash
sleep 30 > /dev/null 2>&1 &
trap 'echo TERM >> "$FAKE_SLURM_DIR/srun"; kill $!; exit 0' TERM
echo "$*" >> "$FAKE_SLURM_DIR/srun"
wait
"""


def test_sigterm_before_the_time_limit_is_passed_on_and_the_job_requeued(tmp_path):
  env = _slurm_env(tmp_path, SLEEPING_SRUN, job_id=77, ntasks=16)
  proc = subprocess.Popen(
    [
      "bash",
      os.path.join(LAUNCH, "slurm_gpu.sbatch"),
      "configs/beit_base.py",
      "/shared/w",
      "--config.input.batch_size=1024",
    ],
    cwd=tmp_path,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  record = tmp_path / "srun"
  deadline = time.time() + 20
  while not record.exists() and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=20)
  assert proc.returncode == 0, out
  argv, term = record.read_text().splitlines()
  assert argv == (
    "--kill-on-bad-exit=1 python -m beit_jax.main --multihost "
    "--config=configs/beit_base.py --workdir=/shared/w "
    "--config.input.batch_size=1024"
  )
  assert term == "TERM"
  assert (tmp_path / "scontrol").read_text() == "requeue 77\n"
  assert "requeueing job 77" in out


def test_without_a_signal_the_job_ends_with_the_run_exit_code_and_no_requeue(tmp_path):
  env = _slurm_env(tmp_path, "#!/usr/bin/env bash\nexit 3\n", job_id=78, ntasks=2)
  proc = subprocess.run(
    ["bash", os.path.join(LAUNCH, "slurm_gpu.sbatch"), "configs/beit_base.py", "/shared/w"],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    timeout=30,
  )
  assert proc.returncode == 3
  assert not (tmp_path / "scontrol").exists()


# ---------------------------------------------------------------- every script, the pins


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
  subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)], check=True)


def test_launchers_install_the_jax_of_requirements_txt():
  pinned = re.search(r"^jax==(\S+)$", open(os.path.join(ROOT, "requirements.txt")).read(), re.M)[1]
  for name, extra in [
    ("launch/tpu_vm.sh", "tpu"),
    ("launch/slurm_gpu.sbatch", "cuda12"),
    ("launch/colab.ipynb", "tpu"),
    ("README.md", "tpu"),
    ("README.md", "cuda12"),
  ]:
    found = set(re.findall(rf"jax\[{extra}\]==([0-9.]+)", open(os.path.join(ROOT, name)).read()))
    assert found == {pinned}, (name, extra, found)
  uv = {
    name: set(re.findall(r"uv==([0-9.]+)", open(os.path.join(ROOT, name)).read()))
    for name in ("launch/tpu_vm.sh", "launch/colab.ipynb")
  }
  # The notebook installs with pip into its kernel; if it ever uses uv, the same one.
  assert len(set.union(*uv.values())) == 1 and uv["launch/tpu_vm.sh"], uv


# ---------------------------------------------------------------- launch/colab.ipynb


def _notebook():
  with open(os.path.join(LAUNCH, "colab.ipynb")) as f:
    return json.load(f)


def _source(cell):
  return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def test_notebook_has_nbformat_4_structure():
  nb = _notebook()
  assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 4
  assert isinstance(nb["metadata"], dict) and nb["metadata"]["kernelspec"]["name"] == "python3"
  ids = [c.get("id") for c in nb["cells"]]
  if nb["nbformat_minor"] >= 5:  # 4.5 wants a unique id on every cell
    assert all(re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", i or "") for i in ids)
    assert len(set(ids)) == len(ids)
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("markdown", "code", "raw")
    assert isinstance(cell["metadata"], dict)
    assert isinstance(cell["source"], str) or all(isinstance(s, str) for s in cell["source"])
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None  # saved unrun
  # Its code is Python once IPython's `!` and `%` lines are set aside.
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      compile(re.sub(r"^(\s*)[!%].*$", r"\1pass", _source(cell), flags=re.M), "cell", "exec")


def test_notebook_trains_the_readme_config_in_its_kernel_and_shows_tensorboard_and_pictures():
  import beit_jax  # pylint: disable=g-import-not-at-top

  cells = _notebook()["cells"]
  code = "\n".join(_source(c) for c in cells if c["cell_type"] == "code")
  (parameters,) = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
  values = {}
  exec(_source(parameters), {}, values)  # pylint: disable=exec-used
  assert values["WORKDIR"].startswith("/content/drive/") and values["INSTALL"]
  # The config it trains: the README's demo, at the lengths of the parameter cell.
  (train,) = [c for c in cells if c.get("id") == "train"]
  (assign,) = [
    n
    for n in ast.parse(_source(train)).body
    if isinstance(n, ast.Assign) and n.targets[0].id == "config"
  ]
  expression = compile(ast.Expression(assign.value), "train", "eval")
  spec = eval(expression, {}, values)  # pylint: disable=eval-used
  assert spec.startswith("configs/beit_tiny_local.py:")
  config = beit_jax.load_config(spec)
  assert config.input.dataset == "embedded"  # nothing to download
  assert config.total_steps == values["STEPS"] == 600
  assert config.tokenizer.recipe.total_steps == values["TOKENIZER_STEPS"]
  assert "beit_jax.train(config, WORKDIR, overrides=OVERRIDES)" in _source(train)
  readme = open(os.path.join(ROOT, "README.md")).read()
  assert "python -m beit_jax.main --config=configs/beit_tiny_local.py --workdir=" in readme
  for needed in (
    'pip install -q --no-deps -e "{ROOT}"',
    "%load_ext tensorboard",
    "%tensorboard --logdir {WORKDIR}",
    "drive.mount(",
    "auth.authenticate_user()",
    "from IPython.display import Image",
    "images/*.png",
    "beit_jax.load(WORKDIR)",
    ".predict_masked(",
    ".attention(",
    ".features(",
    "beit_jax.load(CHECKPOINT)",
  ):
    assert needed in code, needed
  # No placeholder to edit but the workdir: the repository comes from the checkout.
  assert "YOUR_ORG" not in code and values["REPO"] == ""


# ---------------------------------------------------------------- the README


def test_docs_name_files_and_subcommands_that_exist():
  text = open(os.path.join(ROOT, "README.md")).read()
  for path in set(re.findall(r"\b((?:launch|configs)/[\w.]+\.(?:sh|sbatch|ipynb|py))", text)):
    assert os.path.exists(os.path.join(ROOT, path)), path
  script = open(os.path.join(LAUNCH, "tpu_vm.sh")).read()
  usage = re.search(r"\] (run\|[a-z|]+) \[", script)[1]
  accepted = re.search(r"^  (run \|[a-z |]+)\) ;;$", script, re.M)[1]
  assert usage.split("|") == accepted.split(" | ")
  used = set(re.findall(r"launch/tpu_vm\.sh (?:--[\w-]+ )*([a-z]+)", text))
  assert used and used <= set(usage.split("|")), (used, usage)
