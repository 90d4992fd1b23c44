#!/usr/bin/env bash
# Train on this machine -- its GPUs, TPU chips or CPU as the local devices -- and start the same
# command again when vap-train stops for a preemption, so the run resumes from its checkpoint.
#
#   launch/train_local.sh configs/train_cogvideox.py:1node runs/cog \
#       --set model.checkpoint=CogVideoX-5b-I2V --set data.latents=latents/cog
#   launch/train_local.sh configs/train_cogvideox.py:tiny /tmp/tiny --set data.latents=latents/tiny
#
# Arguments: CONFIG WORKDIR [more vap-train flags]. vap-train exits 75 after saving when it is
# told to stop (SIGTERM, JAX's preemption notice): the same command then runs again and resumes.
# If this script itself receives SIGTERM (the machine is going away), it passes it on, waits for
# the save and exits 75 too; any other exit status ends it. VAP_MAX_RESTARTS (default 100) caps
# the restarts.
set -uo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,15p' "$0" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
readonly PREEMPTED=75
max_restarts=${VAP_MAX_RESTARTS:-100}
stopping=0 child=
trap 'stopping=1; [[ -n $child ]] && kill -TERM "$child" 2>/dev/null' TERM INT

for ((restart = 0; ; restart++)); do
  vap-train --config "$config" --workdir "$workdir" "$@" &
  child=$!
  wait "$child"; status=$?
  while kill -0 "$child" 2>/dev/null; do  # `wait` returns early when a trapped signal arrives
    wait "$child"; status=$?
  done
  child=
  if [[ $status -ne $PREEMPTED || $stopping -eq 1 ]]; then
    exit "$status"
  fi
  if ((restart >= max_restarts)); then
    echo "train_local.sh: preempted $((restart + 1)) times, giving up (VAP_MAX_RESTARTS)" >&2
    exit "$status"
  fi
  echo "train_local.sh: vap-train was preempted after its checkpoint; resuming" >&2
done
