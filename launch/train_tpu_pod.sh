#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (e.g. v5p-64): every worker runs the same command; JAX finds the
# coordinator and each worker's process id from the TPU metadata, each process reads its own
# share of every batch, process 0 writes the metrics, all write their checkpoint shards.
#
# Once, install vap_jax on every worker (the same path on each):
#   gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command \
#     'git clone <your vap_jax remote> vap_jax && cd vap_jax && pip install -e . "jax[tpu]==0.10.2"'
# Then, from your workstation:
#   launch/train_tpu_pod.sh $TPU $ZONE configs/train_wan.py:d10 /mnt/runs/wan \
#       --set model.checkpoint=/mnt/ckpt/wan_base --set data.latents=/mnt/latents/wan \
#       --set mesh.data=8 --set mesh.fsdp=8
#
# Arguments: TPU_NAME ZONE CONFIG WORKDIR [more vap-train flags]. WORKDIR, the checkpoint and the
# latents must be paths every worker sees (Filestore/NFS, or a GCS bucket mounted with gcsfuse).
# VAP_REMOTE_DIR (default: vap_jax, relative to the workers' home) is where vap_jax was cloned.
# Each worker runs launch/train_local.sh, which restarts vap-train after a preemption save.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '2,19p' "$0" >&2
  exit 2
fi
tpu=$1 zone=$2
shift 2
remote_dir=${VAP_REMOTE_DIR:-vap_jax}
command="cd $(printf '%q' "$remote_dir") && bash launch/train_local.sh $(printf '%q ' "$@")"
exec gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$command"
