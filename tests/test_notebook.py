"""The Colab quickstart runs from top to bottom (at CI size), and its .py twin is in sync."""

import os
import time

import jax
import jupytext
import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")
PAIRED = os.path.join(REPO, "notebooks", "quickstart.py")


def _cells(notebook):
  return [(c.cell_type, c.source.strip()) for c in notebook.cells]


def _seconds(cell):
  timing = cell.metadata.get("execution", {})
  try:
    begin = timing["iopub.execute_input"]
    end = timing["shell.execute_reply"]
  except KeyError:
    return float("nan")
  from datetime import datetime  # pylint: disable=g-import-not-at-top

  parse = lambda t: datetime.fromisoformat(t.replace("Z", "+00:00"))  # noqa: E731
  return (parse(end) - parse(begin)).total_seconds()


def test_ipynb_and_py_hold_the_same_cells():
  ipynb, py = jupytext.read(NOTEBOOK), jupytext.read(PAIRED)
  assert _cells(ipynb) == _cells(py), (
    "notebooks/quickstart.ipynb and quickstart.py differ: edit the .py and run "
    "`jupytext --sync notebooks/quickstart.py` (or `--to ipynb`)."
  )
  # Committed without outputs: the diff of a change shows code, not pictures.
  raw = nbformat.read(NOTEBOOK, as_version=4)
  assert all(not c.get("outputs") for c in raw.cells if c.cell_type == "code")


def test_notebook_executes_at_ci_size(tmp_path, monkeypatch):
  # The kernel inherits this environment: CI size, runs in a temporary folder, and one CPU
  # device as a Colab CPU runtime has (not the 8 simulated ones of the other tests).
  monkeypatch.setenv("S4JAX_NOTEBOOK_CI", "1")
  monkeypatch.setenv("S4JAX_NOTEBOOK_RUNS", str(tmp_path / "runs"))
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend
  # Initialising a network with JAX's default (threefry) random numbers compiles for tens of
  # seconds on a CPU, most of this test's time; the notebook's code paths do not depend on
  # which generator draws the initial weights.
  monkeypatch.setenv("JAX_DEFAULT_PRNG_IMPL", "unsafe_rbg")
  # The tests' persistent compilation cache (conftest.py), if any, serves the kernel too.
  cache = jax.config.jax_compilation_cache_dir
  if cache:
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", cache)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(
    notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}}
  )
  start = time.monotonic()
  client.execute()
  print(
    f"notebook executed in {time.monotonic() - start:.1f} s; per code cell: "
    + ", ".join(f"{_seconds(c):.1f}" for c in notebook.cells if c.cell_type == "code")
  )
  errors = [
    o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"
  ]
  assert not errors
  runs = tmp_path / "runs"
  for name in ("supervised", "unimatch"):
    assert (runs / name / "metrics.jsonl").exists()
    assert list((runs / name / "images").glob("predictions_*.png"))
  assert len(list((runs / "predicted" / "masks").glob("*.png"))) == 3
  figures = [
    o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})
  ]
  assert len(figures) == 3  # mIoU curves, prediction grids, overlays
