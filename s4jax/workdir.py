"""A workdir belongs to one run: its config is recorded on first use and checked on reuse.

Resuming with the same config (operational keys such as `log_every` may differ) continues
the run. A different config is refused, because continuing someone else's checkpoints with
new settings silently mixes two experiments. `--overwrite` moves the old run aside
(`<workdir>.old-<time>`); nothing is deleted.
"""

import json
import os
import time

import ml_collections

from s4jax import config_schema
from s4jax.errors import WorkdirConflictError

CONFIG_FILE = "config.json"


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
        f"{path} does not exist: {workdir!r} is not the directory of a training run.")
  with open(path) as f:
    try:
      values = json.load(f)
    except json.JSONDecodeError as e:
      raise WorkdirConflictError(f"{path} is not valid JSON ({e}).") from None
  config = config_schema.default_config()

  def overlay(target, values, prefix):
    for key, value in values.items():
      if key not in target:
        raise WorkdirConflictError(
            f"{path}: {prefix}{key} is not a config key of this version of s4jax (a run "
            "from an older version?).")
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
  version as long as the key keeps its default.
  """
  defaults = _flatten(config_as_dict(config_schema.default_config()))
  a, b = _flatten(old), _flatten(new)
  keys = sorted(set(a) | set(b))
  return [k for k in keys
          if a.get(k, defaults.get(k, "<absent>")) != b.get(k, defaults.get(k, "<absent>"))
          and k not in config_schema.OPERATIONAL_KEYS]


def prepare(workdir: str, config, *, overwrite: bool = False, is_writer: bool = True,
            record: bool = True) -> str:
  """Creates or checks `workdir`; returns "new", "resume" or "moved:<path>".

  Raises WorkdirConflictError if the workdir holds a run with a different config and
  `overwrite` is False.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  new = config_as_dict(config)
  status = "new"
  if os.path.exists(path):
    with open(path) as f:
      try:
        old = json.load(f)
      except json.JSONDecodeError as e:
        raise WorkdirConflictError(
            f"{path} is not valid JSON ({e}); this workdir's run cannot be identified. "
            "Use another --workdir, or pass --overwrite to move it aside.") from e
    diff = differing_keys(old, new)
    if not diff:
      status = "resume"
    elif not overwrite:
      shown = "\n".join(f"  {k}: {_flatten(old).get(k, '<absent>')!r} -> "
                        f"{_flatten(new).get(k, '<absent>')!r}" for k in diff[:12])
      raise WorkdirConflictError(
          f"The workdir {workdir} holds a run with a different config ({len(diff)} keys "
          f"differ):\n{shown}\nNothing was changed. Use another --workdir, or pass "
          "--overwrite to move the old run to a sibling folder and start afresh.")
    else:
      moved = f"{os.path.abspath(workdir).rstrip(os.sep)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
      if is_writer:
        os.rename(workdir, moved)
      status = f"moved:{moved}"
  elif overwrite and os.path.isdir(workdir) and os.listdir(workdir) and is_writer:
    # Something is there without a config record: keep it, out of the way.
    moved = f"{os.path.abspath(workdir).rstrip(os.sep)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(workdir, moved)
    status = f"moved:{moved}"
  elif os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(
      os.path.join(workdir, "checkpoints")):
    raise WorkdirConflictError(
        f"The workdir {workdir} has checkpoints but no {CONFIG_FILE}, so it cannot be checked "
        "against this config. Use another --workdir, or pass --overwrite to move it aside.")
  if is_writer and record:  # record=False: check only (evaluation writes no config record)
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(new, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  return status
