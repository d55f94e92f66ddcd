#!/usr/bin/env bash
# beit-jax on a Cloud TPU VM or pod slice: create it (on demand, spot, or through queued
# resources), install on every host, run the same command on all hosts, and after a
# preemption create it again and rerun that command, which resumes from the gs:// workdir.
#
#   NAME=beit-base ZONE=us-central2-b TYPE=v4-32 BUCKET=gs://my-bucket \
#     bash launch/tpu_vm.sh [--spot] [--queued] [--best-effort] run configs/beit_base.py [flags...]
#
#   run CONFIG [flags]    create (if absent), install, start, then watch (below)
#   create                create the TPU, wait until it is READY, install on every host
#   start CONFIG [flags]  start the run on every host, in the background (~/beit-jax/run.log)
#   watch CONFIG [flags]  the restart loop: poll every POLL seconds; the TPU gone or
#                         preempted -> delete, create, install, start again; the run exited
#                         saying "preempted" -> start again; exited 0 otherwise -> done
#   status                the TPU's state, the run's on host 0 (WORKER=n) and its log's tail
#   logs [-f]             host 0's (WORKER=n) run.log
#   stop                  SIGTERM the run on every host: it saves a checkpoint and exits
#   delete                delete the TPU (and its queued resource)
#
# Modes: on demand (default); --spot: a Spot TPU VM; --queued: a queued resource (waits in
# the queue until it is ACTIVE), with --spot or --best-effort for those tiers.
# The contract this relies on: a run that gets SIGTERM saves a checkpoint and exits 0 with
# one line saying it was preempted; the same command resumes from the workdir; a finished
# run, rerun, returns at once. So restarting = rerunning the identical command.
#
# Environment: NAME ZONE TYPE BUCKET (required); WORKDIR (default $BUCKET/<config name>);
# DATA_DIR (default $BUCKET/tensorflow_datasets; empty: no --config.input.data_dir);
# VERSION (TPU software, default tpu-ubuntu2204-base; v5e: v2-alpha-tpuv5-lite, v6e:
# v2-alpha-tpuv6e); REPO and REF (the git remote and commit every host checks out, default
# this checkout's origin and HEAD: push first); POLL (seconds, default 60); MAX_RESTARTS
# (default 20); DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail

MODE=vm; TIER=""
while [ $# -gt 0 ]; do
  case "$1" in
    --spot) TIER=spot; shift ;;
    --best-effort) TIER=best-effort; shift ;;
    --queued) MODE=queued; shift ;;
    *) break ;;
  esac
done
if [ "$TIER" = best-effort ] && [ "$MODE" != queued ]; then
  echo "tpu_vm.sh: --best-effort is a queued-resources tier: add --queued" >&2; exit 2
fi
CMD=${1:-}; shift || true
case "$CMD" in
  run | create | start | watch | status | logs | stop | delete) ;;
  *)
    echo "usage: [NAME= ZONE= TYPE= BUCKET=] bash launch/tpu_vm.sh [--spot] [--queued]" \
      "[--best-effort] run|create|start|watch|status|logs|stop|delete [CONFIG flags...]" >&2
    exit 2 ;;
esac
: "${NAME:?set NAME}" "${ZONE:?set ZONE}"
VERSION=${VERSION:-tpu-ubuntu2204-base}
POLL=${POLL:-60}
MAX_RESTARTS=${MAX_RESTARTS:-20}
DRY_RUN=${DRY_RUN:-0}

gc() {
  if [ "$DRY_RUN" = 1 ]; then
    local a line="+ gcloud"
    for a in "$@"; do
      if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then line+=" $a"; else line+=" ${a@Q}"; fi
    done
    echo "$line" >&2
    [[ " $* " != *" describe "* ]]  # nothing exists in a dry run
    return
  fi
  gcloud "$@"
}

on_hosts() {  # on_hosts WORKER COMMAND: COMMAND in the home directory of those hosts
  gc compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker="$1" --command "$2"
}

state() {  # READY when the TPU can run; else its state, or NOT_FOUND
  local s
  if [ "$MODE" = queued ]; then
    s=$(gc compute tpus queued-resources describe "$NAME" --zone "$ZONE" \
      --format='value(state.state)' 2>/dev/null) || s=NOT_FOUND
    [ "$s" = ACTIVE ] || { echo "${s:-NOT_FOUND}"; return; }
  fi
  s=$(gc compute tpus tpu-vm describe "$NAME" --zone "$ZONE" --format='value(state)' \
    2>/dev/null) || s=NOT_FOUND
  echo "${s:-NOT_FOUND}"
}

wait_ready() {  # until READY; fails on a state it will not leave by itself
  local s last=""
  while :; do
    s=$(state)
    [ "$s" = READY ] || [ "$DRY_RUN" = 1 ] && return 0
    [ "$s" = "$last" ] || echo "tpu_vm.sh: $NAME is $s" >&2
    case "$s" in FAILED | SUSPENDED | PREEMPTED | TERMINATED | STOPPED | NOT_FOUND) return 1 ;; esac
    last=$s
    sleep "$POLL"
  done
}

create() {  # each step checked: set -e does not apply where create is an `if` condition
  local tier=() track=()
  [ -n "$TIER" ] && tier=("--$TIER")
  if [ "$MODE" = queued ]; then
    [ "$TIER" = best-effort ] && track=(alpha)  # the best-effort tier is in gcloud alpha only
    gc "${track[@]}" compute tpus queued-resources create "$NAME" --node-id "$NAME" \
      --zone "$ZONE" --accelerator-type "${TYPE:?set TYPE (e.g. v4-32)}" \
      --runtime-version "$VERSION" "${tier[@]}" || return 1
  else
    gc compute tpus tpu-vm create "$NAME" --zone "$ZONE" \
      --accelerator-type "${TYPE:?set TYPE (e.g. v4-32)}" --version "$VERSION" \
      "${tier[@]}" || return 1
  fi
  wait_ready || return 1
  install
}

delete() {
  if [ "$MODE" = queued ]; then
    gc compute tpus queued-resources delete "$NAME" --zone "$ZONE" --force --quiet || true
  else
    gc compute tpus tpu-vm delete "$NAME" --zone "$ZONE" --quiet || true
  fi
  # A new TPU of the same name can only be created once the old one is gone.
  local tries=0
  while [ "$DRY_RUN" != 1 ] && [ "$(state)" != NOT_FOUND ]; do
    tries=$((tries + 1))
    [ "$tries" -le 60 ] || { echo "tpu_vm.sh: $NAME is not going away" >&2; return 1; }
    sleep "$POLL"
  done
}

install() {  # on every host: the repo at REF, Python 3.11 (through uv), requirements + jax[tpu]
  local repo=${REPO:-} ref=${REF:-}
  [ -n "$repo" ] || repo=$(git config --get remote.origin.url) \
    || { echo "tpu_vm.sh: set REPO (the git URL every host clones)" >&2; return 1; }
  [ -n "$ref" ] || ref=$(git rev-parse HEAD) \
    || { echo "tpu_vm.sh: set REF (the commit every host checks out)" >&2; return 1; }
  # The TPU images' Python is 3.10; requirements.txt is pinned for 3.11, which uv brings.
  local uv="\$HOME/.local/bin/uv" cmd
  local steps=(
    "set -e"
    "[ -d beit-jax ] || git clone -q $(printf %q "$repo") beit-jax"
    "cd beit-jax"
    "git fetch -q origin"
    "{ git checkout -q --detach $(printf %q "origin/$ref") 2>/dev/null || \
git checkout -q --detach $(printf %q "$ref"); }"
    "{ python3 -m pip install -q --user uv==0.13.8 2>/dev/null || \
python3 -m pip install -q --user --break-system-packages uv==0.13.8; }"
    "[ -d .venv ] || $uv venv -q --python 3.11 .venv"
    "$uv pip install -q --python .venv/bin/python -r requirements.txt -r requirements-tpu.txt \
'jax[tpu]==0.10.2'")
  printf -v cmd '%s; ' "${steps[@]}"
  on_hosts all "${cmd%; }"
}

RUN_ARGS=()
run_args() {  # the one command every host runs, the same at every (re)start
  local config=${1:?usage: tpu_vm.sh $CMD CONFIG [flags...]}; shift
  local name=${config%%:*}; name=${name##*/}; name=${name%.py}
  WORKDIR=${WORKDIR:-${BUCKET:?set BUCKET (gs://...) or WORKDIR}/$name}
  local data_dir=${DATA_DIR-${BUCKET:?set BUCKET (gs://...) or DATA_DIR}/tensorflow_datasets}
  RUN_ARGS=(python -m beit_jax.main --multihost "--config=$config" "--workdir=$WORKDIR")
  [ -z "$data_dir" ] || RUN_ARGS+=("--config.input.data_dir=$data_dir")
  RUN_ARGS+=("$@")
}

start() {
  on_hosts all "cd beit-jax && . .venv/bin/activate && bash launch/tpu_worker.sh start$(
    printf ' %q' "${RUN_ARGS[@]}")"
}

run_status() {  # host 0: "running" | "exit N" | "lost" | "none" | "unreachable", then the log's tail
  local out
  out=$(on_hosts "${WORKER:-0}" "cd beit-jax && bash launch/tpu_worker.sh status" 2>/dev/null) \
    || out=unreachable
  echo "$out"
}

status_word() {  # the first line of a run_status output
  grep -m1 -E '^(running|lost|none|unreachable|exit [0-9]+)$' <<< "$1" || true
}

restarted() {  # count a rerun; false past MAX_RESTARTS
  RESTARTS=$((RESTARTS + 1))
  [ "$RESTARTS" -le "$MAX_RESTARTS" ] && return
  echo "tpu_vm.sh: $MAX_RESTARTS restarts: giving up (raise MAX_RESTARTS)" >&2; return 1
}

RESTARTS=0
watch() {
  [ "$DRY_RUN" = 1 ] && { echo "tpu_vm.sh: DRY_RUN: the restart loop would start here" >&2; return; }
  local s out first failed=0
  while :; do
    s=$(state)
    # Passing states (CREATING, REPAIRING, ...) are waited out; then the run's status decides.
    if [ "$s" != READY ] && wait_ready; then continue; fi
    if [ "$s" != READY ]; then
      s=$(state)
      echo "tpu_vm.sh: $NAME is $s: creating it again to rerun the same command" >&2
      [ "$s" = NOT_FOUND ] || delete || true
      # Capacity may be short (spot, queued): a failed create is tried again next poll.
      if create; then restarted || return 1; start || true; fi
      failed=0; sleep "$POLL"; continue
    fi
    out=$(run_status)
    first=$(status_word "$out")
    case "$first" in
      running | unreachable) failed=0 ;;
      "exit 0")
        if grep -v '^=== ' <<< "$out" | grep -qi preempted; then
          echo "tpu_vm.sh: the run was preempted on a live TPU: rerunning it" >&2
          restarted || return 1
          start || true
        else
          echo "tpu_vm.sh: the run finished:" >&2; tail -n 3 <<< "$out" >&2; return 0
        fi ;;
      lost | none)
        echo "tpu_vm.sh: no run on $NAME (a host restarted?): installing and starting it" >&2
        { install && start; } || true ;;
      *)
        # A run killed with its TPU exits non-zero just before the TPU leaves READY: look
        # once more before calling it a failure.
        if [ "$failed" = 1 ]; then
          echo "tpu_vm.sh: the run failed ($first):" >&2; echo "$out" >&2; return 1
        fi
        failed=1 ;;
    esac
    sleep "$POLL"
  done
}

case "$CMD" in
  create) create ;;
  start) run_args "$@"; start ;;
  watch) run_args "$@"; watch ;;
  run)
    run_args "$@"
    s=$(state)
    # A leftover that will not become READY by itself (preempted, failed) is replaced.
    if [ "$s" != NOT_FOUND ] && ! wait_ready; then delete; s=NOT_FOUND; fi
    if [ "$s" = NOT_FOUND ]; then
      create; start
    elif [ "$(status_word "$(run_status)")" = running ]; then
      echo "tpu_vm.sh: a run is going on $NAME: watching it" >&2
    else
      install; start
    fi
    echo "tpu_vm.sh: logs: bash launch/tpu_vm.sh logs -f;" \
      "TensorBoard: tensorboard --logdir $WORKDIR" >&2
    watch ;;
  status) echo "TPU $NAME: $(state)"; run_status ;;
  logs)
    follow=""; [ "${1:-}" = -f ] && follow=" -f"
    on_hosts "${WORKER:-0}" "tail -n 100$follow beit-jax/run.log" ;;
  stop) on_hosts all "cd beit-jax && bash launch/tpu_worker.sh stop" ;;
  delete) delete ;;
esac
