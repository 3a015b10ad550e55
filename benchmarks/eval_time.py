"""Times whole-validation-set evaluation under the exact protocol (every image at its own size).

  python benchmarks/eval_time.py --config=configs/voc_unimatch.py \
      --config.data.root=VOCdevkit/VOC2012
  python benchmarks/eval_time.py --config=configs/voc_unimatch.py --fake_voc=60 \
      --config.model.backbone=resnet18

Prints the number of validation images, of distinct sizes (= compiled shapes of the eval
step) and of batches, then the time of a first (cold: compiles every size) and a second
(warm) pass of the student's evaluation. `--fake_voc=N` writes a VOC tree of N random
validation images to a temporary folder, with sizes drawn from VOC's common sizes (500x375,
375x500, 500x333, 333x500, 500x500) plus a few random ones, and evaluates that.
"""

import os
import tempfile
import time

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags
from PIL import Image

from s4jax import sharding
from s4jax import state as state_lib
from s4jax import step as step_lib
from s4jax import optim
from s4jax.data import datasets
from s4jax.data import pipeline
from s4jax.models import segmenter

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
_FAKE_VOC = flags.DEFINE_integer("fake_voc", 0, "Evaluate a generated VOC tree of N images.")

_COMMON_VOC_SIZES = ((375, 500), (500, 375), (333, 500), (500, 333), (500, 500))


def _write_fake_voc(root: str, count: int, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  for part in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    os.makedirs(os.path.join(root, part), exist_ok=True)
  ids = [f"2007_{i:06d}" for i in range(count + 2)]
  for i, image_id in enumerate(ids):
    if rng.random() < 0.8:
      h, w = _COMMON_VOC_SIZES[rng.integers(len(_COMMON_VOC_SIZES))]
    else:
      h, w = int(rng.integers(200, 501)), 500
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
      os.path.join(root, "JPEGImages", f"{image_id}.jpg")
    )
    Image.fromarray(rng.integers(0, 21, (h, w)).astype(np.uint8), mode="L").save(
      os.path.join(root, "SegmentationClass", f"{image_id}.png")
    )
  sets = os.path.join(root, "ImageSets", "Segmentation")
  with open(os.path.join(sets, "train.txt"), "w") as f:
    f.write("\n".join(ids[:2]) + "\n")
  with open(os.path.join(sets, "val.txt"), "w") as f:
    f.write("\n".join(ids[2:]) + "\n")


def main(argv):
  del argv
  config = _CONFIG.value
  if _FAKE_VOC.value:
    root = tempfile.mkdtemp(prefix="fake_voc_")
    _write_fake_voc(root, _FAKE_VOC.value)
    config.data.root = root
    config.data.labelled_fraction = 0.5
    config.data.split = ""
  data = datasets.build(config.data)
  mesh = sharding.make_mesh()
  model = segmenter.build_segmenter(config.model, data.num_classes)
  tx = optim.make_optimizer(config.optim, config.total_steps)
  state = state_lib.init_on_mesh(model, tx, mesh, (1, 64, 64, 3), seed=0)
  eval_step = step_lib.make_eval_step(model, config, data.num_classes, mesh)
  batches = pipeline.make_eval_batches(data.val_source, global_batch_size=config.eval.batch_size)
  print(
    f"validation: {len(data.val_source)} images, {batches.num_shapes} distinct sizes, "
    f"{len(batches)} batches of {config.eval.batch_size} "
    f"({config.model.backbone}, {mesh.size} device(s), {jax.devices()[0].platform})"
  )
  for label in ("cold (compiles each size)", "warm"):
    t0 = time.perf_counter()
    total = None
    for local in batches:
      batch = sharding.host_to_global(local, mesh)
      conf = eval_step(state.student_variables(), batch["image"], batch["mask"])
      total = conf if total is None else total + conf
    jax.block_until_ready(total)
    print(f"evaluation {label}: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
