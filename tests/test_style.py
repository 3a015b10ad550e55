"""The linter and the formatter configured in pyproject.toml ([tool.ruff]) are clean on the
whole tree."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_check_is_clean():
  done = subprocess.run(
    [sys.executable, "-m", "ruff", "check", "--no-cache", "."],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_ruff_format_is_clean():
  done = subprocess.run(
    [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", "."],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
