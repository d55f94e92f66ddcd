r"""The exact config of an earlier run, read back from its workdir's config.json.

  python -m beit_jax.main --config=configs/from_workdir.py:/tmp/beit_tiny --workdir=/tmp/again

Every run writes its full config to `<workdir>/config.json`, so a run can be reproduced
(or continued elsewhere) from its workdir alone. Overrides work as usual.
"""

from beit_jax.training import workdir as workdir_lib


def get_config(workdir: str):
  return workdir_lib.load_config(workdir)
