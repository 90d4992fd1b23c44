"""VAP-Toy, the model: a tiny CogVideoX-VAP trained end to end by this project's own commands on
the procedural VAP-Toy videos (`vap_jax.data.toy`), shipped with the package so that the main
job shows a subject following a reference video's condition on any CPU.

`CHECKPOINT` is the shipped converted pipeline folder (``vap-generate --ckpt toy``), `EXAMPLES`
its example inputs (a held-out subject image and a reference clip of another subject).
``launch/train_toy.sh`` rebuilds both from nothing (`vap_jax.toy.build`); `vap_jax.toy.evaluate`
scores a checkpoint on the held-out pairs (``vap-eval``).
"""
from pathlib import Path

HERE = Path(__file__).parent
CHECKPOINT = HERE / 'checkpoint'
EXAMPLES = HERE / 'examples'
NAME = 'toy'  # what --ckpt accepts for CHECKPOINT


def resolve(ckpt: str) -> str:
  """``ckpt`` with the name 'toy' replaced by the shipped checkpoint's folder (always: a local
  folder of that name is ``./toy``)."""
  if ckpt == NAME:
    if not (CHECKPOINT / 'manifest.json').is_file():
      raise FileNotFoundError(f'the toy checkpoint is not installed ({CHECKPOINT} has no '
                              'manifest.json): build it with launch/train_toy.sh')
    return str(CHECKPOINT)
  return ckpt
