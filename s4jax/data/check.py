"""`data.check_files`: decode every example of a run's datasets once, before training.

Without it a bad file is met when its example is first read, which on VOC or Cityscapes can
be hours into a run. Each process checks its share of the examples (in threads: PIL releases
the GIL while decoding) and the processes agree on the outcome, so every one of them stops
together with the same error.
"""

import concurrent.futures
import os
import time

import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from s4jax.data import files
from s4jax.errors import DataError

_REPORT_SECONDS = 10.0
_SHOWN = 10


def _reason(error: DataError) -> str:
  """The error without its advice (given once, below the list)."""
  advice = files._WHAT_TO_DO  # pylint: disable=protected-access
  return " ".join(str(error).replace(advice, "").split())


def check_sources(
  named_sources, *, on_bad_example: str, process_index: int = 0, process_count: int = 1
) -> int:
  """Reads every example of each (name, source); returns the number of bad ones found.

  With on_bad_example="stop" a bad example is a DataError listing the first ones; with
  "skip" they are only counted (the sources record them and skip them when training).
  """
  plan = [
    (name, source, index)
    for name, source in named_sources
    for index in range(process_index, len(source), process_count)
  ]
  total = sum(len(source) for _, source in named_sources)
  logging.info(
    "data.check_files: decoding the %d examples of %s once before training.",
    total,
    " and ".join(name for name, _ in named_sources),
  )

  def read(item):
    name, source, index = item
    try:
      source[index]
    except DataError as e:
      return f"{name} example {index}: {_reason(e)}"
    return None

  bad = []
  start = last_report = time.monotonic()
  workers = min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for done, problem in enumerate(pool.map(read, plan), start=1):
      if problem is not None:
        bad.append(problem)
      now = time.monotonic()
      if now - last_report >= _REPORT_SECONDS and done < len(plan):
        last_report = now
        rate = done / (now - start)
        logging.info(
          "data.check_files: %d/%d (%d%%), %d bad so far, ETA %.0fs",
          done,
          len(plan),
          100 * done // len(plan),
          len(bad),
          (len(plan) - done) / rate,
        )
  counts = np.asarray([len(bad)], np.int32)
  if process_count > 1:
    counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1)
  found = int(counts.sum())
  logging.info(
    "data.check_files: %d examples read in %.0fs, %d bad.",
    len(plan),
    time.monotonic() - start,
    found,
  )
  if found and on_bad_example == "stop":
    shown = "\n  ".join(bad[:_SHOWN]) if bad else "(found by other processes; see their logs)"
    more = f"\n  ... and {len(bad) - _SHOWN} more on this process" if len(bad) > _SHOWN else ""
    raise DataError(
      f"data.check_files: {found} of {total} examples cannot be read:\n  {shown}{more}\n"
      "Fix or remove those files, or set --config.data.on_bad_example=skip to train "
      "without them."
    )
  return found
