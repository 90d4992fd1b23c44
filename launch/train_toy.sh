#!/usr/bin/env bash
# VAP-Toy from nothing, with the project's own commands, on CPU (fixed seeds):
#   bash launch/train_toy.sh [WORK] [DST]     # defaults: toy, vap_jax/toy/checkpoint
# 1 the dataset (vap-toy-data)            2 tokenizer + random T5 + scheduler (vap-toy frozen)
# 3 the VAE (vap-train, task 'vae': frames, then clips; vap-toy scale: its latent scale)
# 4 latents and caption embeddings (vap-precompute)
# 5 the I2V base transformer (task 'base') 6 the VAP expert on the frozen base (task 'vap')
# 7 one converted pipeline folder + example inputs (vap-toy pack)  8 the score (vap-eval)
# Each stage is skipped when its output is complete, so a rerun resumes (vap-train and
# vap-precompute also resume mid-stage). Writes WORK/times.txt (seconds per stage).
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-toy}
dst=${2:-vap_jax/toy/checkpoint}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
mkdir -p "$work"
times="$work/times.txt"
stage() {  # stage NAME DONE_MARKER COMMAND...: run COMMAND unless DONE_MARKER exists
  local name=$1 marker=$2; shift 2
  if [ -e "$marker" ]; then echo "== $name: done ($marker)"; return; fi
  echo "== $name"
  local start=$SECONDS
  "$@"
  echo "$name $((SECONDS - start))" >> "$times"
}
json() { printf '"%s"' "$1"; }  # a --set value that is a path

stage data "$work/data/toy.json" vap-toy-data --out "$work/data"
stage frozen "$work/frozen/scheduler" vap-toy frozen --data "$work/data" --dst "$work/frozen"
stage vae_frames "$work/runs/vae_frames/done" bash -c "vap-train \
  --config configs/train_vae.py:toy_frames --workdir $work/runs/vae_frames \
  --set data.root='$(json "$work/data")' && touch $work/runs/vae_frames/done"
stage vae_frames_export "$work/vae_frames/config.json" vap-export --run "$work/runs/vae_frames" \
  --dst "$work/vae_frames" --no-progress
stage vae_clips "$work/runs/vae/done" bash -c "vap-train --config configs/train_vae.py:toy_clips \
  --workdir $work/runs/vae --set data.root='$(json "$work/data")' \
  --set model.checkpoint='$(json "$work/vae_frames")' && touch $work/runs/vae/done"
stage vae_export "$work/vae/config.json" vap-export --run "$work/runs/vae" --dst "$work/vae" \
  --no-progress
stage vae_scale "$work/vae.scaled" bash -c "vap-toy scale --vae $work/vae --data $work/data \
  && touch $work/vae.scaled"  # the marker beside vae/, which ships
stage precompute "$work/latents/done" bash -c "vap-precompute cogvideox --model $work/frozen \
  --vae $work/vae --data $work/data --out $work/latents --set 'buckets=[[17,64,64]]' \
  --text-max-length 32 --store-dtype float32 --text-dtype float32 --workers 0 \
  && touch $work/latents/done"
stage base_train "$work/runs/base/done" bash -c "vap-train --config configs/train_toy.py:base \
  --workdir $work/runs/base --set data.latents='$(json "$work/latents")' \
  && touch $work/runs/base/done"
stage base_export "$work/base/transformer/config.json" vap-export --run "$work/runs/base" \
  --converted --dst "$work/base/transformer" --no-progress
stage vap_train "$work/runs/vap/done" bash -c "vap-train --config configs/train_toy.py:vap \
  --workdir $work/runs/vap --set data.latents='$(json "$work/latents")' \
  --set model.checkpoint='$(json "$work/base/transformer")' && touch $work/runs/vap/done"
stage vap_export "$work/vap/transformer/config.json" vap-export --run "$work/runs/vap" \
  --converted --dtype float16 --dst "$work/vap/transformer" --no-progress  # ships: half the bytes
stage pack "$work/packed" bash -c "vap-toy pack --transformer $work/vap/transformer \
  --vae $work/vae --frozen $work/frozen --examples-from $work/data --dst $dst --overwrite \
  && touch $work/packed"
stage eval "$work/eval.json" vap-eval --ckpt "$dst" --data "$work/data" --out "$work/eval.json" \
  --guidance 4 --reference-guidance --guidance-min-timestep 500 --no-progress  # vap-toy demo's
awk '{ s += $2; print } END { print "total", s }' "$times"
du -sh "$dst"
