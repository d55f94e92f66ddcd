#!/usr/bin/env bash
# The GPU device check: on one NVIDIA GPU (an H100 in mind) with an image that holds JAX
# (CUDA), Flax, optax, orbax, PyTorch and transformers but no TensorFlow, in under 8 minutes:
#
#   == environment ==   versions, the GPU, whether TensorFlow is absent
#   == wheels ==        the small pure-Python packages installed from a local folder
#   == benchmark: batch 64 ==, == benchmark: batch 256 ==
#                       B/16's MIM step (dVAE tokenizer included) in bfloat16, beit-jax against
#                       the unilm-equivalent PyTorch step (bf16 autocast, scaled_dot_product_
#                       attention), each in a process of its own (benchmark --compare-pytorch)
#   == tests ==         the tests of the models, the steps and their sharding, on the GPU
#   == summary ==       a table: images/s, MFU against the GPU's dense bf16 peak (989 TFLOP/s
#                       for the H100 SXM), JAX/PyTorch; the targets; the time taken
#
# Usage (from anywhere; it runs in the repository):
#   bash launch/device_check.sh                       # on the GPU machine
#   bash launch/device_check.sh --dry-run             # the same script on CPU: tiny model,
#                                                     # batch 2, 1 step, one test file (CI)
#   bash launch/device_check.sh --download-wheels .whl  # where pip reaches PyPI: the wheels
#
# Options: --wheels DIR (default: .whl in the repository, if there) installs DIR/*.whl with
# pip --no-index --no-deps into a temporary folder put on PYTHONPATH; --out DIR (default:
# $OUT if set, else a new temporary folder) receives the logs and summary.txt.
# Environment: PYTHON (default python3), BATCHES (default "64 256"), STEPS (timed steps per
# process, default 10), ROUNDS (processes of each framework, default 1), BUDGET_S (the
# whole check's time, default 450; the tests get what the benchmark leaves).
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

DRY_RUN=0
WHEELS=""
OUTDIR="${OUT:-}"
DOWNLOAD=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --wheels) WHEELS="${2:?--wheels needs a folder}"; shift ;;
    --wheels=*) WHEELS="${1#*=}" ;;
    --out) OUTDIR="${2:?--out needs a folder}"; shift ;;
    --out=*) OUTDIR="${1#*=}" ;;
    --download-wheels) DOWNLOAD="${2:?--download-wheels needs a folder}"; shift ;;
    --download-wheels=*) DOWNLOAD="${1#*=}" ;;
    -h|--help) usage; exit 0 ;;
    *) echo "device_check.sh: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PYTHON="${PYTHON:-python3}"
# What the step path (ml_collections: the configs) and the PyTorch reference (dall_e: its
# tokenizer) import beyond such an image; both pure Python, installed without their
# dependencies (ml_collections needs absl-py and PyYAML, dall_e attrs, requests and torch).
WHEEL_PINS=(ml-collections==1.1.0 DALL-E==0.1)

if [[ -n $DOWNLOAD ]]; then
  exec "$PYTHON" -m pip download --no-deps --only-binary=:all: -d "$DOWNLOAD" "${WHEEL_PINS[@]}"
fi

START=$SECONDS
BUDGET_S=${BUDGET_S:-450}
OUTDIR="${OUTDIR:-$(mktemp -d /tmp/beit_device_check.XXXXXX)}"
mkdir -p "$OUTDIR"
TMP="$(mktemp -d /tmp/beit_device_check_tmp.XXXXXX)"
trap 'rm -rf "$TMP"' EXIT
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
STATUS=0

if ((DRY_RUN)); then
  # CPU, one device; TensorFlow (and the rest the GPU image lacks) made unimportable for
  # every Python process of the check, through a sitecustomize module on PYTHONPATH.
  # LLVM's optimisations off, as in the tests: half the compile time of a tiny step.
  XLA_FLAGS="$(sed -E 's/--xla_(force_host_platform_device_count|backend_optimization_level)=[0-9]+//g' <<< "${XLA_FLAGS:-}")"
  export JAX_PLATFORMS=cpu XLA_FLAGS="$XLA_FLAGS --xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
  mkdir -p "$TMP/absent"
  cat > "$TMP/absent/sitecustomize.py" <<'EOF'
"""What a GPU image of JAX, Flax, optax, orbax, PyTorch and transformers lacks of
requirements.txt (beside the wheels the check installs) is absent: importing it raises
ModuleNotFoundError, and importlib.util.find_spec finds nothing."""
import sys

for name in ("tensorflow", "tensorflow_datasets", "clu", "gcsfs"):
  sys.modules[name] = None
EOF
  export PYTHONPATH="$TMP/absent${PYTHONPATH:+:$PYTHONPATH}"
  BATCHES=${BATCHES:-2}
  STEPS=${STEPS:-1}
  MATMUL=128
  TESTS=(tests/test_train_state.py)
  DESELECT=""
  SHRINK=(--config.model.depth=1 --config.model.width=32 --config.model.num_heads=2
          --config.model.mlp_dim=64 --config.input.image_size=32
          --config.input.tokenizer_image_size=16 --config.input.mask.num_masking_patches=2
          --config.input.mask.min_num_patches=1 --config.tokenizer.vocab_size=64
          --config.tokenizer.n_hid=8 --config.tokenizer.n_blk_per_group=1)
else
  export JAX_PLATFORMS=cuda
  BATCHES=${BATCHES:-64 256}
  STEPS=${STEPS:-10}
  MATMUL=8192  # fills the GPU: a 2048^2 matmul would time launches
  # The tests of the models, the train steps and their sharding that need neither TensorFlow
  # (no input pipeline) nor more than one device; the four test functions that build
  # 8-device meshes (and tests/test_param_axes.py, all of whose tests do) run on 8 CPU
  # devices in CI.
  TESTS=(tests/test_attention.py tests/test_vit.py tests/test_dvae.py tests/test_train_step.py
         tests/test_train_state.py tests/test_optim.py tests/test_mim_targets.py
         tests/test_patch_aggregation.py)
  DESELECT="not sharded_step_equals_single_device and not weights_shard_by_their_role"
  DESELECT+=" and not constrains_activations_to_the_mesh and not slices_are_the_outer_axis"
  SHRINK=()
fi
ROUNDS=${ROUNDS:-1}

section() { echo; echo "== $* =="; echo "(at $((SECONDS - START)) s)"; }

section environment
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ), mode: $( ((DRY_RUN)) && echo 'dry run (CPU)' || echo GPU)"
  echo "repository: $ROOT (commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown))"
  command -v nvidia-smi > /dev/null && nvidia-smi -L
  DRY_RUN=$DRY_RUN "$PYTHON" - <<'EOF'
import importlib.metadata, importlib.util, os, sys
print("python", sys.version.split()[0], sys.executable)
# Versions from the installed metadata (no imports: faster); absent = not importable.
for module, dists in (("jax", ["jax"]), ("jaxlib", ["jaxlib"]), ("flax", ["flax"]),
                      ("optax", ["optax"]), ("orbax.checkpoint", ["orbax-checkpoint"]),
                      ("torch", ["torch"]), ("transformers", ["transformers"]),
                      ("ml_collections", ["ml-collections", "ml_collections"]),
                      ("dall_e", ["DALL-E"]), ("clu", ["clu"]),
                      ("tensorflow", ["tensorflow", "tensorflow-cpu"])):
  try:
    found = importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    found = False
  version = None
  for dist in dists:
    try:
      version = importlib.metadata.version(dist)
      break
    except importlib.metadata.PackageNotFoundError:
      pass
  print(f"{module}: {version or 'present'}" if found else f"{module}: absent")
try:
  import jax
  print("jax devices:", jax.devices())
except Exception as e:  # pylint: disable=broad-except
  print(f"jax devices: none ({type(e).__name__}: {e})")
if os.environ["DRY_RUN"] != "1":
  try:
    import torch
    print("torch CUDA:", torch.cuda.is_available() and torch.cuda.get_device_name(0))
  except ImportError:
    pass
EOF
} 2>&1 | tee "$OUTDIR/environment.log"

section wheels
if [[ -z $WHEELS && -d $ROOT/.whl ]]; then WHEELS=$ROOT/.whl; fi
if [[ -n $WHEELS ]]; then
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  shopt -u nullglob
  if ((${#wheels[@]})) && "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --target "$TMP/site" "${wheels[@]}"; then
    export PYTHONPATH="$TMP/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed from $WHEELS: $(cd "$WHEELS" && ls -- *.whl | tr '\n' ' ')"
  else
    echo "no wheels installed from $WHEELS"
  fi
else
  echo "no wheel folder (--wheels DIR, or .whl in the repository): using what is installed"
fi
# Found, not imported (quicker); an import that fails anyway says so in its section.
missing() { "$PYTHON" -c 'import importlib.util as u, sys
print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))' "$@"; }
lacking=$(missing ml_collections absl flax optax orbax)
if [[ -n $lacking ]]; then
  echo "missing for the JAX step: $lacking (get the wheels: launch/device_check.sh --download-wheels .whl)"
  STATUS=1
fi
lacking=$(missing torch transformers dall_e)
if [[ -z $lacking ]]; then
  COMPARE=(--compare-pytorch "--rounds=$ROUNDS" --nobreakdown)
  echo "PyTorch reference: torch, transformers and dall_e are installed"
else
  COMPARE=()
  echo "PyTorch reference: skipped, $lacking not installed"
fi

remaining() { echo $((BUDGET_S - (SECONDS - START))); }

for batch in $BATCHES; do
  section "benchmark: batch $batch"
  limit=$(($(remaining) - 60))  # leave the tests a minute at least
  ((limit > 240)) && limit=240
  if ((limit < 30)); then
    echo "skipped: the check's budget ($BUDGET_S s) is spent"
    STATUS=1
    continue
  fi
  timeout "$limit" "$PYTHON" -m beit_jax.benchmark --config=configs/beit_base.py \
      "--batch=$batch" --dtypes=bfloat16 "--steps=$STEPS" --warmup_steps=2 \
      "--matmul_size=$MATMUL" --pipeline_batches=0 "${COMPARE[@]}" "${SHRINK[@]}" \
      > "$OUTDIR/benchmark_$batch.log" 2>&1
  rc=$?
  # absl's and XLA's log lines stay in the file; the benchmark's own output is printed
  grep -vE '^[IWEF][0-9]{4} |^WARNING: |^  warnings.warn|UserWarning' "$OUTDIR/benchmark_$batch.log"
  if ((rc == 124)); then
    echo "timed out after $limit s"
  fi
  if ((rc)); then
    echo "benchmark exited with status $rc (log: $OUTDIR/benchmark_$batch.log)"
    STATUS=1
  fi
done

section tests
limit=$(($(remaining) - 10))
if ((limit < 30)); then
  echo "skipped: the check's budget ($BUDGET_S s) is spent" | tee "$OUTDIR/tests.log"
  STATUS=1
else
  echo "${TESTS[*]}${DESELECT:+ -k '$DESELECT'} (within $limit s)"
  # float32 matmuls in full float32 on the GPU (not TF32), as the tests' tolerances assume
  JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false \
    timeout "$limit" "$PYTHON" -m pytest -o addopts="" -q -p no:cacheprovider -rfE \
      --durations=5 ${DESELECT:+-k "$DESELECT"} "${TESTS[@]}" 2>&1 | tee "$OUTDIR/tests.log"
  rc=${PIPESTATUS[0]}
  if ((rc == 124)); then
    echo "timed out after $limit s" | tee -a "$OUTDIR/tests.log"
  fi
  ((rc)) && STATUS=1
fi

section summary
ELAPSED=$((SECONDS - START)) DRY_RUN=$DRY_RUN BATCHES="$BATCHES" OUTDIR="$OUTDIR" \
    "$PYTHON" - <<'EOF' 2>&1 | tee "$OUTDIR/summary.txt"
import json, os, re

out, dry = os.environ["OUTDIR"], os.environ["DRY_RUN"] == "1"
env = open(os.path.join(out, "environment.log")).read()
devices = re.search(r"^jax devices: (.*)$", env, re.M)
print(f"jax devices: {devices.group(1) if devices else 'unknown'}")
tests = open(os.path.join(out, "tests.log")).read() if os.path.exists(
    os.path.join(out, "tests.log")) else ""
counts = re.findall(r"^=*\s*((?:\d+ \w+(?:, )?)+) in [\d.]+s", tests, re.M)
timed_out = "timed out after" in tests
print("tests: " + (counts[-1] if counts else "no result")
      + (" (timed out)" if timed_out else ""))
rows, mfus, ratios = [], [], []
def fmt(x, spec=None):
  """'–' for no figure; three significant digits, or a whole number from 100 on."""
  if x is None:
    return "–"
  return spec.format(x) if spec else f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


for batch in os.environ["BATCHES"].split():
  path = os.path.join(out, f"benchmark_{batch}.log")
  text = open(path).read() if os.path.exists(path) else ""
  found = [l for l in text.splitlines() if l.startswith("json: ")]
  if found:
    r = json.loads(found[-1][len("json: "):])
    row = (r["jax_images_per_sec"], r.get("jax_mfu"), r["torch_images_per_sec"],
           r.get("torch_mfu"), r["ratio"])
  else:  # the JAX step alone (no PyTorch here), or nothing
    step = re.search(r"^train step: [\d.]+ ms, ([\d.]+) images/s", text, re.M)
    mfu = re.search(r"MFU ([\d.]+)%", text)
    row = (float(step.group(1)) if step else None,
           float(mfu.group(1)) / 100 if mfu else None, None, None, None)
  rows.append((batch, *row))
  mfus.append(row[1])
  ratios.append(row[4])
print("| batch | JAX images/s | JAX MFU | PyTorch images/s | PyTorch MFU | JAX/PyTorch |")
print("|---|---|---|---|---|---|")
for batch, jax_rate, jax_mfu, torch_rate, torch_mfu, ratio in rows:
  print(f"| {batch} | {fmt(jax_rate)} | {fmt(jax_mfu, '{:.1%}')} | {fmt(torch_rate)} | "
        f"{fmt(torch_mfu, '{:.1%}')} | {fmt(ratio, '{:.3g}x')} |")
if dry:
  print("targets: not judged (dry run: tiny model on CPU, no known peak)")
else:
  yes = lambda ok: "met" if ok else "not met"
  print(f"targets: MFU >= 40% at every batch: "
        f"{yes(all(m is not None and m >= 0.40 for m in mfus))}; JAX/PyTorch >= 1.2x at "
        f"every batch: {yes(all(r is not None and r >= 1.2 for r in ratios))}")
elapsed = int(os.environ["ELAPSED"])
print(f"device check: {elapsed} s ({'under' if elapsed < 480 else 'over'} 8 minutes)")
EOF
echo "logs: $OUTDIR"
exit $STATUS
