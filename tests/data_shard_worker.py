"""One of two `jax.distributed` CPU processes for test_data_pipeline (not a test itself).

argv: fixture_root out_dir port process_id. Reads two epochs of its shard with batch 1 and
records the position within the epoch (from the global sample index) of every sample, decoded or
failed; then saves the iterator through an Orbax CheckpointManager (both processes), restores a
fresh loader and checks that the next batches are identical.
"""
import json
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp


def main(root, out_dir, port, pid):
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                             process_id=pid)
  from test_data_pipeline import config
  from vap_jax.data import make_loader
  cfg = config(root, batch_size=1, num_epochs=None, workers=0)
  loader = make_loader(cfg)  # shard from jax.process_index() / process_count()
  assert loader.shard == (pid, 2)
  rows = loader.rows_per_epoch * 2
  result = {'rows': rows}
  good = []
  while not good or good[-1][0] < 2 * rows:  # read until a sample of the third epoch arrives
    b = next(loader)
    good.append((int(b['index'][0]), str(b['path'][0])))
  seen = good[:-1] + [(i, p) for i, p in loader.failures.recent if i < 2 * rows]
  for epoch in range(2):
    mine = [(i % rows, p) for i, p in seen if i // rows == epoch]
    result[f'epoch{epoch}'] = {'positions': [i for i, _ in mine], 'paths': [p for _, p in mine]}
  ckpt = Path(out_dir) / 'ckpt'
  with ocp.CheckpointManager(ckpt) as mngr:
    mngr.save(1, args=ocp.args.Composite(model=ocp.args.StandardSave({'x': np.ones(2)}),
                                         **loader.save_args()))
    mngr.wait_until_finished()
  expected = [next(loader) for _ in range(5)]
  fresh = make_loader(cfg)
  with ocp.CheckpointManager(ckpt) as mngr:
    mngr.restore(1, args=ocp.args.Composite(model=ocp.args.StandardRestore({'x': np.ones(2)}),
                                            **fresh.restore_args()))
  got = [next(fresh) for _ in range(5)]
  result['resumed_equal'] = all(
      np.array_equal(g[k], e[k]) for g, e in zip(got, expected) for k in e)
  (Path(out_dir) / f'out_{pid}.json').write_text(json.dumps(result))
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
