"""Errors caused by the user's input. The CLI prints their message alone (no traceback).

Each message names the key, file or value at fault and says what to do.
"""


class UserInputError(Exception):
  """Base class: bad config, data, workdir or checkpoint."""


class ConfigError(UserInputError, ValueError):
  """A config value that cannot work."""


class DataError(UserInputError, ValueError):
  """Missing, malformed or inconsistent data on disk."""


class WorkdirConflictError(UserInputError):
  """The workdir holds another run."""


class CheckpointMismatchError(UserInputError, ValueError):
  """A checkpoint that does not fit the model the config builds."""


class NonFiniteLossError(UserInputError, RuntimeError):
  """Training diverged; the last good checkpoint is kept."""
