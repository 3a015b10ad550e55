"""Command-line entry point.

  python -m s4jax.main --config=configs/shapes_supervised.py --workdir=runs/demo
  python -m s4jax.main --config=configs/shapes_supervised.py --workdir=runs/demo --mode=eval

Any config value can be overridden: `--config.total_steps=200 --config.model.backbone=resnet50`.
Bad input (config values, workdir conflicts, data, checkpoints) ends with one message on
stderr and exit status 2, not a traceback.
"""

import logging as logging_lib
import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from s4jax import errors
from s4jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file in configs/ (python file with get_config()).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train: train (resuming from the workdir's latest checkpoint); "
                          "eval: evaluate the workdir's best checkpoint.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False,
    "If the workdir holds a run with a different config, move it aside to <workdir>.old-<time> "
    "and start afresh (nothing is deleted).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-host runs on GPU clusters: host:port of process 0 for jax.distributed.initialize "
    "(TPU VMs need no flag: --distributed is enough).")
_STOP_AFTER = flags.DEFINE_integer(
    "stop_after", None,
    "End this invocation at this step (with a checkpoint); rerun the same command to go on. "
    "For time-limited sessions (Colab, preemptible VMs).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")

class _LibraryInfoFilter(logging_lib.Filter):
  """Drops INFO records of orbax and grain: a dozen lines per checkpoint drown the progress."""

  _QUIET = (f"{os.sep}orbax{os.sep}", f"{os.sep}grain{os.sep}")

  def filter(self, record):
    if record.levelno <= logging_lib.INFO and any(q in record.pathname for q in self._QUIET):
      return False
    return True


def _fail(message: str) -> None:
  print(f"s4jax: error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; use --flag=value.")
  try:
    # config_flags loads the file and applies the overrides lazily: touch it here so a bad
    # path or key fails now, as one message.
    config = _CONFIG.value
    if config is not None:
      config.to_dict()
  except Exception as e:  # pylint: disable=broad-except
    _fail_config(e, sys.argv)
  if config is None:
    _fail("--config is required, e.g. --config=configs/shapes_supervised.py")
  if not _WORKDIR.value:
    _fail("--workdir is required, e.g. --workdir=runs/demo")
  if _DISTRIBUTED.value or _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value)
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  try:
    if _MODE.value == "train":
      results = train.train_and_evaluate(config, _WORKDIR.value,
                                         overwrite=_OVERWRITE.value,
                                         stop_after=_STOP_AFTER.value)
    else:
      results = train.evaluate_only(config, _WORKDIR.value)
  except errors.UserInputError as e:
    _fail(str(e))
  if jax.process_index() == 0 and "eval/student_miou" in results:
    print(f"final student mIoU {100 * results['eval/student_miou']:.2f}  "
          f"teacher mIoU {100 * results['eval/teacher_miou']:.2f}")


def _parse_flags(argv):
  """absl's parser, but a bad config path or unknown config key is one message, not a
  traceback (config_flags raises plain exceptions for those)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e}")
  except Exception as e:  # pylint: disable=broad-except
    _fail_config(e, argv)


def _fail_config(error: Exception, argv) -> None:
  detail = " ".join(str(error).replace("\\n", " ").replace("\\'", "'").split()).strip("'\"")
  overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
  _fail(f"cannot build the config from the command line ({type(error).__name__}: {detail}). "
        f"Check the --config=... path and the overrides {overrides or '(none)'}; every key "
        "is listed in s4jax/config_schema.py.")


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
