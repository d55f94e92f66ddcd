"""User-facing errors: one line that names the field or file and what is accepted."""


class ConfigError(ValueError):
  """A config value, file or dataset a run depends on is wrong or missing.

  `main` prints these as a single line (no traceback): the message must say
  which field/file is at fault and what would be accepted.
  """


class TrainingError(RuntimeError):
  """The run cannot go on (e.g. too many non-finite steps); its checkpoints are intact."""


class Preempted(Exception):
  """The run was told to stop (SIGTERM: a preemption notice) and saved a checkpoint at
  `step` first; the same command resumes there. `main` says so in one line and exits 0."""

  def __init__(self, desc: str, step: int, workdir: str):
    super().__init__(
      f"{desc} preempted at step {step}; checkpoint saved in {workdir}; "
      "rerun the same command to resume"
    )
    self.desc, self.step, self.workdir = desc, step, workdir
