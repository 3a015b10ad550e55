"""Nothing lost on any exit: signals, errors mid-save, damaged checkpoints, resumed logs, and
one clear message for bad input (issue 18)."""

import glob
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from s4jax import checkpointing
from s4jax import config_schema
from s4jax import errors
from s4jax import logs
from s4jax import step as step_lib
from s4jax import train
from s4jax import workdir as workdir_lib
from tiny import tiny_config
import fake_datasets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "shapes_supervised.py")
TOTAL = 20
# The command the signal test runs (and runs again); the in-process runs use the same config.
COMMAND = [
  f"--config={CONFIG}",
  f"--config.total_steps={TOTAL}",
  "--config.log_every=1",
  f"--config.eval_every={TOTAL}",
  "--config.checkpoint_every=10",
  "--config.model.width=8",
  "--config.model.aspp_channels=16",
  "--config.model.decoder_channels=16",
  "--config.data.crop_size=32",
  "--config.data.image_size=48",
  "--config.data.num_train=32",
  "--config.data.num_val=8",
  "--config.eval.batch_size=8",
  "--config.num_visualised=0",
]


def _command_config(**overrides):
  """COMMAND's config, built here as config_flags builds it in the subprocess."""
  config = config_schema.sibling_config(CONFIG, os.path.basename(CONFIG))
  pairs = [a[len("--config.") :].split("=", 1) for a in COMMAND if a.startswith("--config.")]
  for key, value in pairs + list(overrides.items()):
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = type(node[leaf])(value)
  return config


def _compiled_key(config):
  """What a compiled step depends on: the config without the keys that only change how a run
  is watched (and without the size of the validation set)."""
  flatten = workdir_lib._flatten  # pylint: disable=protected-access
  flat = flatten(workdir_lib.config_as_dict(config))
  return json.dumps(
    {
      k: v
      for k, v in flat.items()
      if k not in config_schema.OPERATIONAL_KEYS and k != "data.num_val"
    },
    sort_keys=True,
  )


@pytest.fixture(scope="module", autouse=True)
def shared_compiles():
  """The compiled functions of this file's runs shared between runs of the same config: the
  runs differ in what happens around the steps (signals, errors, damaged files), not in the
  steps, and each compile costs more than the steps of a test."""
  real_initial_state = train.Run.initial_state
  compiled, states = {}, {}

  def shared(make):
    def wrapper(model, *args, **kwargs):
      # The optimizer and the mesh are left out: both follow from the config here.
      key = (
        (make.__name__, repr(model))
        + tuple(
          _compiled_key(a) if hasattr(a, "to_dict") else repr(a)
          for a in args
          if hasattr(a, "to_dict") or type(a) in (int, str, tuple)
        )
        + tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
      )
      if key not in compiled:
        compiled[key] = make(model, *args, **kwargs)
      return compiled[key]

    return wrapper

  def initial_state(run):
    key = _compiled_key(run.config)
    if key not in states:
      states[key] = real_initial_state(run)
    return jax.tree.map(lambda x: x.copy(), states[key])  # the train step donates its input

  with pytest.MonkeyPatch.context() as patch:
    for name in ("make_train_step", "make_eval_step", "make_predict_fn"):
      patch.setattr(step_lib, name, shared(getattr(step_lib, name)))
    patch.setattr(train.Run, "initial_state", initial_state)
    yield


def _train_rows(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        pass  # the line being written
  return [r for r in rows if "train/loss" in r]


def _assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The uninterrupted run of COMMAND: checkpoints at 10 and 20, best at 20."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  return workdir, train.train_and_evaluate(_command_config(), workdir)


# ---- signals ----------------------------------------------------------------------------
def _signal_when_logged(process, workdir, min_step, signum, timeout=300):
  """Sends `signum` once metrics.jsonl shows step `min_step`; returns (last step logged
  then, exit status, stderr)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process.poll() is not None:
      pytest.fail(f"the run ended before the signal:\n{process.stderr.read()[-3000:]}")
    steps = [r["step"] for r in _train_rows(workdir)]
    if steps and steps[-1] >= min_step:
      process.send_signal(signum)
      _, stderr = process.communicate(timeout=timeout)
      return steps[-1], process.returncode, stderr
    time.sleep(0.02)
  process.kill()
  pytest.fail("the run logged no step in time")


def _saved_step(stderr, name):
  last = stderr.strip().splitlines()[-1]
  prefix = f"s4jax: stopped by {name}: saved step "
  assert last.startswith(prefix) and last.endswith(
    f" of {TOTAL}; rerun the same command to continue."
  ), stderr[-2000:]
  return int(last[len(prefix) :].split()[0])


def test_sigterm_then_sigint_then_same_command_equals_straight_run(straight, tmp_path, caplog):
  workdir = str(tmp_path / "run")
  command = [sys.executable, "-m", "s4jax.main", *COMMAND, f"--workdir={workdir}"]
  # The subprocesses keep conftest's 8 simulated devices: XLA's numbers depend on the host's
  # device count (not only the mesh's), and the comparison below is bit for bit. The second
  # one loads the first one's compiled steps from a compilation cache (a minute less here).
  env = dict(
    os.environ,
    JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
  )
  start = lambda: subprocess.Popen(
    command,
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,  # noqa: E731
    stderr=subprocess.PIPE,
    text=True,
  )
  logged, status, stderr = _signal_when_logged(start(), workdir, 2, signal.SIGTERM)
  assert status == 143 and "Traceback" not in stderr, stderr[-3000:]
  first = _saved_step(stderr, "SIGTERM")
  assert first >= logged  # no step done before the signal is lost
  assert os.path.isfile(
    os.path.join(workdir, "checkpoints", str(first), checkpointing.MANIFEST_NAME)
  )

  logged, status, stderr = _signal_when_logged(start(), workdir, first + 2, signal.SIGINT)
  assert status == 130 and "Traceback" not in stderr, stderr[-3000:]
  assert f"Resuming {workdir} from step {first}." in stderr
  second = _saved_step(stderr, "SIGINT")
  assert second >= logged > first
  assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))

  # The newest checkpoint garbled on disk: named, moved aside, the one before it restored.
  garbled = _largest_file(os.path.join(workdir, "checkpoints", str(second), "state"))
  _garble(garbled)
  older = max(s for s in map(int, os.listdir(os.path.join(workdir, "checkpoints"))) if s < second)
  # The same run, continued here: the same parameters as the run never interrupted.
  with caplog.at_level(logging.WARNING):
    results = train.train_and_evaluate(_command_config(), workdir)
  warning = "\n".join(r.getMessage() for r in caplog.records)
  assert os.path.relpath(garbled, os.path.join(workdir, "checkpoints", str(second))) in warning
  assert f"restored step {older}, the newest intact checkpoint" in warning
  moved = os.listdir(os.path.join(workdir, checkpointing.DAMAGED_DIRNAME))
  assert len(moved) == 1 and moved[0].startswith(f"checkpoints-{second}-")
  assert int(results["state"].step) == TOTAL
  _assert_same_params(results["state"].params, straight[1]["state"].params)
  _assert_same_params(results["state"].ema_params, straight[1]["state"].ema_params)
  # One metrics row per step, although three segments ran past the step they resumed from.
  assert [r["step"] for r in _train_rows(workdir)] == list(range(1, TOTAL + 1))


def test_signal_in_process_saves_the_step_it_finished(tmp_path, monkeypatch):
  """The handler itself: SIGTERM while step 3 runs saves step 3 (no checkpoint is due) and
  no more, waits for the save, restores the previous handlers."""
  real_next_batch = train.Run.next_batch
  calls = []

  def next_batch(run):
    calls.append(1)
    if len(calls) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_next_batch(run)

  monkeypatch.setattr(train.Run, "next_batch", next_batch)
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(errors.Stopped, match=f"stopped by SIGTERM: saved step 3 of {TOTAL}") as info:
    train.train_and_evaluate(_command_config(), str(tmp_path))
  assert info.value.exit_code == 143
  assert signal.getsignal(signal.SIGTERM) is before
  step_dir = tmp_path / "checkpoints" / "3"
  assert checkpointing.damage(str(step_dir)) is None
  assert (step_dir / checkpointing.MANIFEST_NAME).is_file()
  assert len(calls) == 3  # no batch drawn past the step saved


# ---- errors mid-save --------------------------------------------------------------------
def test_error_mid_save_leaves_complete_checkpoints(tmp_path, monkeypatch):
  """A bad file met right after a checkpoint was handed to orbax: the error reaches the
  caller only once that save is complete on disk, with its checksum list."""
  config = _command_config(checkpoint_every=2, log_every=2)
  real_next_batch = train.Run.next_batch
  calls = []

  def next_batch(run):
    calls.append(1)
    if len(calls) == 5:
      raise errors.DataError("Cannot decode image /data/bad.jpg (truncated).")
    return real_next_batch(run)

  monkeypatch.setattr(train.Run, "next_batch", next_batch)
  with pytest.raises(errors.DataError, match="bad.jpg"):
    train.train_and_evaluate(config, str(tmp_path))
  checkpoints = tmp_path / "checkpoints"
  assert sorted(os.listdir(checkpoints)) == ["2", "4"]  # no *.orbax-checkpoint-tmp
  for step in ("2", "4"):
    assert (checkpoints / step / checkpointing.MANIFEST_NAME).is_file()
    assert checkpointing.damage(str(checkpoints / step)) is None


# ---- damaged checkpoints ----------------------------------------------------------------
def _largest_file(folder):
  files = [
    p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if os.path.isfile(p)
  ]
  return max(files, key=os.path.getsize)


def _garble(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


def test_damaged_checkpoints_are_named_and_skipped(straight, tmp_path, caplog):
  workdir = str(tmp_path / "run")
  shutil.copytree(straight[0], workdir)
  run = train.Run(_command_config(), workdir, training=False)
  template = run.initial_state()
  latest = os.path.join(workdir, "checkpoints", "20")

  def restored_step():
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      state = run.checkpointer.restore_latest(template, {})
    return int(state.step), "\n".join(r.getMessage() for r in caplog.records)

  assert restored_step() == (20, "")
  # A deleted data file, then a deleted _METADATA: named, and the older checkpoint restored.
  victim = _largest_file(os.path.join(latest, "state"))
  saved = open(victim, "rb").read()
  os.remove(victim)
  step, warning = restored_step()
  assert step == 10 and f"{os.path.relpath(victim, latest)} is missing" in warning
  open(victim, "wb").write(saved)
  os.rename(os.path.join(latest, "state", "_METADATA"), os.path.join(latest, "meta.bak"))
  step, warning = restored_step()
  assert step == 10 and "state/_METADATA is missing" in warning
  # Without its checksum list (a checkpoint of an older version) too: orbax finds no metadata.
  os.remove(os.path.join(latest, checkpointing.MANIFEST_NAME))
  step, warning = restored_step()
  assert step == 10 and "metadata" in warning
  # Every checkpoint damaged: refused, naming each, nothing changed.
  _garble(_largest_file(os.path.join(workdir, "checkpoints", "10", "state")))
  with pytest.raises(
    errors.CheckpointDamagedError,
    match=r"No intact checkpoint(.|\n)*step "
    r"20: (.|\n)*step 10: .*sha256",
  ):
    run.checkpointer.restore_latest(template, {})
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]
  # best/ is checked too.
  _garble(_largest_file(os.path.join(workdir, "best")))
  with pytest.raises(errors.CheckpointDamagedError, match="best checkpoint.*--which=latest"):
    run.restore_saved("best")
  run.close()


# ---- logs after a resume ----------------------------------------------------------------
def _events(path):
  """(step, has a SessionLog START) of every event in a TensorBoard event file."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  found = []
  with open(path, "rb") as f:
    while header := f.read(12):
      (length,) = struct.unpack("<Q", header[:8])
      event = event_pb2.Event.FromString(f.read(length))
      f.read(4)
      found.append((event.step, event.session_log.status == event_pb2.SessionLog.START))
  return found


def test_resume_drops_logged_rows_past_the_restored_step(tmp_path):
  workdir = str(tmp_path)
  with logs.MetricWriter(workdir) as writer:
    for step in range(1, 28):
      writer.write_scalars(step, {"train/loss": float(step)})
    writer.write_scalars(20, {"eval/teacher_miou": 0.5})
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 28, "train/lo')  # the line being written when the run was killed
  first_events = glob.glob(os.path.join(workdir, "tensorboard", "*"))
  writer = logs.MetricWriter(workdir)
  writer.resume_from(20)  # the checkpoint the run resumes from
  writer.write_scalars(21, {"train/loss": 21.5})
  writer.close()
  rows = logs.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows] == list(range(1, 21)) + [20, 21]
  assert rows[-1]["train/loss"] == 21.5
  # The new event file tells TensorBoard to drop the old file's events from step 21 on.
  second = [
    p for p in glob.glob(os.path.join(workdir, "tensorboard", "*")) if p not in first_events
  ]
  assert len(second) == 1 and (21, True) in _events(second[0])


def test_old_metrics_files_read_one_row_per_step(tmp_path):
  """Files of older versions kept the killed segment: readers (ablate, plots) skip it."""
  path = tmp_path / "metrics.jsonl"
  rows = (
    [{"step": s, "train/loss": 1.0} for s in range(1, 21)]
    + [{"step": 20, "eval/teacher_miou": 0.1, "eval/student_miou": 0.1}]
    + [{"step": s, "train/loss": 1.0} for s in range(21, 28)]  # killed at 27
    + [{"step": s, "train/loss": 2.0} for s in range(21, 31)]  # resumed from 20
    + [{"step": 30, "eval/teacher_miou": 0.3, "eval/student_miou": 0.3}]
  )
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  read = logs.read_metrics(str(path))
  assert [r["step"] for r in read if "train/loss" in r] == list(range(1, 31))
  assert all(r["train/loss"] == 2.0 for r in read if r["step"] > 20 and "train/loss" in r)
  assert [r["step"] for r in read if "eval/teacher_miou" in r] == [20, 30]
  # A segment killed one step past its checkpoint and resumed there repeats that step.
  again = [
    {"step": 1, "train/loss": 1.0},
    {"step": 2, "train/loss": 1.0},
    {"step": 2, "train/loss": 2.0},
    {"step": 3, "train/loss": 2.0},
  ]
  assert [r["train/loss"] for r in logs.latest_segment(again)] == [1.0, 2.0, 2.0]
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  try:
    import ablate  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  summary = ablate.summarise_run(ablate.read_metrics(str(tmp_path)), 30)
  assert summary["curve"] == [(20, 10.0), (30, 30.0)]


# ---- bad input: one message -------------------------------------------------------------
def test_workdir_that_cannot_be_a_run_is_one_message(tmp_path):
  config = tiny_config()
  a_file = tmp_path / "notes.txt"
  a_file.write_text("mine")
  with pytest.raises(errors.WorkdirError, match=f"{a_file} is a file"):
    train.train_and_evaluate(config, str(a_file))
  with pytest.raises(errors.WorkdirError, match="Cannot write in --workdir=.*notes.txt/run"):
    train.train_and_evaluate(config, str(a_file / "run"))
  # A folder of someone's files (a dataset, say) is never used, moved or written into.
  dataset = tmp_path / "VOC2012"
  (dataset / "JPEGImages").mkdir(parents=True)
  (dataset / "train.txt").write_text("x\n")
  for overwrite in (False, True):
    with pytest.raises(errors.WorkdirError, match="not an s4jax run.*new or empty folder"):
      train.train_and_evaluate(config, str(dataset), overwrite=overwrite)
  assert sorted(os.listdir(dataset)) == ["JPEGImages", "train.txt"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["VOC2012", "notes.txt"]


def test_failed_start_leaves_no_config_record(tmp_path):
  workdir = tmp_path / "run"
  bad_root = tiny_config(**{"data.name": "folder", "data.root": str(tmp_path / "nowhere")})
  with pytest.raises(errors.DataError, match="nowhere"):
    train.train_and_evaluate(bad_root, str(workdir))
  assert not (workdir / "config.json").exists()
  assert not (workdir / "metrics.jsonl").exists()
  # The corrected command (here: another dataset) is a new run, not "a different config".
  assert workdir_lib.prepare(str(workdir), tiny_config()) == "new"


@pytest.mark.parametrize(
  "overrides, stop_after, message",
  [
    ({}, -1, "--stop_after=-1 is not valid"),
    ({}, 0, "--stop_after=0 is not valid"),
    ({"data.num_val": 0}, None, "config.data.num_val=0 is not valid"),
  ],
)
def test_bad_values_are_one_message(tmp_path, overrides, stop_after, message):
  with pytest.raises(errors.UserInputError, match=message) as info:
    train.train_and_evaluate(tiny_config(**overrides), str(tmp_path / "run"), stop_after=stop_after)
  assert "\n" not in str(info.value)
  assert not (tmp_path / "run").exists()


def test_check_files_stops_before_training(tmp_path):
  root = str(tmp_path / "data")
  fake_datasets.make_folder(root, num_labelled=6, num_unlabelled=0, num_val=2)
  bad = os.path.join(root, "images", "train", "b", "img2.png")
  with open(bad, "r+b") as f:
    f.truncate(50)
  config = tiny_config(
    **{
      "data.name": "folder",
      "data.root": root,
      "data.check_files": True,
      "batch_size": 8,
      "eval.batch_size": 8,
    }
  )
  with pytest.raises(errors.DataError, match=r"check_files: 1 of 8 examples(.|\n)*img2.png"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "config.json").exists()


def test_evaluation_names_what_exists_and_changes_nothing(straight, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(straight[0], workdir)
  record = os.path.join(workdir, "config.json")
  stamp = os.stat(record).st_mtime_ns
  config = _command_config()
  shutil.rmtree(os.path.join(workdir, "best"))
  with pytest.raises(
    errors.UserInputError,
    match="no best checkpoint yet.*steps 10, 20.*--which=latest or --which=STEP",
  ):
    train.evaluate_only(config, workdir, which="best")
  with pytest.raises(
    errors.UserInputError, match="no checkpoint of step 7; it has checkpoints of steps 10, 20"
  ):
    train.evaluate_only(config, workdir, which=7)
  # What evaluation uses may change; the run's record does not.
  config.unlock()
  config.data.num_val = 4
  config.eval.batch_size = 16
  results = train.evaluate_only(config, workdir, which=10)
  assert 0 <= results["eval/teacher_miou"] <= 1
  assert os.stat(record).st_mtime_ns == stamp
  assert not os.path.exists(os.path.join(workdir, "best"))
  config.model.width = 16
  with pytest.raises(errors.WorkdirConflictError, match="model.width") as info:
    train.evaluate_only(config, workdir, which="latest")
  assert "--overwrite" not in str(info.value)


def test_console_shows_the_losses_and_a_short_prefix():
  unimatch = {
    "train/loss": 1.0,
    "train/loss_sup": 0.5,
    "train/loss_s1": 0.2,
    "train/loss_s2": 0.2,
    "train/loss_fp": 0.1,
    "train/grad_norm": 3.0,
    "train/confident_fraction": 0.4,
    "train/pseudo_accuracy": 0.9,
    "train/pseudo_miou": 0.3,
    "train/pseudo_object_coverage": 0.1,
    "train/cwmim/loss_rec": 0.3,
    "train/epoch": 1.5,
    "train/lr": 0.01,
  }
  shown = logs.console_scalars(unimatch)
  assert sorted(shown) == [
    "train/loss",
    "train/loss_fp",
    "train/loss_s1",
    "train/loss_s2",
    "train/loss_sup",
  ]
  progress = logs.Progress(total_steps=80000)
  line = progress.format_line(12345, shown, lr=0.01)
  assert len(line) < 100, line
  record = logging.LogRecord("absl", logging.INFO, "train.py", 1, "step %d", (5,), None)
  assert logs.ConsoleFormatter().format(record)[8:] == " step 5"
  record.levelno, record.levelname = logging.WARNING, "WARNING"
  assert logs.ConsoleFormatter().format(record)[8:] == " warning: step 5"
