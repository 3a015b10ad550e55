"""Checkpoints: the only module that imports orbax.

Two managers under the workdir:
  checkpoints/  the last `keep` train checkpoints: state + every data iterator's state, so a
                restarted run continues with exactly the next batch;
  best/         the model (student, teacher, BatchNorm statistics; no optimizer moments) with
                the best evaluation metric so far, and `best_metric.json`.
Saves are asynchronous: `save` returns once the arrays are copied off the devices.

Every finished save gets a checksum list, `<step>/s4jax_sha256.json` (size and sha256 of each
file), written once orbax has renamed the step folder into place: at the next save, `wait` or
`close`. Restores check it first: a garbled, truncated or deleted file is reported by name and
the newest intact checkpoint is restored instead (damaged ones are moved to `damaged/` when
training resumes, so orbax never sees them again); only when none is intact is the restore
refused. A checkpoint without the list (older versions, or a process killed between orbax's
commit and the list) is restored unverified, as before.
"""

import hashlib
import json
import os
import shutil
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from s4jax.errors import CheckpointDamagedError, CheckpointMismatchError

MANIFEST_NAME = "s4jax_sha256.json"
DAMAGED_DIRNAME = "damaged"
BEST_RECORD_NAME = "best_metric.json"
# What best/ holds: enough to evaluate or export, not to resume (no optimizer moments, which
# are half of an AdamW checkpoint).
_MODEL_FIELDS = ("step", "params", "batch_stats", "ema_params", "ema_batch_stats", "aux")
_CHUNK = 1 << 22


class _Damaged(Exception):
  """A checkpoint folder that cannot be restored; the message says why."""


def _abstract(tree):
  """ShapeDtypeStructs (with shardings) of a pytree of arrays: what orbax restores into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _path_name(path) -> str:
  """'params/backbone/conv1/kernel' for dict keys, dataclass fields and list indices alike."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)


def _flat_shapes(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_name(path): tuple(np.shape(leaf)) for path, leaf in flat}


def _model_only(state) -> dict:
  return {name: getattr(state, name) for name in _MODEL_FIELDS}


# ---- checksum lists ---------------------------------------------------------------------
def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _files_under(folder: str) -> list[str]:
  found = []
  for parent, _, names in os.walk(folder):
    for name in names:
      rel = os.path.relpath(os.path.join(parent, name), folder)
      if not rel.startswith(MANIFEST_NAME):  # the list itself and its temporary file
        found.append(rel)
  return sorted(found)


def write_manifest(step_dir: str) -> None:
  """Writes the size and sha256 of every file of a finished checkpoint, atomically."""
  files = {
    rel: {
      "size": os.path.getsize(os.path.join(step_dir, rel)),
      "sha256": _sha256(os.path.join(step_dir, rel)),
    }
    for rel in _files_under(step_dir)
  }
  path = os.path.join(step_dir, MANIFEST_NAME)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"files": files}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def damage(step_dir: str) -> str | None:
  """What is wrong with a checkpoint folder by its checksum list; None if it matches (or has
  no list to check against)."""
  path = os.path.join(step_dir, MANIFEST_NAME)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      files = json.load(f)["files"]
    expected = {rel: (int(v["size"]), str(v["sha256"])) for rel, v in files.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return f"its checksum list {MANIFEST_NAME} is unreadable"
  for rel, (size, sha) in sorted(expected.items()):
    full = os.path.join(step_dir, rel)
    if not os.path.isfile(full):
      return f"{rel} is missing"
    actual = os.path.getsize(full)
    if actual != size:
      return f"{rel} has {actual} bytes, {size} when it was saved"
    if _sha256(full) != sha:
      return f"{rel} is not what was saved (its sha256 differs)"
  return None


def has_manifest(step_dir: str) -> bool:
  return os.path.exists(os.path.join(step_dir, MANIFEST_NAME))


def _first_line(error: Exception, limit: int = 300) -> str:
  text = " ".join(str(error).split())
  text = text if len(text) <= limit else text[:limit] + " ..."
  return f"{type(error).__name__}: {text}"


class Checkpointer:
  """Saves and restores (state, data iterators) in `workdir`.

  `read_only=True` (evaluation, export) creates nothing and never moves a folder.
  """

  def __init__(
    self, workdir: str, *, keep: int, iterator_names=("labelled",), read_only: bool = False
  ):
    self.workdir = os.path.abspath(workdir)
    self.read_only = read_only
    self.is_writer = jax.process_index() == 0
    # Handlers named up front, so metadata can be read before a restore (shape checks).
    handlers = {"state": ocp.StandardCheckpointHandler()}
    for name in iterator_names:
      handlers[f"data_{name}"] = grain.checkpoint.CheckpointHandler()
    # cleanup_tmp_directories: a save cut short by `kill -9` leaves `<step>.orbax-checkpoint-tmp`
    # (a full checkpoint's size); the next start removes it.
    options = dict(
      create=not read_only, cleanup_tmp_directories=not read_only, enable_async_checkpointing=True
    )
    self._latest = ocp.CheckpointManager(
      os.path.join(self.workdir, "checkpoints"),
      item_handlers=handlers,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, **options),
    )
    self._best = ocp.CheckpointManager(
      os.path.join(self.workdir, "best"),
      item_handlers={"state": ocp.StandardCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(max_to_keep=1, **options),
    )
    self._best_record_path = os.path.join(self.workdir, "best", BEST_RECORD_NAME)
    # Steps saved by this process whose checksum list is not written yet, per manager.
    self._unsealed = {"latest": [], "best": []}
    # best_metric.json is written with the best checkpoint's checksum list, once the save is
    # complete: a record never names a best checkpoint that a crash lost.
    self._pending_record = None

  def _manager(self, which: str):
    return self._latest if which == "latest" else self._best

  @staticmethod
  def _step_dir(manager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))

  def _seal(self, which: str) -> None:
    """Waits for the manager's save in flight, then writes the checksum lists of its saves."""
    manager = self._manager(which)
    manager.wait_until_finished()
    steps, self._unsealed[which] = self._unsealed[which], []
    if self.is_writer:
      for step in steps:
        step_dir = self._step_dir(manager, step)
        if os.path.isdir(step_dir):  # keep_checkpoints may already have removed it
          write_manifest(step_dir)
    if which == "best" and self._pending_record is not None:
      if self.is_writer:
        tmp = self._best_record_path + ".tmp"
        with open(tmp, "w") as f:
          json.dump(self._pending_record, f)
        os.replace(tmp, self._best_record_path)
      self._pending_record = None

  # ---- latest ---------------------------------------------------------------------------
  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._latest.all_steps())

  def save(self, step: int, state, iterators: dict[str, Any]) -> None:
    self._seal("latest")
    items = {"state": ocp.args.StandardSave(state)}
    for name, iterator in iterators.items():
      items[f"data_{name}"] = grain.checkpoint.CheckpointSave(iterator)
    if self._latest.save(step, args=ocp.args.Composite(**items)):
      self._unsealed["latest"].append(step)

  def restore_latest(
    self, state_template, iterators: dict[str, Any], *, set_aside_damaged: bool = False
  ):
    """Restores the newest intact checkpoint into the template's shardings; None if there is
    none. The iterators are restored in place (they continue with the next unseen batch).

    Damaged checkpoints are skipped with a warning naming the file at fault (and moved to
    `damaged/` with `set_aside_damaged`); CheckpointDamagedError if every one is damaged.
    """
    damaged = []
    for step in sorted(self._latest.all_steps(), reverse=True):
      try:
        state = self._restore(self._latest, step, state_template, iterators)
      except _Damaged as e:
        damaged.append((step, str(e)))
        continue
      if damaged:
        self._report_damaged(
          self._latest,
          damaged,
          set_aside_damaged,
          f"restored step {step}, the newest intact checkpoint",
        )
      return state
    if damaged:
      where = str(self._latest.directory)
      listed = "; ".join(f"step {s}: {why}" for s, why in damaged)
      raise CheckpointDamagedError(
        f"No intact checkpoint in {where} ({listed}). Nothing was changed. Restore the "
        f"files from a copy, or move {where} away to start this run from step 0."
      )
    return None

  def restore_step(self, step: int, state_template):
    """The state of checkpoint `step` (no iterators); None if there is no such checkpoint."""
    if step not in self._latest.all_steps():
      return None
    try:
      return self._restore(self._latest, step, state_template, {})
    except _Damaged as e:
      raise CheckpointDamagedError(
        f"The checkpoint {self._step_dir(self._latest, step)} is damaged ({e}). Evaluate "
        "another one (--which=latest skips damaged checkpoints)."
      ) from None

  # ---- best -----------------------------------------------------------------------------
  def best_step(self) -> int | None:
    return self._best.latest_step()

  def best_record(self) -> dict | None:
    """{"step": ..., "metric": name, "value": ...} of the best checkpoint, if any."""
    if self._pending_record is not None:
      return dict(self._pending_record)
    if not os.path.exists(self._best_record_path):
      return None
    with open(self._best_record_path) as f:
      return json.load(f)

  def save_best(self, step: int, state, metric_name: str, value: float) -> bool:
    """Saves the model as the best if `value` beats the record; returns whether it did."""
    record = self.best_record()
    if record is not None and not value > record["value"]:
      return False
    self._seal("best")
    if step in self._best.all_steps():
      # A resumed run evaluating a step again: orbax does not write over a step.
      self._best.delete(step)
    self._best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_model_only(state))))
    self._unsealed["best"].append(step)
    self._pending_record = {"step": int(step), "metric": metric_name, "value": float(value)}
    return True

  def restore_best(self, state_template):
    """The best checkpoint's model in `state_template` (whose optimizer state is kept as it
    is: best/ has none); None if there is no best checkpoint."""
    step = self._best.latest_step()
    if step is None:
      return None
    try:
      return self._restore(self._best, step, state_template, {})
    except _Damaged as e:
      raise CheckpointDamagedError(
        f"The best checkpoint {self._step_dir(self._best, step)} is damaged ({e}). "
        "Evaluate another one: --which=latest or --which=STEP."
      ) from None

  def set_aside_damaged_best(self) -> None:
    """When resuming: a damaged best/ is moved to damaged/ and its record dropped, so the next
    evaluation saves a new best instead of comparing with a model that is gone."""
    step = self._best.latest_step()
    if step is None:
      return
    problem = damage(self._step_dir(self._best, step))
    if problem is None:
      return
    self._report_damaged(
      self._best, [(step, problem)], True, "the next evaluation saves a new best"
    )
    if self.is_writer and os.path.exists(self._best_record_path):
      os.remove(self._best_record_path)

  # ---- housekeeping ---------------------------------------------------------------------
  def _restore(self, manager, step, state_template, iterators):
    """Checks the folder (checksums, metadata, shapes), then restores it. _Damaged if the
    files are not what was saved or orbax cannot read them; CheckpointMismatchError if they
    are intact but hold another model."""
    step_dir = self._step_dir(manager, step)
    problem = damage(step_dir)
    if problem is not None:
      raise _Damaged(problem)
    try:
      metadata = manager.item_metadata(step)["state"]
    except Exception as e:  # pylint: disable=broad-except
      raise _Damaged(f"its metadata cannot be read ({_first_line(e)})") from None
    if metadata is None:
      raise _Damaged("its metadata (state/_METADATA) is missing")
    saved = _flat_shapes(_metadata_to_shapes(metadata))
    # best/ of older versions holds the whole state; of this one, the model only.
    model_only = manager is self._best and not any(k.startswith("opt_state") for k in saved)
    target = _model_only(state_template) if model_only else state_template
    self._check_fits(step_dir, saved, _flat_shapes(target))
    items = {"state": ocp.args.StandardRestore(_abstract(target))}
    for name, iterator in iterators.items():
      items[f"data_{name}"] = grain.checkpoint.CheckpointRestore(iterator)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**items))["state"]
    except Exception as e:  # pylint: disable=broad-except
      raise _Damaged(f"orbax cannot read it ({_first_line(e)})") from None
    if model_only:
      return state_template.replace(**restored)
    return restored

  def _report_damaged(self, manager, damaged, set_aside: bool, outcome: str) -> None:
    """Warns about each damaged checkpoint; moves them to damaged/ if `set_aside`."""
    moved_to = {}
    if set_aside and not self.read_only:
      target = os.path.join(self.workdir, DAMAGED_DIRNAME)
      stamp = time.strftime("%Y%m%d-%H%M%S")
      kind = os.path.basename(str(manager.directory))
      for step, _ in damaged:
        moved_to[step] = os.path.join(target, f"{kind}-{step}-{stamp}")
        if self.is_writer:
          os.makedirs(target, exist_ok=True)
          shutil.move(self._step_dir(manager, step), moved_to[step])
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices("s4jax: damaged checkpoints moved")
      manager.reload()
    for step, why in damaged:
      where = self._step_dir(manager, step)
      aside = f"; moved to {moved_to[step]}" if step in moved_to else ""
      logging.warning("Checkpoint %s is damaged (%s): skipped%s.", where, why, aside)
    logging.warning("Because of the damaged checkpoint(s) above: %s.", outcome)

  @staticmethod
  def _check_fits(where: str, saved: dict, expected: dict) -> None:
    """Compares array paths and shapes before restoring, to fail with a readable message."""
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    wrong = sorted(k for k in set(expected) & set(saved) if expected[k] != saved[k])
    if missing or extra or wrong:
      lines = []
      if missing:
        lines.append(
          f"  missing in the checkpoint: {', '.join(missing[:5])}"
          + (" ..." if len(missing) > 5 else "")
        )
      if extra:
        lines.append(
          f"  only in the checkpoint: {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else "")
        )
      for k in wrong[:5]:
        lines.append(f"  {k}: checkpoint shape {saved[k]}, model shape {expected[k]}")
      raise CheckpointMismatchError(
        f"The checkpoint at {where} was written by a different model than the config "
        "builds:\n" + "\n".join(lines) + "\nUse the config that wrote it, or another --workdir."
      )

  def wait(self) -> None:
    """Waits until every save is complete on disk, with its checksum list."""
    self._seal("latest")
    self._seal("best")

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._latest.close()
      self._best.close()


def _metadata_to_shapes(metadata):
  """orbax array metadata tree -> a tree of zero-size stand-ins carrying only shapes."""

  def to_leaf(m):
    shape = getattr(m, "shape", None)
    return _Shape(()) if shape is None else _Shape(tuple(shape))

  tree = metadata.tree if hasattr(metadata, "tree") else metadata
  return jax.tree.map(to_leaf, tree, is_leaf=lambda x: hasattr(x, "shape"))


class _Shape:
  """A leaf that `np.shape` reads as the recorded shape (np.shape looks at `.shape`)."""

  def __init__(self, shape):
    self.shape = shape
