"""Checkpoints: the only module that imports orbax.

Two managers under the workdir:
  checkpoints/  the last `keep` train checkpoints: state + every data iterator's state, so a
                restarted run continues with exactly the next batch;
  best/         the state with the best evaluation metric so far (no iterator state).
Saves are asynchronous: `save` returns once the arrays are copied off the devices.
"""

import json
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from s4jax.errors import CheckpointMismatchError


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


class Checkpointer:
  """Saves and restores (state, data iterators) in `workdir`."""

  def __init__(self, workdir: str, *, keep: int, iterator_names=("labelled",)):
    self.workdir = os.path.abspath(workdir)
    # Handlers named up front, so metadata can be read before a restore (shape checks).
    handlers = {"state": ocp.StandardCheckpointHandler()}
    for name in iterator_names:
      handlers[f"data_{name}"] = grain.checkpoint.CheckpointHandler()
    self._latest = ocp.CheckpointManager(
        os.path.join(self.workdir, "checkpoints"),
        item_handlers=handlers,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True))
    self._best = ocp.CheckpointManager(
        os.path.join(self.workdir, "best"),
        item_handlers={"state": ocp.StandardCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=True))
    self._best_record_path = os.path.join(self.workdir, "best", "best_metric.json")

  # ---- latest ---------------------------------------------------------------------------
  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def save(self, step: int, state, iterators: dict[str, Any]) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    for name, iterator in iterators.items():
      items[f"data_{name}"] = grain.checkpoint.CheckpointSave(iterator)
    self._latest.save(step, args=ocp.args.Composite(**items))

  def restore_latest(self, state_template, iterators: dict[str, Any]):
    """Restores the newest checkpoint into the template's shardings; None if there is none.

    The iterators are restored in place (they continue with the next unseen batch).
    """
    step = self._latest.latest_step()
    if step is None:
      return None
    self._check_fits(self._latest, step, state_template)
    items = {"state": ocp.args.StandardRestore(_abstract(state_template))}
    for name, iterator in iterators.items():
      items[f"data_{name}"] = grain.checkpoint.CheckpointRestore(iterator)
    restored = self._latest.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  # ---- best -----------------------------------------------------------------------------
  def best_record(self) -> dict | None:
    """{"step": ..., "metric": name, "value": ...} of the best checkpoint, if any."""
    if not os.path.exists(self._best_record_path):
      return None
    with open(self._best_record_path) as f:
      return json.load(f)

  def save_best(self, step: int, state, metric_name: str, value: float) -> bool:
    """Saves `state` as the best if `value` beats the record; returns whether it did."""
    record = self.best_record()
    if record is not None and not value > record["value"]:
      return False
    self._best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(self._best_record_path), exist_ok=True)
      tmp = self._best_record_path + ".tmp"
      with open(tmp, "w") as f:
        json.dump({"step": int(step), "metric": metric_name, "value": float(value)}, f)
      os.replace(tmp, self._best_record_path)
    return True

  def restore_best(self, state_template):
    step = self._best.latest_step()
    if step is None:
      return None
    self._check_fits(self._best, step, state_template)
    restored = self._best.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(state_template))))
    return restored["state"]

  # ---- housekeeping ---------------------------------------------------------------------
  def _check_fits(self, manager, step, state_template) -> None:
    """Compares array paths and shapes before restoring, to fail with a readable message."""
    where = os.path.join(str(manager.directory), str(step))
    try:
      metadata = manager.item_metadata(step)["state"]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointMismatchError(
          f"Cannot read the checkpoint at {where} ({type(e).__name__}: {e}). Move it away or "
          "use another --workdir.") from e
    saved = _flat_shapes(_metadata_to_shapes(metadata))
    expected = _flat_shapes(state_template)
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    wrong = sorted(k for k in set(expected) & set(saved) if expected[k] != saved[k])
    if missing or extra or wrong:
      lines = []
      if missing:
        lines.append(f"  missing in the checkpoint: {', '.join(missing[:5])}"
                     + (" ..." if len(missing) > 5 else ""))
      if extra:
        lines.append(f"  only in the checkpoint: {', '.join(extra[:5])}"
                     + (" ..." if len(extra) > 5 else ""))
      for k in wrong[:5]:
        lines.append(f"  {k}: checkpoint shape {saved[k]}, model shape {expected[k]}")
      raise CheckpointMismatchError(
          f"The checkpoint at {where} was written by a different model than the config "
          "builds:\n" + "\n".join(lines) + "\nUse the config that wrote it, or another --workdir.")

  def wait(self) -> None:
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
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
