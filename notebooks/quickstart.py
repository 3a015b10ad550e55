# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # s4jax quickstart: supervised vs UniMatch on synthetic shapes
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/s4jax/blob/main/notebooks/quickstart.ipynb)
#
# (`OWNER` in the link and in `REPO_URL` below is a placeholder: put the GitHub owner of
# your copy of s4jax there.)
#
# This notebook trains two small DeepLabV3+ / ResNet-18 networks from scratch on the
# embedded synthetic *shapes* dataset (no downloads), with 1/16 of the training images
# labelled: a supervised baseline and UniMatch, which also learns from the unlabelled 15/16.
# It plots their mIoU over training, shows the prediction grids the runs write, and
# segments a few images with an exported model.
#
# Every run lives in a workdir: interrupt the training cell and run it again, and each run
# continues from its last checkpoint. To keep runs across a reset of the Colab runtime
# (its disk is wiped), point `RUNS_DIR` at Google Drive after `drive.mount`.
# On a Colab CPU runtime the default 300 steps take a few minutes per run; a GPU or TPU
# runtime is faster. Set `STEPS` higher for better numbers (the README's tables use 3000).

# %%
# Parameters. CI executes this notebook with S4JAX_NOTEBOOK_CI=1: a tiny network, 4 steps.
import os

CI = os.environ.get("S4JAX_NOTEBOOK_CI") == "1"
STEPS = int(os.environ.get("S4JAX_NOTEBOOK_STEPS", "4" if CI else "300"))
EVAL_EVERY = max(2, STEPS // 3)
RUNS_DIR = os.environ.get("S4JAX_NOTEBOOK_RUNS", os.path.join("runs", "quickstart"))
REPO_URL = "https://github.com/OWNER/s4jax.git"  # placeholder: your copy of s4jax

# %%
# Install: only on Colab (elsewhere, `pip install -e '.[test]'` in the repository did it).
import subprocess
import sys

if "google.colab" in sys.modules:
  if not os.path.isdir("s4jax"):
    subprocess.run(["git", "clone", "--depth=1", REPO_URL, "s4jax"], check=True)
  # The JAX wheel that matches the runtime's accelerator, beside s4jax itself.
  if os.path.exists("/dev/accel0") or "COLAB_TPU_ADDR" in os.environ:
    accelerator = ["jax[tpu]"]
  elif subprocess.run(["nvidia-smi"], capture_output=True).returncode == 0:
    accelerator = ["jax[cuda12]"]
  else:
    accelerator = []
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "s4jax", "matplotlib",
                  *accelerator], check=True)
  os.chdir("s4jax")
  sys.path.insert(0, os.getcwd())  # an editable install is seen by new kernels only
elif not os.path.isdir("configs") and os.path.isdir(os.path.join("..", "configs")):
  os.chdir("..")  # opened from notebooks/: work from the repository root

# %%
import importlib.util
import logging as logging_lib

import jax
from absl import logging

from s4jax import train


class _QuietLibraries(logging_lib.Filter):
  """Keeps s4jax's progress lines and drops the checkpoint library's chatter."""

  def filter(self, record):
    return not (record.levelno <= logging_lib.INFO and
                any(f"{os.sep}{lib}{os.sep}" in record.pathname for lib in ("orbax", "grain")))


logging.set_verbosity(logging.INFO)
logging.get_absl_handler().addFilter(_QuietLibraries())
print("JAX", jax.__version__, "devices:", jax.devices())


def load_config(path):
  """`get_config()` of a config file, as `python -m s4jax.main --config=path` loads it."""
  spec = importlib.util.spec_from_file_location("quickstart_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def configure(config):
  """The same labelled images and step budget for every run of the comparison."""
  config.data.labelled_fraction = 1 / 16
  config.total_steps = STEPS
  config.eval_every = EVAL_EVERY
  config.checkpoint_every = EVAL_EVERY
  config.log_every = max(1, STEPS // 10)
  config.num_visualised = 4
  if CI:  # a tiny network on tiny images: the notebook's code paths in seconds
    config.model.width = 8
    config.model.aspp_channels = 16
    config.model.decoder_channels = 16
    config.data.image_size = 48
    config.data.crop_size = 32
    config.data.num_train = 64
    config.data.num_val = 8
    config.eval.batch_size = 8
  return config


RUNS = {
    "supervised": configure(load_config("configs/shapes_supervised.py")),
    "unimatch": configure(load_config("configs/shapes_unimatch.py")),
}

# %% [markdown]
# ## Train
#
# Each run is what `python -m s4jax.main --config=configs/shapes_<method>.py
# --workdir=runs/quickstart/<method> --config.data.labelled_fraction=0.0625 ...` does.

# %%
results = {}
for name, config in RUNS.items():
  workdir = os.path.join(RUNS_DIR, name)
  results[name] = train.train_and_evaluate(config, workdir)
  print(f"{name}: teacher mIoU {100 * results[name]['eval/teacher_miou']:.1f} "
        f"(student {100 * results[name]['eval/student_miou']:.1f}) after {STEPS} steps")

# %% [markdown]
# ## mIoU over training
#
# Read back from each run's `metrics.jsonl` (one JSON object per line, each with `step`).

# %%
import matplotlib.pyplot as plt

from s4jax import logs

fig, ax = plt.subplots(figsize=(6, 4))
for (name, _), colour in zip(RUNS.items(), ("tab:blue", "tab:orange")):
  records = logs.read_metrics(os.path.join(RUNS_DIR, name, "metrics.jsonl"))
  evals = [r for r in records if r.get("eval/teacher_miou") is not None]
  steps = [r["step"] for r in evals]
  ax.plot(steps, [100 * r["eval/teacher_miou"] for r in evals], "o-", color=colour,
          label=f"{name} (teacher)")
  ax.plot(steps, [100 * r["eval/student_miou"] for r in evals], "x--", color=colour,
          alpha=0.6, label=f"{name} (student)")
ax.set_xlabel("step")
ax.set_ylabel("validation mIoU (%)")
ax.set_title("shapes, 1/16 labelled")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# ## Prediction grids
#
# At every evaluation a run writes `images/predictions_<step>.png`: per validation image,
# image | ground truth | student | teacher.

# %%
import glob

from PIL import Image

fig, axes = plt.subplots(1, len(RUNS), figsize=(6 * len(RUNS), 6))
for ax, name in zip(axes, RUNS):
  grid = sorted(glob.glob(os.path.join(RUNS_DIR, name, "images", "predictions_*.png")))[-1]
  ax.imshow(Image.open(grid))
  ax.set_title(f"{name}: {os.path.basename(grid)}")
  ax.axis("off")
plt.show()

# %% [markdown]
# ## Your own images: export, then predict
#
# `python -m s4jax.export` writes a run's model to one file (weights, config, class names);
# `python -m s4jax.predict` segments a folder of images of any size with it (or with the
# workdir directly) and writes index-PNG masks and colour overlays. Here: a few validation
# images saved as PNG files.

# %%
import numpy as np

from s4jax import export
from s4jax import predict
from s4jax.data import datasets

model_file = os.path.join(RUNS_DIR, "unimatch_model.npz")
if not os.path.exists(model_file):
  export.export(os.path.join(RUNS_DIR, "unimatch"), model_file)
photos = os.path.join(RUNS_DIR, "photos")
os.makedirs(photos, exist_ok=True)
validation = datasets.build(RUNS["unimatch"].data).val_source
for i in range(3):
  Image.fromarray(validation[i]["image"]).save(os.path.join(photos, f"val_{i}.png"))
masks_dir = os.path.join(RUNS_DIR, "predicted")
summary = predict.predict(input_pattern=photos, output_dir=masks_dir, model_file=model_file)
print("\n".join(predict.summary_lines(summary, masks_dir)))

class_names = export.load(model_file).class_names
fig, axes = plt.subplots(1, 3, figsize=(12, 4))
for i, ax in enumerate(axes):
  ax.imshow(Image.open(os.path.join(masks_dir, predict.OVERLAYS_DIR, f"val_{i}.jpg")))
  classes = np.unique(np.asarray(Image.open(os.path.join(masks_dir, predict.MASKS_DIR,
                                                         f"val_{i}.png"))))
  ax.set_title(", ".join(class_names[c] for c in classes), fontsize=8)
  ax.axis("off")
plt.show()
