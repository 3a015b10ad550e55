"""The command line end to end, and its messages for bad input."""

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "shapes_supervised.py")
TINY = [
  "--config.total_steps=2",
  "--config.log_every=1",
  "--config.eval_every=2",
  "--config.checkpoint_every=2",
  "--config.model.width=8",
  "--config.model.aspp_channels=16",
  "--config.model.decoder_channels=16",
  "--config.data.crop_size=32",
  "--config.data.image_size=48",
  "--config.data.num_train=32",
  "--config.data.num_val=8",
  "--config.eval.batch_size=8",
  "--config.num_visualised=2",
]


def _cli(*args, timeout=300):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one device: what a user gets by default
  return subprocess.run(
    [sys.executable, "-m", "s4jax.main", *args],
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=REPO,
    env=env,
  )


def test_cli_trains_evaluates_and_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  cache = tmp_path / "xla_cache"
  done = _cli(f"--config={CONFIG}", f"--workdir={workdir}", *TINY, f"--compilation_cache={cache}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "final student mIoU" in done.stdout
  # The compiled programs went to the persistent cache (one device: "auto" would too).
  assert len(os.listdir(cache)) >= 2
  # The console is for a person: no backend probing, no absl prefix, short progress lines.
  assert "Unable to initialize backend" not in done.stderr
  assert not re.search(r"^[IWEF]\d{4} ", done.stderr, re.M), done.stderr[:500]
  progress = [l for l in done.stderr.splitlines() if " step 2/2 | " in l]
  assert progress and len(progress[0]) < 100, progress
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
  assert any("eval/teacher_miou" in r for r in records)
  # eval mode reads the best checkpoint, may evaluate on another validation set, and leaves
  # the run's records as they were
  record = os.path.join(workdir, "config.json")
  stamp = os.stat(record).st_mtime_ns
  listing = sorted(os.listdir(workdir))
  evaluated = _cli(
    f"--config={CONFIG}",
    f"--workdir={workdir}",
    "--mode=eval",
    *TINY,
    "--config.data.num_val=4",
    f"--compilation_cache={cache}",
  )
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert "eval of the best checkpoint (step 2)" in evaluated.stderr
  assert os.stat(record).st_mtime_ns == stamp
  assert sorted(os.listdir(workdir)) == listing
  # ... and without repeating the run's overrides: its recorded config, with or without
  # evaluation overrides on top (a non-evaluation one is still refused)
  recorded = f"--config=configs/recorded.py:{workdir}"
  for args, validated in (
    ([], 8),
    ([recorded, "--config.data.num_val=4", "--which=latest"], 4),
  ):
    again = _cli(f"--workdir={workdir}", "--mode=eval", *args, f"--compilation_cache={cache}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "eval of the" in again.stderr and f"on {validated} validation images" in again.stderr, (
      again.stderr
    )
  refused = _cli(recorded, f"--workdir={workdir}", "--mode=eval", "--config.seed=5")
  assert refused.returncode == 2 and "seed" in refused.stderr, refused.stderr[-2000:]
  assert "Traceback" not in refused.stderr
  assert os.stat(record).st_mtime_ns == stamp
  assert sorted(os.listdir(workdir)) == listing


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config=configs/recorded.py"], "configs/recorded.py needs the run's workdir"),
    (["--config=configs/recorded.py:{empty}"], "is not the directory of a training run"),
    (["--mode=eval"], "is not the directory of a training run"),
    ([], "--config is required"),
  ],
)
def test_recorded_config_misuse_gives_one_message(tmp_path, args, message):
  args = [a.format(empty=tmp_path) for a in args]
  done = _cli(*args, f"--workdir={tmp_path}")
  assert done.returncode == 2, done.stderr[-2000:]
  assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line
  assert message in done.stderr and "Traceback" not in done.stderr
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
  "override, key",
  [
    ("--config.model.backbone=resnet7", "model.backbone"),
    ("--config.optim.lr=-0.1", "optim.lr"),
    ("--config.data.crop_size=0", "data.crop_size"),
    ("--config.teacher.ema_decay=1.0", "teacher.ema_decay"),
  ],
)
def test_bad_config_value_gives_one_message(tmp_path, override, key):
  done = _cli(f"--config={CONFIG}", f"--workdir={tmp_path}", override)
  assert done.returncode == 2
  assert f"s4jax: error: config.{key}=" in done.stderr
  assert "Traceback" not in done.stderr
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_unknown_config_key_names_the_key(tmp_path):
  done = _cli(f"--config={CONFIG}", f"--workdir={tmp_path}", "--config.model.backbnoe=resnet50")
  assert done.returncode != 0
  assert "backbnoe" in done.stderr
  assert "Traceback" not in done.stderr


def test_missing_config_file_names_the_path(tmp_path):
  done = _cli("--config=configs/nope.py", f"--workdir={tmp_path}")
  assert done.returncode != 0
  assert "nope.py" in done.stderr
  assert "Traceback" not in done.stderr


def test_workdir_conflict_is_one_message_and_changes_nothing(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"seed": 1, "model": {"backbone": "x"}}))
  done = _cli(f"--config={CONFIG}", f"--workdir={tmp_path}", *TINY)
  assert done.returncode == 2
  assert "holds a run with a different config" in done.stderr
  assert "--overwrite" in done.stderr
  assert sorted(os.listdir(tmp_path)) == ["config.json"]


@pytest.mark.parametrize(
  "args, message",
  [
    (["--stop_after=-1"], "--stop_after=-1 is not valid"),
    (["--workdir={file}"], "is a file, not a folder"),
    (["--compilation_cache={file}/x"], "--compilation_cache: cannot create"),
  ],
)
def test_bad_run_arguments_give_one_message(tmp_path, args, message):
  a_file = tmp_path / "notes.txt"
  a_file.write_text("mine")
  args = [a.format(file=a_file) for a in args]
  if not any(a.startswith("--workdir=") for a in args):
    args.append(f"--workdir={tmp_path / 'run'}")
  done = _cli(f"--config={CONFIG}", *args, *TINY)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line
  assert message in done.stderr and "Traceback" not in done.stderr
  assert a_file.read_text() == "mine" and not (tmp_path / "run").exists()


def test_loading_every_config_file_imports_no_jax(tmp_path):
  """Config files (and their objective blocks) load without JAX or Flax, e.g. on a login
  node that checks a sweep's configs."""
  code = (
    "import glob, importlib.util, sys\n"
    "from s4jax.losses import registry\n"
    "for path in sorted(glob.glob('configs/*.py')):\n"
    "  spec = importlib.util.spec_from_file_location('cfg', path)\n"
    "  module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
    "  # recorded.py reads a run's config.json (here a run with one override)\n"
    "  config = module.get_config(*(['REC'] if path.endswith('recorded.py') else []))\n"
    "  assert all(name in config.losses for name in registry.BUILT_IN), path\n"
    "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax'))\n"
    "print('HEAVY', heavy)\n"
  )
  record = tmp_path / "config.json"
  record.write_text(json.dumps({"seed": 3}))
  code = code.replace("REC", str(tmp_path)) + (
    "spec = importlib.util.spec_from_file_location('rec', 'configs/recorded.py')\n"
    "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
    "print('SEED', module.get_config(sys.argv[1]).seed)\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code, str(tmp_path)],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert "HEAVY []" in out, out
  assert "SEED 3" in out, out
