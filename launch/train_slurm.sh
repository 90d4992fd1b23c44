#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one process per host, the GPUs of a host as its local devices.
# JAX reads the coordinator, process count and ids from SLURM; each process reads its own share
# of every batch, process 0 writes the metrics, all write their checkpoint shards.
#
#   sbatch --nodes=6 launch/train_slurm.sh configs/train_cogvideox.py:multinode runs/cog \
#       --set model.checkpoint=CogVideoX-5b-I2V --set data.latents=latents/cog
#   sbatch --nodes=1 launch/train_slurm.sh configs/train_wan.py:d10 runs/wan --set ...
#
# Arguments: CONFIG WORKDIR [more vap-train flags]; WORKDIR on a filesystem every node sees.
# Before the time limit (and on preemption) SLURM sends SIGTERM to vap-train, which saves at the
# next step boundary and exits 75; this script then requeues the job, which resumes from that
# checkpoint. Change the #SBATCH lines (or override them on the sbatch command line) to fit the
# cluster: GPUs per node, CPUs, time limit, partition.
#
#SBATCH --job-name=vap-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=vap-train-%j.log
set -uo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,14p' "$0" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
readonly PREEMPTED=75
# No --kill-on-bad-exit: a process that exits 75 first must not kill the others' final save
# (a crashed process brings the rest down through JAX's distributed heartbeat instead).
srun vap-train --config "$config" --workdir "$workdir" "$@"
status=$?
if [[ $status -eq $PREEMPTED && -n ${SLURM_JOB_ID:-} ]]; then
  echo "train_slurm.sh: vap-train saved and stopped; requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
