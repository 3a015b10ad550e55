"""Command-line entry point.

  python -m s4jax.main --config=configs/shapes_supervised.py --workdir=runs/demo
  python -m s4jax.main --config=configs/shapes_supervised.py --workdir=runs/demo --mode=eval
  python -m s4jax.main --workdir=runs/demo --mode=eval    # the run's recorded config
  python -m s4jax.main --config=configs/recorded.py:runs/demo --workdir=runs/demo --mode=eval \
      --config.eval.mode=sliding                           # ... with evaluation overrides

Any config value can be overridden: `--config.total_steps=200 --config.model.backbone=resnet50`.
Bad input (config values, workdir conflicts, data, checkpoints) ends with one message on
stderr and exit status 2, not a traceback. SIGTERM or Ctrl-C saves the current step and exits
with 143 or 130 (128 + the signal); the same command then continues.
"""

import sys

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from s4jax import compilation_cache
from s4jax import errors
from s4jax import logs
from s4jax import train
from s4jax import workdir as workdir_lib
from s4jax.models import conv_ops

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Path to a config file in configs/ (python file with get_config()); "
  "configs/recorded.py:WORKDIR is the config a run recorded (for --mode=eval or resuming "
  "without repeating its overrides). --mode=eval without --config uses it too.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images.")
_MODE = flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "eval"],
  "train: train (resuming from the workdir's latest checkpoint); "
  "eval: evaluate a checkpoint of the workdir (--which).",
)
_WHICH = flags.DEFINE_string(
  "which",
  "best",
  "--mode=eval: the checkpoint to evaluate: best, latest or a step number. The config may "
  "differ from the run's in data.val_list, data.num_val and eval.* (the run's config.json "
  "is not changed).",
)
_OVERWRITE = flags.DEFINE_bool(
  "overwrite",
  False,
  "If the workdir holds a run with a different config, move it aside to <workdir>.old-<time> "
  "and start afresh (nothing is deleted).",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  "Multi-host runs on GPU clusters: host:port of process 0 for jax.distributed.initialize "
  "(TPU VMs need no flag: --distributed is enough).",
)
_STOP_AFTER = flags.DEFINE_integer(
  "stop_after",
  None,
  "End this invocation at this step (with a checkpoint); rerun the same command to go on. "
  "For time-limited sessions (Colab, preemptible VMs).",
)
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
_COMPILATION_CACHE = flags.DEFINE_string(
  "compilation_cache",
  "auto",
  "JAX's persistent compilation cache, so a restarted run does not recompile: "
  f"{compilation_cache.SETTINGS_HELP} (auto: {compilation_cache.default_directory()}; off "
  "for XLA:CPU with several devices).",
)


def _fail(message: str) -> None:
  print(f"s4jax: error: {message}", file=sys.stderr)
  sys.exit(2)


def _which(text: str):
  """--which: "best", "latest" or a step number."""
  if text in ("best", "latest"):
    return text
  if text.isdigit() and int(text) > 0:
    return int(text)
  _fail(
    f"--which={text!r} is not valid: give best, latest or a step number (one of the "
    "folders in <workdir>/checkpoints)."
  )


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; use --flag=value.")
  try:
    # config_flags loads the file and applies the overrides lazily: touch it here so a bad
    # path or key fails now, as one message.
    config = _CONFIG.value
    if config is not None:
      config.to_dict()
  except errors.UserInputError as e:  # e.g. configs/recorded.py without a workdir
    _fail(str(e))
  except Exception as e:  # pylint: disable=broad-except
    _fail_config(e, sys.argv)
  if not _WORKDIR.value:
    _fail("--workdir is required, e.g. --workdir=runs/demo")
  if config is None and _MODE.value == "eval":
    # Evaluation of a run as it was trained: its own recorded config (overrides need
    # --config=configs/recorded.py:WORKDIR, which takes them).
    try:
      config = workdir_lib.recorded_config(_WORKDIR.value)
    except errors.UserInputError as e:
      _fail(f"{e} Give the run's workdir, or its --config.")
  if config is None:
    _fail(
      "--config is required, e.g. --config=configs/shapes_supervised.py (or, to continue "
      "a run with its own recorded config, --config=configs/recorded.py:WORKDIR)"
    )
  if _MODE.value == "eval" and _OVERWRITE.value:
    _fail(
      "--overwrite does nothing with --mode=eval (evaluation never changes the run); leave it out."
    )
  if _MODE.value == "train" and flags.FLAGS["which"].present:
    _fail(
      "--which chooses the checkpoint of --mode=eval; training always continues from "
      "the latest one. Leave it out, or add --mode=eval."
    )
  if _STOP_AFTER.value is not None and _STOP_AFTER.value < 1:
    _fail(
      f"--stop_after={_STOP_AFTER.value} is not valid: give the step to stop at (an "
      "integer >= 1; the run saves there), or leave it out."
    )
  which = _which(_WHICH.value)
  logs.set_up_console()
  if _DISTRIBUTED.value or _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value)
  try:
    compilation_cache.enable(_COMPILATION_CACHE.value)
    conv_ops.weight_grad_implementation()  # a bad S4JAX_CONV_WEIGHT_GRAD fails here, not in a trace
    conv_ops.dilated_implementation()  # likewise S4JAX_DILATED_CONV
    if _MODE.value == "train":
      results = train.train_and_evaluate(
        config, _WORKDIR.value, overwrite=_OVERWRITE.value, stop_after=_STOP_AFTER.value
      )
    else:
      results = train.evaluate_only(config, _WORKDIR.value, which=which)
  except errors.UserInputError as e:
    _fail(str(e))
  except errors.Stopped as e:
    if jax.process_index() == 0:
      print(f"s4jax: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:  # Ctrl-C twice before training began
    print("s4jax: interrupted; nothing was saved.", file=sys.stderr)
    sys.exit(130)
  if jax.process_index() != 0:
    return
  if "stopped_at" in results:
    print(
      f"stopped at step {results['stopped_at']} of {results['total_steps']}; rerun without "
      "--stop_after (or with a later step) to continue."
    )
  elif "eval/student_miou" in results:
    print(
      f"final student mIoU {100 * results['eval/student_miou']:.2f}  "
      f"teacher mIoU {100 * results['eval/teacher_miou']:.2f}"
    )


def _parse_flags(argv):
  """absl's parser, but a bad config path or unknown config key is one message, not a
  traceback (config_flags raises plain exceptions for those)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e}")
  except errors.UserInputError as e:  # raised by a config file (configs/recorded.py)
    _fail(str(e))
  except Exception as e:  # pylint: disable=broad-except
    _fail_config(e, argv)


def _fail_config(error: Exception, argv) -> None:
  detail = " ".join(str(error).replace("\\n", " ").replace("\\'", "'").split()).strip("'\"")
  overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
  _fail(
    f"cannot build the config from the command line ({type(error).__name__}: {detail}). "
    f"Check the --config=... path and the overrides {overrides or '(none)'}; every key "
    "is listed in s4jax/config_schema.py."
  )


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
