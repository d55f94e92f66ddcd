"""Console logging for the command-line tools: our lines, not every library's."""

import logging as std_logging
import os

from absl import logging


class _OrbaxInfoFilter:
  """Drops orbax's INFO lines (it logs every file it writes) and one benign warning."""

  def filter(self, record) -> bool:
    if "/orbax/" not in record.pathname:
      return True
    return record.levelno >= std_logging.WARNING and "Metadata file does not exist" not in str(
      record.msg
    )


def quiet_libraries() -> None:
  """Call once at the start of a command (before TF is imported, for its C++ logs)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.get_absl_logger().addFilter(_OrbaxInfoFilter())
