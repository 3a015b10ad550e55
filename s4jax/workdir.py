"""A workdir belongs to one run: its config is recorded once the run has started and checked
on reuse.

Resuming with the same config (operational keys such as `log_every` may differ) continues
the run. A different config is refused, because continuing someone else's checkpoints with
new settings silently mixes two experiments. `--overwrite` moves the old run aside
(`<workdir>.old-<time>`); nothing is deleted. A folder that is not a run (a dataset, a home
directory) is never used, moved or written into, with or without `--overwrite`.

`config.json` is written by `record`, called by the training loop once data and state are
built: a start that fails (a wrong data root, say) leaves no record that would make the
corrected command look like a different run.
"""

import json
import os
import time

import ml_collections

from s4jax import config_schema
from s4jax.losses import registry
from s4jax.errors import WorkdirConflictError, WorkdirError

CONFIG_FILE = "config.json"
# What a run writes into its workdir (besides config.json): a folder holding only these
# (e.g. after a start that failed before recording its config) still belongs to s4jax.
RUN_ENTRIES = frozenset(
  {
    CONFIG_FILE,
    CONFIG_FILE + ".tmp",
    "checkpoints",
    "best",
    "damaged",
    "metrics.jsonl",
    "metrics.jsonl.tmp",
    "tensorboard",
    "images",
  }
)
# Keys evaluation may change without being another run: what it evaluates on and how.
EVAL_KEY_PREFIXES = ("eval.",)
EVAL_KEYS = ("data.val_list", "data.num_val")


def _flatten(d, prefix=""):
  out = {}
  for key, value in d.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = list(value) if isinstance(value, tuple) else value
  return out


def recorded_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run recorded in `workdir`, as a typed config (the defaults overlaid)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise WorkdirConflictError(
      f"{path} does not exist: {workdir!r} is not the directory of a training run."
    )
  with open(path) as f:
    try:
      values = json.load(f)
    except json.JSONDecodeError as e:
      raise WorkdirConflictError(f"{path} is not valid JSON ({e}).") from None
  return config_from_dict(values, path, WorkdirConflictError)


def config_from_dict(values: dict, origin: str, error=WorkdirConflictError):
  """The typed config: the defaults overlaid with `values` (a config as JSON); `error`
  (naming `origin`) for a key this version of s4jax does not have."""
  config = config_schema.default_config()

  def overlay(target, values, prefix):
    for key, value in values.items():
      if key not in target:
        raise error(
          f"{origin}: {prefix}{key} is not a config key of this version of s4jax "
          "(written by another version?)."
        )
      if isinstance(value, dict):
        overlay(target[key], value, f"{prefix}{key}.")
      else:
        target[key] = tuple(value) if isinstance(target[key], tuple) else value

  overlay(config, values, "")
  return config


def config_as_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def differing_keys(old: dict, new: dict) -> list[str]:
  """Keys whose values differ, ignoring the operational ones.

  A key missing from one side counts as its default: keys added in later versions default
  to the old behaviour, so a run recorded before a key existed resumes under the new
  version as long as the key keeps its default. The settings of an objective that is off on
  both sides (`losses.<name>.enabled` False in each) do not count: they change nothing the
  run computes, and a default that moved in a later version must not lock its runs out.
  """
  defaults = _flatten(config_as_dict(config_schema.default_config()))
  a, b = _flatten(old), _flatten(new)

  def value(side, key):
    return side.get(key, defaults.get(key, "<absent>"))

  def in_objective_off_on_both_sides(key):
    parts = key.split(".")
    if len(parts) < 3 or parts[0] != "losses" or parts[-1] == "enabled":
      return False
    switch = f"losses.{parts[1]}.enabled"
    return value(a, switch) is False and value(b, switch) is False

  keys = sorted(set(a) | set(b))
  return [
    k
    for k in keys
    if value(a, k) != value(b, k)
    and k not in config_schema.OPERATIONAL_KEYS
    and not in_objective_off_on_both_sides(k)
  ]


def _is_eval_key(key: str) -> bool:
  return key in EVAL_KEYS or key.startswith(EVAL_KEY_PREFIXES) or key in registry.eval_keys()


def _shown_diff(old: dict, new: dict, diff: list[str]) -> str:
  return "\n".join(
    f"  {k}: {_flatten(old).get(k, '<absent>')!r} -> {_flatten(new).get(k, '<absent>')!r}"
    for k in diff[:12]
  )


def _read_record(path: str, advice: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise WorkdirConflictError(
      f"{path} is not valid JSON ({e}); this workdir's run cannot be identified. {advice}"
    ) from None
  except OSError as e:
    raise WorkdirError(f"Cannot read {path} ({e.strerror}).") from None


def _moved_name(workdir: str) -> str:
  return f"{os.path.abspath(workdir).rstrip(os.sep)}.old-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_folder(workdir: str) -> None:
  """A path that exists must be a folder."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(
      f"--workdir={workdir} is a file, not a folder. Give the path of a new "
      "(or empty) folder for the run."
    )


def _foreign_entries(workdir: str) -> list[str]:
  """Entries of an existing folder without a config record that s4jax did not write."""
  if not os.path.isdir(workdir) or os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    return []
  return sorted(set(os.listdir(workdir)) - RUN_ENTRIES)


def _check_writable(workdir: str) -> None:
  """Creates the workdir and writes a probe file: a read-only or missing filesystem is one
  message naming the path now, not a traceback at the first checkpoint."""
  probe = os.path.join(workdir, ".s4jax-write-test")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "w") as f:
      f.write("")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(
      f"Cannot write in --workdir={workdir} ({e.strerror or e}). Give a folder on a "
      "writable filesystem."
    ) from None


def prepare(workdir: str, config, *, overwrite: bool = False, is_writer: bool = True) -> str:
  """Checks `workdir` for training (and creates it); returns "new", "resume" or
  "moved:<path>". Writes no config record: see `record`.

  Raises WorkdirError if the path is a file, not writable, or a non-empty folder that is not
  a run; WorkdirConflictError if it holds a run with a different config and `overwrite` is
  False.
  """
  _check_folder(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  new = config_as_dict(config)
  status = "new"
  foreign = _foreign_entries(workdir)
  if foreign:
    shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
    raise WorkdirError(
      f"--workdir={workdir} is not empty and is not an s4jax run (no {CONFIG_FILE}; it "
      f"holds {shown}). Nothing was changed. Give a new or empty folder for the run; "
      "s4jax does not write into, move or delete a folder it did not create, even with "
      "--overwrite."
    )
  if os.path.exists(path):
    old = _read_record(path, "Use another --workdir, or pass --overwrite to move it aside.")
    diff = differing_keys(old, new)
    if not diff:
      status = "resume"
    elif not overwrite:
      raise WorkdirConflictError(
        f"The workdir {workdir} holds a run with a different config ({len(diff)} keys "
        f"differ):\n{_shown_diff(old, new, diff)}\nNothing was changed. Use another "
        "--workdir, or pass --overwrite to move the old run to a sibling folder and start "
        "afresh."
      )
    else:
      moved = _moved_name(workdir)
      if is_writer:
        os.rename(workdir, moved)
      status = f"moved:{moved}"
  elif overwrite and os.path.isdir(workdir) and os.listdir(workdir):
    # What a run writes, without a config record: keep it, out of the way.
    moved = _moved_name(workdir)
    if is_writer:
      os.rename(workdir, moved)
    status = f"moved:{moved}"
  elif os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(
    os.path.join(workdir, "checkpoints")
  ):
    raise WorkdirConflictError(
      f"The workdir {workdir} has checkpoints but no {CONFIG_FILE}, so it cannot be checked "
      "against this config. Use another --workdir, or pass --overwrite to move it aside."
    )
  if is_writer:
    _check_writable(workdir)
  return status


def record(workdir: str, config) -> None:
  """Writes `config.json` (atomically): the run has started, and this is its config."""
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(config_as_dict(config), f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def check_for_evaluation(workdir: str, config) -> None:
  """Evaluation reads a run as it is: it needs the run's config record, and the config may
  differ from it only in what evaluation uses (`data.val_list`, `data.num_val`, `eval.*`)
  and operational keys. Writes nothing."""
  _check_folder(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise WorkdirError(
      f"--workdir={workdir} holds no training run ({path} does not exist). Train first "
      "with --mode=train, or check the path."
    )
  old = _read_record(path, "Evaluate it with the config it was trained with.")
  new = config_as_dict(config)
  diff = [k for k in differing_keys(old, new) if not _is_eval_key(k)]
  if diff:
    raise WorkdirConflictError(
      f"The run in {workdir} was trained with a different config ({len(diff)} keys "
      f"differ):\n{_shown_diff(old, new, diff)}\nEvaluation may change only data.val_list, "
      "data.num_val, eval.* and the operational keys; give the config (and overrides) the "
      "run was trained with."
    )
