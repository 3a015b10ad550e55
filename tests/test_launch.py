"""launch/: the TPU scripts print the gcloud commands they would run (DRY_RUN=1), the resume
loop re-creates a preempted slice and reruns the same command, and the SLURM script turns
the time-limit warning into SIGTERM for the training processes and a requeue."""

import os
import shlex
import signal
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, "launch", "tpu")
SBATCH = os.path.join(REPO, "launch", "slurm", "train.sbatch")
TRAIN_ARGS = [
  "--config=configs/voc_unimatch.py",
  "--workdir=/mnt/s4jax/runs/voc 92",
  "--config.data.split=92",
]
BASE_ENV = {"TPU_NAME": "s4jax-test", "ZONE": "us-central2-b", "DRY_RUN": "1", "POLL_SECONDS": "0"}


def _script(name, *args, **env):
  full = {k: v for k, v in os.environ.items() if k not in BASE_ENV}
  full.update(BASE_ENV)
  full.update(env)
  return subprocess.run(
    [os.path.join(TPU, name), *args], capture_output=True, text=True, env=full, timeout=60, cwd=REPO
  )


def _commands(done):
  """The commands a dry run printed, as argv lists."""
  return [shlex.split(line[2:]) for line in done.stdout.splitlines() if line.startswith("+ ")]


def _flag(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  return values[0] if values else None


def _training(argv):
  return argv[:6] == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
    "s4jax-test",
  ] and "s4jax.main" in (_flag(argv, "command") or "")


def test_create_uses_gclouds_verbs_and_tiers():
  done = _script("create.sh", ACCELERATOR="v4-8", PROVISIONING="spot")
  assert done.returncode == 0, done.stderr
  create, describe = _commands(done)
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "s4jax-test"]
  assert _flag(create, "accelerator-type") == "v4-8"
  assert _flag(create, "version") == "tpu-ubuntu2204-base"
  assert _flag(create, "zone") == "us-central2-b" and "--spot" in create
  assert describe[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]

  done = _script(
    "create.sh",
    ACCELERATOR="v5litepod-8",
    MODE="queued",
    PROVISIONING="reserved",
    PROJECT="my-project",
    FAKE_STATES="WAITING_FOR_RESOURCES PROVISIONING ACTIVE",
  )
  assert done.returncode == 0, done.stderr
  create, *describes = _commands(done)
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "s4jax-test-qr"]
  assert _flag(create, "node-id") == "s4jax-test"
  assert _flag(create, "runtime-version") == "v2-alpha-tpuv5-lite"
  assert "--reserved" in create and _flag(create, "project") == "my-project"
  # It waits in the queue until the resource is ACTIVE.
  assert len(describes) == 3
  assert all(_flag(d, "format") == "value(state.state)" for d in describes)

  on_demand = _commands(_script("create.sh"))[0]
  assert "--spot" not in on_demand and "--reserved" not in on_demand


def test_setup_copies_the_code_and_installs_it_on_every_worker():
  done = _script("setup.sh", GCS_BUCKET="my-bucket")
  assert done.returncode == 0, done.stderr
  scp, unpack, install, mount = _commands(done)
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  for ssh in (unpack, install, mount):
    assert ssh[4] == "ssh" and "--worker=all" in ssh
  assert "tar -xzf s4jax-code.tar.gz" in _flag(unpack, "command")
  command = _flag(install, "command")
  assert "pip install -q -e ./s4jax 'jax[tpu]'" in command
  assert "python3.11 -m venv s4jax-venv" in command
  assert "gcsfuse --implicit-dirs" in _flag(mount, "command")
  assert "my-bucket /mnt/s4jax" in _flag(mount, "command")

  done = _script("setup.sh", CODE="clone", REPO_URL="https://example.org/s4jax.git")
  clone = _commands(done)[0]
  assert "git clone --depth=1 --branch=main https://example.org/s4jax.git s4jax" in _flag(
    clone, "command"
  )


def test_train_runs_the_same_command_on_every_worker():
  done = _script("train.sh", *TRAIN_ARGS)
  assert done.returncode == 0, done.stderr
  (ssh,) = _commands(done)
  assert _training(ssh) and "--worker=all" in ssh
  remote = shlex.split(_flag(ssh, "command"))
  start = remote.index("-m")
  assert remote[start:] == ["-m", "s4jax.main", "--distributed", *TRAIN_ARGS]


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config=c.py", "--workdir=gs://bucket/runs/x"], "GCS_BUCKET=bucket"),
    (["--config=c.py"], "give --workdir=DIR"),
    (["--workdir=/mnt/x", "--distributed"], "do not pass --distributed"),
  ],
)
def test_train_refuses_what_cannot_work_on_a_slice(args, message):
  done = _script("train.sh", *args)
  assert done.returncode == 2
  assert done.stderr.startswith("launch/tpu: error: ") and message in done.stderr
  assert not _commands(done)


def test_missing_settings_are_one_message():
  done = _script("create.sh", TPU_NAME="")
  assert done.returncode == 2 and "set TPU_NAME" in done.stderr
  done = _script("delete.sh", MODE="queue")
  assert done.returncode == 2 and "MODE=queue: use vm or queued" in done.stderr


def test_delete():
  (vm,) = _commands(_script("delete.sh"))
  assert vm[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "s4jax-test"]
  assert "--quiet" in vm
  (queued,) = _commands(_script("delete.sh", MODE="queued"))
  assert queued[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "s4jax-test-qr"]
  assert "--force" in queued and "--quiet" in queued


@pytest.mark.parametrize(
  "mode, states",
  [
    ("vm", "READY PREEMPTED READY"),
    ("queued", "NOT_FOUND WAITING_FOR_RESOURCES ACTIVE SUSPENDED PROVISIONING ACTIVE"),
  ],
)
def test_supervise_recreates_a_preempted_slice_and_reruns_the_same_command(mode, states):
  done = _script(
    "supervise.sh",
    *TRAIN_ARGS,
    MODE=mode,
    PROVISIONING="spot",
    FAKE_STATES=states,
    FAKE_TRAIN_STATUS="255 0",
  )
  assert done.returncode == 0, done.stderr
  commands = _commands(done)
  trainings = [i for i, c in enumerate(commands) if _training(c)]
  assert len(trainings) == 2
  assert commands[trainings[0]] == commands[trainings[1]]  # the same command resumes
  between = [c[4] for c in commands[trainings[0] + 1 : trainings[1]]]  # the gcloud verbs
  # After the failed attempt: read the state, delete the gone slice, create it again, wait
  # for it, install the code again, then train.
  assert between[:3] == ["describe", "delete", "create"]
  assert "scp" in between and between.index("scp") > between.index("create")
  create = commands[trainings[0] + 1 :][between.index("create")]
  assert "--spot" in create
  if mode == "queued":
    assert commands[0][3:5] == ["queued-resources", "describe"]
    assert commands[1][3:5] == ["queued-resources", "create"]  # there was none at first
  assert "re-creating it and resuming" in done.stderr
  assert "training finished (attempt 2)" in done.stderr


def test_supervise_stops_after_repeated_failures_on_a_healthy_slice():
  done = _script(
    "supervise.sh",
    *TRAIN_ARGS,
    FAKE_STATES="READY",
    FAKE_TRAIN_STATUS="2",
    MAX_FAILURES="2",
    DELETE_WHEN_DONE="1",
  )
  assert done.returncode == 2
  commands = _commands(done)
  assert sum(_training(c) for c in commands) == 2
  assert not any(c[4] in ("delete", "create") for c in commands)
  assert "failed 2 times in a row on a healthy slice" in done.stderr


# ---- SLURM --------------------------------------------------------------------------------


def _directives():
  return [line.split(None, 1)[1].strip() for line in open(SBATCH) if line.startswith("#SBATCH")]


def test_sbatch_asks_for_one_process_per_gpu_a_requeue_and_a_warning_signal():
  directives = _directives()
  assert "--requeue" in directives
  assert "--signal=B:USR1@120" in directives
  tasks = [d for d in directives if d.startswith("--ntasks-per-node=")]
  gpus = [d for d in directives if d.startswith("--gpus-per-node=")]
  assert tasks and gpus and tasks[0].split("=")[1] == gpus[0].split("=")[1]
  assert "--nodes=2" in directives
  env = {**os.environ, "DRY_RUN": "1"}
  done = subprocess.run(
    ["bash", SBATCH, *TRAIN_ARGS], capture_output=True, text=True, env=env, timeout=30, cwd=REPO
  )
  assert done.returncode == 0, done.stderr
  (line,) = [l for l in done.stdout.splitlines() if l.startswith("+ ")]
  assert shlex.split(line[2:]) == [
    "srun",
    "--kill-on-bad-exit=1",
    "python",
    "-m",
    "s4jax.main",
    "--distributed",
    *TRAIN_ARGS,
  ]
  done = subprocess.run(
    ["bash", SBATCH, "--config=c.py"], capture_output=True, text=True, env=env, timeout=30, cwd=REPO
  )
  assert done.returncode == 2 and "give --workdir=DIR" in done.stderr


def _fake_slurm(tmp_path, srun_exit):
  """srun/scancel/scontrol stand-ins that log their calls; srun runs until SIGTERM (then
  exits 0, as a training that saved its checkpoint does) or exits `srun_exit` at once."""
  bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
  bin_dir.mkdir()
  scripts = {
    "srun": f"""echo "srun $*" >> {log}
echo $$ > {tmp_path}/srun.pid
if [ "{srun_exit}" != wait ]; then exit {srun_exit}; fi
trap 'echo "srun: SIGTERM" >> {log}; exit 0' TERM
while true; do sleep 0.05; done""",
    "scancel": f"""echo "scancel $*" >> {log}
kill -TERM "$(cat {tmp_path}/srun.pid)" """,
    "scontrol": f"""echo "scontrol $*" >> {log}""",
  }
  for name, body in scripts.items():
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)
  env = {
    **os.environ,
    "PATH": f"{bin_dir}:{os.environ['PATH']}",
    "SLURM_JOB_ID": "4242",
    "S4JAX_REPO": str(tmp_path),
  }
  env.pop("DRY_RUN", None)
  return env, log


def test_sbatch_time_limit_warning_checkpoints_and_requeues(tmp_path):
  env, log = _fake_slurm(tmp_path, "wait")
  job = subprocess.Popen(
    ["bash", SBATCH, *TRAIN_ARGS],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.monotonic() + 20
  while not (tmp_path / "srun.pid").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  job.send_signal(signal.SIGUSR1)  # what SLURM sends 120 s before the time limit
  _, stderr = job.communicate(timeout=30)
  assert job.returncode == 0, stderr
  calls = log.read_text().splitlines()
  assert calls[0].startswith("srun --kill-on-bad-exit=1 python -m s4jax.main --distributed")
  assert calls[1:] == ["scancel --signal=TERM 4242", "srun: SIGTERM", "scontrol requeue 4242"]


@pytest.mark.parametrize("srun_exit", [0, 3])
def test_sbatch_without_a_warning_returns_trainings_status(tmp_path, srun_exit):
  env, log = _fake_slurm(tmp_path, srun_exit)
  done = subprocess.run(
    ["bash", SBATCH, *TRAIN_ARGS], env=env, capture_output=True, text=True, timeout=30
  )
  assert done.returncode == srun_exit
  assert [c.split()[0] for c in log.read_text().splitlines()] == ["srun"]  # no requeue
