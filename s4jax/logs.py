"""Metric writers and console progress for training runs.

Only process 0 of a multi-host job should write: every other process builds its
`MetricWriter` with `enabled=False`, which turns every method into a no-op and
creates no files, so callers need no `if process_index == 0` around each call.

Outputs of an enabled writer, all under `workdir`:

* `metrics.jsonl`: one JSON object per `write_scalars` call and line,
  `{"step": step, **scalars}`. A resumed run calls `resume_from(step)` first:
  the rows of the killed segment past the restored checkpoint are dropped (the
  file is rewritten atomically), so the file holds one row per step and kind.
  Non-finite floats (NaN, +inf, -inf) are written as JSON `null`, because the
  `NaN`/`Infinity` tokens Python emits by default are not valid JSON and break
  other readers (jq, pandas with strict parsers, JavaScript).
* `tensorboard/`: TensorBoard event files written with tensorboardX, which
  needs no TensorFlow (`clu.metric_writers` would import it). After
  `resume_from(step)` the new event file purges the old files' events past
  `step` (tensorboardX `purge_step`), so the curves do not overlap.
* `images/`: PNG files, `{name with "/" -> "_"}_{step:07d}.png`.

Files are opened at the first write, so a writer that never writes (a failed
start, evaluation) leaves nothing behind.

`Progress` measures steps/s and the ETA for a one-line console summary;
`console_scalars` picks what that line shows.
"""

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from absl import logging as absl_logging
from PIL import Image

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tensorboard"
IMAGES_DIRNAME = "images"


def _to_python_scalar(name: str, value: Any) -> bool | int | float | None:
  """Converts a Python/numpy/JAX scalar to a plain JSON-safe Python value.

  Non-finite floats become None (written as JSON null).
  """
  if isinstance(value, (bool, int)):  # bool first: it is an int subclass.
    return value
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  # numpy scalars, 0-d / size-1 numpy arrays and JAX arrays all expose
  # `.item()`; going through np.asarray also pulls JAX arrays to the host.
  try:
    array = np.asarray(value)
  except Exception as e:  # pylint: disable=broad-except
    raise TypeError(f"Metric {name!r}: cannot convert {type(value)} to a scalar") from e
  if array.size != 1:
    raise ValueError(f"Metric {name!r} must be a scalar, got shape {array.shape}")
  item = array.item()
  if isinstance(item, (bool, int)):
    return item
  if isinstance(item, float):
    return item if math.isfinite(item) else None
  raise TypeError(f"Metric {name!r}: unsupported scalar type {type(item)}")


def _image_filename(name: str, step: int) -> str:
  # Names are usually TensorBoard tags like "val/predictions"; flatten them so
  # every image lands directly in images/.
  safe = name.replace("/", "_").replace(os.sep, "_")
  return f"{safe}_{step:07d}.png"


def _as_uint8_rgb(name: str, image: Any) -> np.ndarray:
  array = np.asarray(image)
  if array.dtype != np.uint8:
    raise TypeError(f"Image {name!r} must be uint8, got {array.dtype}")
  if array.ndim == 2:
    array = np.repeat(array[:, :, None], 3, axis=2)
  if array.ndim != 3 or array.shape[2] != 3:
    raise ValueError(f"Image {name!r} must be [H, W, 3] (or [H, W]), got {array.shape}")
  return array


class MetricWriter:
  """Writes scalars to JSONL and TensorBoard, images to PNG and TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    """A writer for `workdir`; its files are opened at the first write.

    Args:
      workdir: Run directory; created at the first write if missing.
      enabled: False on processes other than 0: every method is then a no-op
        and nothing is created on disk.
    """
    self.workdir = workdir
    self.enabled = enabled
    self.metrics_path = os.path.join(workdir, METRICS_FILENAME)
    self.tensorboard_dir = os.path.join(workdir, TENSORBOARD_DIRNAME)
    self.images_dir = os.path.join(workdir, IMAGES_DIRNAME)
    self._jsonl = None
    self._tb = None
    self._purge_step = None

  def resume_from(self, step: int) -> None:
    """Forgets what was logged past `step`, the step the run resumes from (0: a fresh start).

    Rewrites metrics.jsonl without its rows past `step` (atomically: a kill leaves the old
    or the new file) and makes the next TensorBoard event file purge the events past `step`.
    Call before the first write.
    """
    if not self.enabled:
      return
    step = int(step)
    if os.path.exists(self.metrics_path):
      kept, dropped = [], 0
      with open(self.metrics_path, encoding="utf-8") as f:
        for line in f:
          record = _parse_line(line)
          if record is None:
            continue  # blank, or a line cut short by a kill
          if isinstance(record.get("step"), int) and record["step"] > step:
            dropped += 1
            continue
          kept.append(line.rstrip("\n") + "\n")
      if dropped or len(kept) != _count_lines(self.metrics_path):
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
          f.writelines(kept)
        os.replace(tmp, self.metrics_path)
    if os.path.isdir(self.tensorboard_dir) and os.listdir(self.tensorboard_dir):
      self._purge_step = step + 1

  def _open(self) -> None:
    if self._jsonl is not None:
      return
    os.makedirs(self.workdir, exist_ok=True)
    # A run killed mid-write can leave a last line without its newline; start
    # the resumed run on a fresh line so that line stays the only bad one.
    needs_newline = False
    if os.path.exists(self.metrics_path) and os.path.getsize(self.metrics_path) > 0:
      with open(self.metrics_path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        needs_newline = f.read(1) != b"\n"
    self._jsonl = open(self.metrics_path, "a", encoding="utf-8")
    if needs_newline:
      self._jsonl.write("\n")
      self._jsonl.flush()
    # Imported lazily so disabled writers (and modules that only need
    # `Progress`) don't pay for it.
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    # The pid in the name: a writer reopened within the same second (the name's timestamp)
    # writes a file of its own, not into the previous one.
    self._tb = SummaryWriter(
      logdir=self.tensorboard_dir,
      purge_step=self._purge_step,
      filename_suffix=f".{os.getpid()}.{id(self)}",
    )

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Appends one JSON line `{"step": step, **scalars}` and logs each to TB.

    Values may be Python, numpy or JAX scalars. NaN and +-inf are stored as
    JSON null (and passed to TensorBoard as the float they are).
    """
    if not self.enabled:
      return
    if "step" in scalars:
      raise ValueError('"step" is reserved for the step number in metrics.jsonl')
    self._open()
    step = int(step)
    record: dict[str, Any] = {"step": step}
    for name, value in scalars.items():
      record[name] = _to_python_scalar(name, value)
    # allow_nan=False: a non-finite value slipping through is a bug here, not
    # something to write silently as invalid JSON.
    self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    # Flush every line so `tail -f metrics.jsonl` and crash post-mortems see it.
    self._jsonl.flush()
    for name, value in scalars.items():
      converted = record[name]
      # TensorBoard shows NaN/inf fine, so give it the real value, not null.
      tb_value = float(np.asarray(value)) if converted is None else float(converted)
      self._tb.add_scalar(name, tb_value, global_step=step)

  def write_images(self, step: int, images: Mapping[str, Any]) -> list[str]:
    """Saves each uint8 [H, W, 3] image as PNG and to TensorBoard.

    Returns:
      The PNG paths, in the order of `images` (empty when disabled).
    """
    if not self.enabled:
      return []
    self._open()
    step = int(step)
    os.makedirs(self.images_dir, exist_ok=True)
    paths = []
    for name, image in images.items():
      array = _as_uint8_rgb(name, image)
      path = os.path.join(self.images_dir, _image_filename(name, step))
      Image.fromarray(array).save(path)
      self._tb.add_image(name, array, global_step=step, dataformats="HWC")
      paths.append(path)
    return paths

  def write_text(self, step: int, name: str, text: str) -> None:
    """Logs text to TensorBoard only (e.g. the config at step 0)."""
    if not self.enabled:
      return
    self._open()
    self._tb.add_text(name, str(text), global_step=int(step))

  def flush(self) -> None:
    if not self.enabled:
      return
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes everything; safe to call more than once."""
    if not self.enabled:
      return
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _parse_line(line: str) -> dict | None:
  line = line.strip()
  if not line:
    return None
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return None
  return record if isinstance(record, dict) else None


def _count_lines(path: str) -> int:
  with open(path, encoding="utf-8") as f:
    return sum(1 for _ in f)


def latest_segment(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The rows a run would have written without interruptions.

  Files written before `resume_from` existed keep the rows of a killed segment: a resumed
  run starts again at a step already logged. A row at a step below the latest one seen, or
  at that step with a key already logged there, starts a new segment, which replaces every
  earlier row from its step on.
  """
  kept: list[dict[str, Any]] = []
  last, keys_at_last = None, set()
  for record in records:
    step = record.get("step")
    if isinstance(step, int):
      keys = set(record) - {"step"}
      if last is not None and (step < last or (step == last and keys & keys_at_last)):
        kept = [r for r in kept if not (isinstance(r.get("step"), int) and r["step"] >= step)]
        last = None
      if last is None or step > last:
        last, keys_at_last = step, keys
      else:
        keys_at_last |= keys
    kept.append(record)
  return kept


def read_metrics(path: str) -> list[dict[str, Any]]:
  """Parses a metrics.jsonl file into a list of dicts, in file order.

  Blank lines are skipped, and so are lines that fail to parse, which only
  happens to a line cut short by a killed run (the writer starts the next run
  on a fresh line). Non-finite values read back as None. Rows of a segment that
  a resumed run replaced (files of older versions) are left out: see
  `latest_segment`.
  """
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      record = _parse_line(line)
      if record is not None:
        records.append(record)
  return latest_segment(records)


def format_duration(seconds: float) -> str:
  """Short human duration: "12s", "4m33s", "1h02m", "2d03h"; "?" if unknown."""
  if seconds is None or not math.isfinite(seconds):
    return "?"
  total = max(0, int(round(seconds)))
  if total < 60:
    return f"{total}s"
  minutes, secs = divmod(total, 60)
  if minutes < 60:
    return f"{minutes}m{secs:02d}s"
  hours, minutes = divmod(minutes, 60)
  if hours < 24:
    return f"{hours}h{minutes:02d}m"
  days, hours = divmod(hours, 24)
  return f"{days}d{hours:02d}h"


def _format_value(value: Any) -> str:
  try:
    return f"{float(np.asarray(value)):.4g}"
  except (TypeError, ValueError):
    return str(value)


class Progress:
  """Tracks steps/s and ETA for the console line.

  The first `update` only records a reference point: the first steps of a run
  include XLA compilation and would make the rate meaningless. Each later
  `update` measures the rate over the steps since the previous update, so the
  number follows the current speed (e.g. after an evaluation pause it recovers
  at the next report) instead of averaging over the whole run.
  """

  def __init__(
    self,
    total_steps: int,
    start_step: int = 0,
    clock: Callable[[], float] = time.monotonic,
  ):
    self.total_steps = int(total_steps)
    self.start_step = int(start_step)
    self._clock = clock
    self._last_step: int | None = None
    self._last_time: float | None = None
    self.steps_per_sec: float | None = None
    self.eta_seconds: float | None = None

  def update(self, step: int) -> dict[str, float | None]:
    """Records that `step` was reached now; returns the rate and ETA.

    Returns:
      {"steps_per_sec": float | None, "eta_seconds": float | None}; both None
      until a second update with progress and elapsed time.
    """
    step = int(step)
    now = self._clock()
    if self._last_step is not None:
      elapsed = now - self._last_time
      done = step - self._last_step
      # Keep the previous measurement when there's nothing to measure (same
      # step reported twice, or a clock that did not advance).
      if elapsed > 0 and done > 0:
        self.steps_per_sec = done / elapsed
        remaining = max(0, self.total_steps - step)
        self.eta_seconds = remaining / self.steps_per_sec
    self._last_step = step
    self._last_time = now
    return {"steps_per_sec": self.steps_per_sec, "eta_seconds": self.eta_seconds}

  def format_line(self, step: int, scalars: Mapping[str, Any], lr: float | None = None) -> str:
    """Formats one console line with the rate from the latest `update`.

    Example: "step   120/1000 | loss_sup 0.8123 | lr 9.1e-03 | 3.21 steps/s | ETA 4m33s".
    Metric names drop a leading "train/" and are sorted; values get 4
    significant digits. Rate and ETA are left out until they are known.
    """
    width = len(str(self.total_steps))
    parts = [f"step {int(step):>{width}d}/{self.total_steps}"]
    shown = {}
    for name, value in scalars.items():
      short = name[len("train/") :] if name.startswith("train/") else name
      shown[short] = value
    shown.pop("steps_per_sec", None)  # The rate gets its own field below.
    if lr is not None:
      shown.pop("lr", None)  # The explicit lr gets its own field below.
    for name in sorted(shown):
      parts.append(f"{name} {_format_value(shown[name])}")
    if lr is not None:
      parts.append(f"lr {float(lr):.1e}")
    if self.steps_per_sec is not None:
      rate = self.steps_per_sec
      rate_text = f"{rate:.2f}" if rate >= 1 else f"{rate:.3g}"
      parts.append(f"{rate_text} steps/s")
    if self.eta_seconds is not None:
      parts.append(f"ETA {format_duration(self.eta_seconds)}")
    return " | ".join(parts)


def console_scalars(scalars: Mapping[str, Any]) -> dict[str, Any]:
  """What the console line shows of a step's metrics: the total loss and the method's main
  losses (`train/loss`, `train/loss_*`). Everything else (diagnostics, objectives' parts,
  grad norm, epoch) is in metrics.jsonl and TensorBoard; a UniMatch line with all of them
  was 400 characters long."""
  return {
    name: value
    for name, value in scalars.items()
    if name == "train/loss" or (name.startswith("train/loss_") and name.count("/") == 1)
  }


class ConsoleFormatter(logging.Formatter):
  """`HH:MM:SS message` for INFO, `HH:MM:SS warning: message` above: the console is read by
  a person, who needs neither the thread id nor the file and line (absl's 50-character
  prefix)."""

  def format(self, record: logging.LogRecord) -> str:
    text = f"{self.formatTime(record, '%H:%M:%S')} "
    if record.levelno >= logging.WARNING:
      text += f"{record.levelname.lower()}: "
    text += record.getMessage()
    if record.exc_info:
      text += "\n" + self.formatException(record.exc_info)
    return text


# Library loggers whose routine records are not for the person at the console: jax's
# "Unable to initialize backend 'tpu'" on every CPU/GPU start, and tensorboardX's warning for
# every NaN scalar (the IoU of a class absent from a validation set).
_QUIET_LOGGERS = {
  "jax._src.xla_bridge": logging.WARNING,
  "tensorboardX.x2num": logging.ERROR,
}


class _LibraryInfoFilter(logging.Filter):
  """Drops INFO records of orbax and grain: a dozen lines per checkpoint drown the progress
  (and export_backbone's one line of output)."""

  _QUIET = (f"{os.sep}orbax{os.sep}", f"{os.sep}grain{os.sep}")

  def filter(self, record):
    if record.levelno <= logging.INFO and any(q in record.pathname for q in self._QUIET):
      return False
    return True


def set_up_console() -> None:
  """INFO and above on stderr as `HH:MM:SS message`, without the libraries' routine records.
  Every command-line entry point (main, predict, export, export_backbone) calls it first."""
  for name, level in _QUIET_LOGGERS.items():
    logging.getLogger(name).setLevel(level)
  absl_logging.set_verbosity(absl_logging.INFO)
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(_LibraryInfoFilter())
  handler.setFormatter(ConsoleFormatter())
