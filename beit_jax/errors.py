"""User-facing errors: one line that names the field or file and what is accepted."""


class ConfigError(ValueError):
  """A config value, file or dataset a run depends on is wrong or missing.

  `main` prints these as a single line (no traceback): the message must say
  which field/file is at fault and what would be accepted.
  """


class TrainingError(RuntimeError):
  """The run cannot go on (e.g. too many non-finite steps); its checkpoints are intact."""
