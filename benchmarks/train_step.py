"""Times the compiled train step of a config: compile time, median step time, images/s, memory.

  python benchmarks/train_step.py --config=configs/shapes_supervised.py
  python benchmarks/train_step.py --config=configs/shapes_supervised.py \
      --config.model.backbone=resnet50 --config.model.width=64 --config.model.aspp_channels=256 \
      --config.model.decoder_channels=256 --config.data.crop_size=321 --config.batch_size=2

Batches are random (drawn once); the numbers are for the step only, not the input pipeline.
Memory: XLA's compiled-program estimate (arguments + outputs + temporaries) and the process's
peak resident size. Measure on an idle machine: other load shifts the medians.
"""

import resource
import statistics
import time

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from s4jax import config_schema
from s4jax import methods
from s4jax import optim
from s4jax import sharding
from s4jax import state as state_lib
from s4jax import step as step_lib
from s4jax.losses import registry
from s4jax.models import segmenter

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after one warm-up step).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 21, "Classes of the segmentation head.")


def encoder_images(config):
  """(student train-mode, student extra, teacher) images through the encoder per step."""
  n_l = config.batch_size
  n_u = config_schema.unlabelled_batch_size(config)
  counts = methods.get(config.method).encoder_images(n_l, n_u, config.teacher.source)
  extra = 0
  cw = config.losses.cwmim
  if cw.enabled:
    if cw.rec_weight > 0 or cw.fa_weight > 0:
      extra += cw.classes_per_image * (n_l + (n_u if cw.on_unlabelled else 0))
    if cw.smim_weight > 0:
      extra += n_u
  return counts["student"], extra, counts["teacher"]


def random_batch(config, rng):
  """A host batch with the keys the train step of this config reads."""
  n, c = config.batch_size, config.data.crop_size
  batch = {"image": rng.integers(0, 256, (n, c, c, 3), dtype=np.uint8),
           "mask": rng.integers(0, _NUM_CLASSES.value, (n, c, c), dtype=np.uint8)}
  if config.method != "supervised":
    nu = config_schema.unlabelled_batch_size(config)
    batch["u_image"] = rng.integers(0, 256, (nu, c, c, 3), dtype=np.uint8)
    batch["u_valid"] = np.ones((nu, c, c), np.uint8)
  return batch


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = sharding.make_mesh()
  model = segmenter.build_segmenter(config.model, _NUM_CLASSES.value,
                                    aux_heads=registry.required_heads(config))
  tx = optim.make_optimizer(config.optim, config.total_steps)
  crop = config.data.crop_size
  state = state_lib.init_on_mesh(model, tx, mesh, (1, crop, crop, 3), seed=0,
                                 aux=registry.init_aux(config, _NUM_CLASSES.value,
                                                     segmenter.feature_widths(model)))
  batch = sharding.host_to_global(random_batch(config, np.random.default_rng(0)), mesh)
  train_step = step_lib.make_train_step(model, tx, config, mesh)

  t0 = time.perf_counter()
  compiled = train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()

  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(_STEPS.value):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

  print(f"config: method={config.method} backbone={config.model.backbone} "
        f"width={config.model.width} crop={crop} batch={config.batch_size} "
        f"dtype={config.model.dtype} "
        f"devices={mesh.size} ({jax.devices()[0].platform})")
  objectives = [o.name for o, _ in registry.enabled(config)]
  train_mode, extra, teacher = encoder_images(config)
  print(f"objectives: {', '.join(objectives) or 'none'}; images through the encoder per step: "
        f"{train_mode} student train-mode + {extra} objective extra + {teacher} teacher")
  print(f"compile time      {compile_s:8.2f} s")
  print(f"median step time  {median:8.3f} s   (min {min(times):.3f}, max {max(times):.3f}, "
        f"{len(times)} steps)")
  unlabelled = (f" + {config_schema.unlabelled_batch_size(config) / median:.2f} unlabelled"
                if config.method != "supervised" else "")
  print(f"throughput        {config.batch_size / median:8.2f} labelled{unlabelled} images/s")
  if mem is not None:
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)
    print(f"XLA memory        {total / 2**30:8.2f} GiB   (arguments "
          f"{mem.argument_size_in_bytes / 2**30:.2f}, temporaries "
          f"{mem.temp_size_in_bytes / 2**30:.2f})")
  print(f"peak process RSS  {peak_rss_gib:8.2f} GiB")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
