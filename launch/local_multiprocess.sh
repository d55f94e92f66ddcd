#!/usr/bin/env bash
# Several processes on one machine, as several hosts would run (jax.distributed on
# 127.0.0.1), each with its own fake CPU devices. For debugging multi-host code paths.
#
#   bash launch/local_multiprocess.sh 2 configs/beit_tiny_local.py /tmp/beit_mp [flags...]
set -euo pipefail
N=${1:?number of processes}; CONFIG=${2:?config}; WORKDIR=${3:?workdir}; shift 3
DEVICES=${DEVICES:-4}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < N; i++)); do
  XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES JAX_PLATFORMS=cpu \
    python -m beit_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    --coordinator="127.0.0.1:$PORT" --num_processes="$N" --process_id=$i "$@" \
    > "${WORKDIR%/}.process$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
