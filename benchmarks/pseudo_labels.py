"""How good are a run's pseudo-labels, class by class, at a few confidence thresholds?

  python benchmarks/pseudo_labels.py --workdir=runs/u --thresholds=0.95,0.8,0.5

Loads the run's recorded `config.json` and its best (or latest) checkpoint, runs the teacher
(EMA weights, inference mode, whole images) over the unlabelled training images when the
dataset has all their masks (shapes; VOC or Cityscapes with masks on disk), else over the
validation set, and prints for each threshold:

  * confident %: share of labelled pixels whose top probability reaches the threshold —
    the pixels the pseudo-label loss trains on;
  * precision %: share of those whose pseudo-label is right;
  * per class, coverage / precision: of the pixels of class k, the share that are confident
    *and* labelled k; of the confident pixels labelled k, the share that are class k.

A threshold-based method learns about class k only through its covered pixels, so a class
with tiny coverage gets (almost) nothing from the unlabelled images. Masks are used for this
report only. Images are the un-augmented ones (the training teacher sees weak crops).
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from s4jax import augment  # noqa: E402
from s4jax import evaluate  # noqa: E402
from s4jax import sharding  # noqa: E402
from s4jax import train  # noqa: E402
from s4jax import workdir as workdir_lib  # noqa: E402
from s4jax.data import pipeline  # noqa: E402
from s4jax.errors import UserInputError  # noqa: E402


def per_threshold_confusions(run, state, source, thresholds, max_images):
  """{threshold: confusion over confident pixels}, and the confusion of all pixels."""
  variables = state.teacher_variables()
  k = run.data.num_classes

  @jax.jit
  def batch_confusions(images, masks):
    logits = run.model.apply(variables, augment.normalize_uint8(images), train=False)["logits"]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    confidence, pseudo = probs.max(-1), probs.argmax(-1)
    labels = masks.astype(jnp.int32)
    out = [evaluate.confusion_matrix(pseudo, labels, k)]
    for t in thresholds:
      out.append(evaluate.confusion_matrix(pseudo, jnp.where(confidence >= t, labels, 255), k))
    return out

  batches = pipeline.make_eval_batches(source, global_batch_size=run.config.eval.batch_size)
  totals, seen = None, 0
  for local in batches:
    if seen >= max_images:
      break
    batch = sharding.host_to_global(local, run.mesh)
    confs = [np.asarray(c, np.int64) for c in batch_confusions(batch["image"], batch["mask"])]
    totals = confs if totals is None else [a + b for a, b in zip(totals, confs)]
    seen += local["image"].shape[0]
  return totals[0], dict(zip(thresholds, totals[1:])), min(seen, len(source))  # no dummy rows


def pct(numerator, denominator):
  return f"{100.0 * numerator / denominator:5.1f}" if denominator else "  n/a"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--which", choices=("best", "latest"), default="latest")
  parser.add_argument("--thresholds", default="0.95,0.9,0.8,0.7,0.5")
  parser.add_argument("--max_images", type=int, default=1000)
  args = parser.parse_args()
  thresholds = tuple(float(t) for t in args.thresholds.split(","))

  try:
    config = workdir_lib.recorded_config(args.workdir)
    config.data.use_unlabelled_masks = True  # this report is what they are for
    run = train.Run(config, args.workdir, training=False)
    state = run.restore_saved(args.which)
  except UserInputError as e:
    raise SystemExit(f"error: {e}") from None
  if run.data.unlabelled_has_masks and len(run.data.unlabelled_indices):
    source, where = (
      pipeline.SubsetSource(run.data.train_source, run.data.unlabelled_indices),
      "unlabelled training images",
    )
  else:
    source, where = run.data.val_source, "validation images (no masks for unlabelled ones)"
  overall, confident, seen = per_threshold_confusions(
    run, state, source, thresholds, args.max_images
  )
  step = int(jax.device_get(state.step))
  names = run.data.class_names
  print(f"{args.workdir}: teacher at step {step}, {seen} {where}")
  print(
    f"teacher accuracy on all pixels: {pct(np.trace(overall), overall.sum())} %, "
    f"mIoU {100 * evaluate.iou_from_confusion(overall)['miou']:.1f}"
  )
  header = (
    "| threshold | confident % | precision % | " + " | ".join(f"{n} cov/prec" for n in names) + " |"
  )
  print(header)
  print("|" + "---|" * (3 + len(names)))
  gt_pixels = overall.sum(1)
  for t, conf in confident.items():
    cells = [
      f"{pct(conf[c, c], gt_pixels[c])} / {pct(conf[c, c], conf[:, c].sum())}"
      for c in range(len(names))
    ]
    print(
      f"| {t:g} | {pct(conf.sum(), overall.sum())} | {pct(np.trace(conf), conf.sum())} | "
      + " | ".join(cells)
      + " |"
    )


if __name__ == "__main__":
  main()
