#!/usr/bin/env bash
# Create a TPU VM (or pod slice), install beit-jax on every host, and start a run on all of
# them. Re-running the last step resumes from the workdir's latest checkpoint.
#
#   NAME=beit-base ZONE=us-central2-b TYPE=v4-32 BUCKET=gs://my-bucket \
#     bash launch/tpu_vm.sh configs/beit_base.py [extra --config.* flags]
set -euo pipefail
: "${NAME:?set NAME}" "${ZONE:?set ZONE}" "${TYPE:?set TYPE (e.g. v4-32)}" "${BUCKET:?set BUCKET (gs://...)}"
CONFIG=${1:?usage: launch/tpu_vm.sh CONFIG [flags...]}; shift
VERSION=${VERSION:-tpu-ubuntu2204-base}
REPO=${REPO:-$(git config --get remote.origin.url)}

if ! gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$TYPE" \
    --version "$VERSION"
fi
on_all() { gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$1"; }

on_all "[ -d beit-jax ] || git clone $REPO beit-jax; cd beit-jax && git pull --ff-only &&
  python3 -m venv .venv && . .venv/bin/activate && pip install -q -r requirements.txt &&
  pip install -q -U 'jax[tpu]==0.10.2'"
RUN=$(basename "$CONFIG" .py)
on_all "cd beit-jax && . .venv/bin/activate && nohup python -m beit_jax.main --multihost \
  --config=$CONFIG --workdir=$BUCKET/$RUN --config.input.data_dir=$BUCKET/tensorflow_datasets $* \
  > run.log 2>&1 &"
echo "Started. Logs: gcloud compute tpus tpu-vm ssh $NAME --zone $ZONE --worker=0 --command 'tail -f beit-jax/run.log'"
echo "TensorBoard: tensorboard --logdir $BUCKET/$RUN"
