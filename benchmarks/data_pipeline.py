"""Images/s of the host input pipelines on VOC-like files, beside the train step's demand.

  python benchmarks/data_pipeline.py --step_seconds=2.5 --step_images=2

Writes `--num_images` VOC-like examples (JPEG images of about 500x375, index-PNG masks, the
VOC layout) to a temporary directory, then times the labelled and the unlabelled training
streams (`pipeline.make_train_iterator`: decode, random rescale, pad, crop, flip, batch)
with 0 and 2 worker processes. The demand is what the train step consumes: `step_images`
labelled (+ as many unlabelled, for a semi-supervised step) images every `step_seconds`;
measure the step with benchmarks/train_step.py on the same machine and pass its median.
The host pipeline keeps up when its images/s exceed the demand.
"""

import os
import tempfile
import time

import numpy as np
from absl import app
from absl import flags
from PIL import Image

from s4jax.data import files
from s4jax.data import pipeline
from s4jax.data import voc

_NUM_IMAGES = flags.DEFINE_integer("num_images", 200, "VOC-like examples to generate.")
_CROP = flags.DEFINE_integer("crop", 321, "Crop size of the weak view.")
_BATCH = flags.DEFINE_integer("batch", 8, "Images per batch of each stream.")
_BATCHES = flags.DEFINE_integer("batches", 40, "Timed batches per setting (after one warm-up).")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "Worker process counts to time.")
_STEP_SECONDS = flags.DEFINE_float(
  "step_seconds", 2.5, "Median train-step time (benchmarks/train_step.py)."
)
_STEP_IMAGES = flags.DEFINE_integer(
  "step_images", 2, "Labelled images per train step (the same again unlabelled if semi)."
)


def write_voc_like(root: str, count: int, seed: int = 0) -> None:
  """VOC-layout files: smooth-ish JPEGs (so they compress like photos) and index masks."""
  rng = np.random.default_rng(seed)
  for part in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    os.makedirs(os.path.join(root, part), exist_ok=True)
  ids = [f"2012_{i:06d}" for i in range(count)]
  for i, image_id in enumerate(ids):
    height, width = (375, 500) if i % 3 else (500, 375)  # VOC's common sizes
    coarse = rng.integers(0, 256, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
    noise = rng.normal(0, 8, (height, width, 3))
    pixels = np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(root, "JPEGImages", f"{image_id}.jpg"), quality=90)
    mask = np.zeros((height, width), np.uint8)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    mask[top : top + height // 3, left : left + width // 3] = rng.integers(1, 21)
    mask_image = Image.fromarray(mask, mode="P")
    mask_image.putpalette(voc.palette().reshape(-1).tolist())
    mask_image.save(os.path.join(root, "SegmentationClass", f"{image_id}.png"))
  sets = os.path.join(root, "ImageSets", "Segmentation")
  for name, subset in (("train.txt", ids), ("val.txt", ids[:1])):
    with open(os.path.join(sets, name), "w") as f:
      f.write("\n".join(subset) + "\n")


def images_per_second(source, indices, kind: str, num_workers: int) -> float:
  stream = pipeline.make_train_iterator(
    source,
    indices,
    batch_size=_BATCH.value,
    crop_size=_CROP.value,
    seed=0,
    kind=kind,
    num_workers=num_workers,
  )
  next(stream)  # warm-up: worker start-up and the first read-ahead
  # Total time over many batches, not per-batch medians: those would time the read-ahead
  # buffers draining rather than the rate at which the pipeline fills them.
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(stream)
  return _BATCHES.value * _BATCH.value / (time.perf_counter() - start)


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as root:
    start = time.perf_counter()
    write_voc_like(root, _NUM_IMAGES.value)
    layout = voc.VocLayout(root)
    entries = files.check_entries_exist(
      root, layout.train_entries(), on_bad_example="stop", skipped=None
    )
    source = layout.source(entries)
    indices = np.arange(len(source))
    print(
      f"wrote {len(source)} VOC-like examples (~500x375 JPEG + PNG) in "
      f"{time.perf_counter() - start:.1f} s; crop {_CROP.value}, batch {_BATCH.value}, "
      f"{os.cpu_count()} CPU cores"
    )
    demand = _STEP_IMAGES.value / _STEP_SECONDS.value
    print(
      f"train step demand: {demand:.2f} labelled images/s ({_STEP_IMAGES.value} per "
      f"{_STEP_SECONDS.value:.2f} s step), {2 * demand:.2f} labelled + unlabelled "
      "for a semi-supervised step"
    )
    print(f"{'stream':<12}{'workers':>8}{'images/s':>10}{'x demand':>10}")
    for kind in ("labelled", "unlabelled"):
      for workers in (int(w) for w in _WORKERS.value):
        rate = images_per_second(source, indices, kind, workers)
        print(f"{kind:<12}{workers:>8}{rate:>10.1f}{rate / demand:>10.1f}")


if __name__ == "__main__":
  app.run(main)
