"""Errors caused by the user's input. The CLI prints their message alone (no traceback).

Each message names the key, file or value at fault and says what to do.
"""


class UserInputError(Exception):
  """Base class: bad config, data, workdir or checkpoint."""


class ConfigError(UserInputError, ValueError):
  """A config value that cannot work."""


class DataError(UserInputError, ValueError):
  """Missing, malformed or inconsistent data on disk."""


class WorkdirError(UserInputError):
  """The workdir cannot be used: a file, not writable, or a folder that is not a run."""


class WorkdirConflictError(WorkdirError):
  """The workdir holds another run."""


class CheckpointMismatchError(UserInputError, ValueError):
  """A checkpoint that does not fit the model the config builds."""


class CheckpointDamagedError(UserInputError):
  """No intact checkpoint to restore: files missing, garbled or unreadable."""


class NonFiniteLossError(UserInputError, RuntimeError):
  """Training diverged; the last good checkpoint is kept."""


class Stopped(Exception):
  """Training stopped early on a signal (SIGTERM, SIGINT); the message says what was saved.

  Not a UserInputError: nothing was wrong with the input. The CLI prints the message and
  exits with `exit_code` (128 + the signal number, as a shell reports a killed command).
  """

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


def require(condition: bool, key: str, value, expected: str) -> None:
  """Raises ConfigError naming `config.<key>` and what it should be unless `condition`."""
  if not condition:
    raise ConfigError(
      f"config.{key}={value!r} is not valid: expected {expected}. "
      f"Fix it in the config file or override it with --config.{key}=..."
    )
