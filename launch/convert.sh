#!/usr/bin/env bash
# Convert downloaded checkpoints to vap_jax Orbax folders (the converters are installed commands).
# Usage: launch/convert.sh pipeline SRC DST [flags of vap-convert]      (a whole VAP folder)
#        launch/convert.sh cogvideox|wan SRC DST [flags of vap-convert-<model>]
#        launch/convert.sh vae wan|cogvideox SRC DST
#        launch/convert.sh encoders t5|clip SRC DST
set -euo pipefail
model=${1:?usage: launch/convert.sh pipeline|cogvideox|wan|vae|encoders ...}
shift
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}   # conversion needs no accelerator
case "$model" in
  pipeline) src=$1 dst=$2; shift 2; exec vap-convert --src "$src" --dst "$dst" "$@" ;;
  cogvideox|wan) src=$1 dst=$2; shift 2; exec "vap-convert-$model" --src "$src" --dst "$dst" "$@" ;;
  vae) kind=$1 src=$2 dst=$3; shift 3; exec vap-convert-vae --kind "$kind" --src "$src" --dst "$dst" "$@" ;;
  encoders) kind=$1 src=$2 dst=$3; shift 3; exec vap-convert-encoder --kind "$kind" --src "$src" --dst "$dst" "$@" ;;
  *) echo "unknown model $model (pipeline, cogvideox, wan, vae, encoders)" >&2; exit 2 ;;
esac
