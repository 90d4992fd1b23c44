#!/usr/bin/env bash
# Convert a diffusers CogVideoX(-VAP) transformer to a vap_jax Orbax folder on this host.
# Usage: launch/convert_cogvideox.sh SRC DST [extra vap-convert-cogvideox flags]
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 SRC DST [--dtype bfloat16|float32] [--overwrite]" >&2
  exit 2
fi
src=$1 dst=$2
shift 2
# Conversion never needs an accelerator: keep JAX on the host so it does not grab GPU memory.
JAX_PLATFORMS=cpu exec python -m convert.cogvideox --src "$src" --dst "$dst" "$@"
