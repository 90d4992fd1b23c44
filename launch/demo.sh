#!/usr/bin/env bash
# End-to-end demo on CPU with RANDOM tiny weights (no download): writes a tiny diffusers-layout
# VAP checkpoint, converts it with vap-convert, draws an example clip and image, and runs
# vap-generate. The video shows noise-like colours: the weights are random, the plumbing is real.
# Needs the test extra (torch/diffusers/transformers write the tiny checkpoint):
#   pip install -e '.[test]' && bash launch/demo.sh [cogvideox|wan] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
family=${1:-cogvideox}
out=${2:-demo}
case "$family" in
  cogvideox) size=(--height 64 --width 96) ;;   # the tiny CogVideoX has learned 64x96 positions
  wan) size=(--height 48 --width 64) ;;
  *) echo "family must be cogvideox or wan" >&2; exit 2 ;;
esac
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
python tests/tiny_checkpoint.py --family "$family" --out "$out/tiny_$family"
vap-convert --src "$out/tiny_$family" --dst "$out/ckpt_$family" --dtype float32 --group-mb 64 --overwrite
python tests/example_inputs.py --out "$out/inputs" "${size[@]}"
vap-generate --ckpt "$out/ckpt_$family" --image "$out/inputs/image.png" \
  --ref-video "$out/inputs/ref.mp4" --ref-prompt "A bright square glides over a gradient." \
  --prompt "A bright square glides over a gradient, the camera holds still." \
  --frames 9 "${size[@]}" --steps 8 --dtype float32 --side-by-side --preview gif \
  --out "$out/vap_$family.mp4"
