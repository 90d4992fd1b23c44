"""One of two `jax.distributed` CPU processes for test_export (not a test itself).

argv: golden transformer folder, output folder, port, process id. Each process has 2 CPU devices;
the golden Wan-VAP transformer is loaded onto a (fsdp=2, tensor=2) mesh over all 4, so no process
holds a whole tensor, and exported: every process gathers each slice, process 0 writes.
"""
import sys

import jax


def main(src, dst, port, pid):
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                             process_id=pid)
  from vap_jax.parallel import make_mesh
  from vap_jax.weights.export import export
  from vap_jax.weights.wan import load_wan
  assert jax.device_count() == 4 and jax.local_device_count() == 2
  model = load_wan(src, dtype='float32', mesh=make_mesh(dict(fsdp=2, tensor=2)))
  kernel = model.blocks.attn1.to_q.kernel[...]
  assert not kernel.is_fully_addressable  # the gather really crosses processes
  summary = export(model, dst, dtype='float32', max_shard_size='60KB')
  print('exported', summary['tensors'], 'tensors on process', pid, flush=True)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
