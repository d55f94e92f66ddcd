"""One trainer per module; `run` picks the one a config names.

Here, not in `main`, so that other entry points (experiments) can run configs without
`main`'s command-line flags.
"""


def run(config, workdir: str) -> dict:
  """Validates `config`, runs the trainer `config.trainer` names; returns its last metrics."""
  # Imported here so that `--help` and flag errors do not pay for TF/JAX start-up.
  # pylint: disable=g-import-not-at-top
  from beit_jax import validate
  from beit_jax.trainers import dvae, finetune, linear_probe, mim
  validate.validate(config)
  trainers = {"mim": mim, "dvae": dvae, "finetune": finetune, "linear_probe": linear_probe}
  return trainers[config.trainer].train_and_evaluate(config, workdir)
