#!/usr/bin/env bash
# Convert a downloaded checkpoint component to a vap_jax Orbax folder on this host (CPU is fine).
# Usage: launch/convert.sh pipeline SRC DST [flags of vap-convert]   (a whole VAP folder)
#        launch/convert.sh cogvideox|wan SRC DST [extra flags of python -m convert.<model>]
#        launch/convert.sh vae wan|cogvideox SRC DST
#        launch/convert.sh encoders t5|clip SRC DST
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 pipeline|cogvideox|wan SRC DST [flags] | $0 vae|encoders KIND SRC DST [flags]" >&2
  exit 2
fi
model=$1
shift
# Conversion never needs an accelerator: keep JAX on the host so it does not grab GPU memory.
export JAX_PLATFORMS=cpu
case "$model" in
  pipeline) src=$1 dst=$2; shift 2; exec python -m convert.pipeline --src "$src" --dst "$dst" "$@" ;;
  cogvideox|wan) src=$1 dst=$2; shift 2; exec python -m "convert.$model" --src "$src" --dst "$dst" "$@" ;;
  vae) kind=$1 src=$2 dst=$3; shift 3; exec python -m convert.vae "$kind" --src "$src" --dst "$dst" "$@" ;;
  encoders) kind=$1 src=$2 dst=$3; shift 3; exec python -m convert.encoders --kind "$kind" --src "$src" --dst "$dst" "$@" ;;
  *) echo "unknown model $model (pipeline, cogvideox, wan, vae, encoders)" >&2; exit 2 ;;
esac
