"""Worker of test_vqkd.py's two-process test: one of 2 processes (4 CPU devices each,
`jax.distributed` on 127.0.0.1) holds its half of the global batch; the codebook updates
are jitted on it, as the VQ-KD trainer's step runs them.

  python -m tests.two_process_codebook PORT PROCESS_ID OUT.npz
"""

import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tests import codebook_case


def main(port: str, process_id: str, out: str) -> None:
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
  mesh = Mesh(np.array(jax.devices()), ("data",))
  state, z, codes, key = codebook_case.inputs()
  half = z.shape[0] // 2
  mine = slice(jax.process_index() * half, (jax.process_index() + 1) * half)
  batch = NamedSharding(mesh, P("data"))
  z_g = jax.make_array_from_process_local_data(batch, np.asarray(z)[mine])
  codes_g = jax.make_array_from_process_local_data(batch, np.asarray(codes)[mine])
  results = codebook_case.run_all(codebook_case.sharded(mesh), state, z_g, codes_g, key)
  if jax.process_index() == 0:
    np.savez(
      out,
      **{
        k: np.asarray(jax.device_get(v), np.float32) for k, v in codebook_case.flat(results).items()
      },
    )
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
