#!/usr/bin/env bash
# The host side of launch/tpu_vm.sh, run in the beit-jax checkout on every TPU host: starts
# a run in the background (it outlives the ssh session), says whether it is still running
# and how it exited, and stops it. run.log, run.pid and run.rc sit in the checkout.
#
#   bash launch/tpu_worker.sh start python -m beit_jax.main --multihost ...
#   bash launch/tpu_worker.sh status   # "running", "exit N", "lost" or "none", then the run's
#                                      # last log lines
#   bash launch/tpu_worker.sh stop     # SIGTERM: the run saves a checkpoint and exits 0
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  start)
    shift
    if [ -f run.pid ] && [ ! -f run.rc ] && kill -0 "$(cat run.pid)" 2>/dev/null; then
      echo "a run is already going here (pid $(cat run.pid)): not started again" >&2; exit 0
    fi
    rm -f run.pid run.rc
    echo "=== $(date -u +%FT%TZ) $*" >> run.log
    nohup bash launch/tpu_worker.sh _run "$@" >> run.log 2>&1 < /dev/null &
    # Return once the run's pid is written, so that a status right after never says "none".
    for _ in $(seq 100); do [ -f run.pid ] && exit 0; sleep 0.1; done
    echo "the run did not start; see run.log" >&2; exit 1
    ;;
  _run)
    # The command's own pid in run.pid (stop signals it, not this shell), its exit code in
    # run.rc. A SIGTERM to this shell (the host shutting down) is passed on to the command.
    shift
    "$@" &
    pid=$!
    echo "$pid" > run.pid
    trap 'kill -TERM "$pid" 2>/dev/null || true' TERM
    while :; do
      rc=0; wait "$pid" || rc=$?
      kill -0 "$pid" 2>/dev/null || break  # else wait was cut short by the trap
    done
    echo "$rc" > run.rc
    ;;
  status)
    if [ -f run.rc ]; then echo "exit $(cat run.rc)"
    elif [ -f run.pid ] && kill -0 "$(cat run.pid)" 2>/dev/null; then echo running
    elif [ -f run.pid ]; then echo lost  # killed with its host (a reboot): no exit code
    else echo none
    fi
    # The last lines of the latest run only (run.log keeps every run, each after a === line).
    if [ -f run.log ]; then
      awk -v t="${TAIL:-10}" '/^=== /{n=0} {l[n++]=$0}
        END{for (i = (n > t ? n - t : 0); i < n; i++) print l[i]}' run.log
    fi
    ;;
  stop)
    if [ -f run.pid ] && [ ! -f run.rc ]; then kill -TERM "$(cat run.pid)" 2>/dev/null || true; fi
    ;;
  *)
    echo "usage: bash launch/tpu_worker.sh start COMMAND... | status | stop" >&2; exit 2
    ;;
esac
