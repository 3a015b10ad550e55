"""Times the compiled train step of a config: compile time, step time, images/s, FLOPs, memory.

  python benchmarks/train_step.py --config=configs/shapes_supervised.py
  python benchmarks/train_step.py --config=configs/voc_unimatch.py \
      --config.model.backbone=resnet50 --config.batch_size=2 --config.unlabelled_batch_size=2 \
      --num_classes=21 --steps=3

`--profile_steps=K` then traces K more steps and prints where the time goes, per kind of op
(convolution forward / input gradient / weight gradient, other products, fusions ...), per
Flax module (all blocks' ``depthwise_conv`` together ...) and the slowest ops
(benchmarks/op_profile.py).

`--compilation_cache=DIR` compiles through JAX's persistent cache in DIR (as runs do): the
first call with an empty DIR prints the cold compile time, a second call the warm one.

A/B: `--config_b=FILE` (with its own `--config_b.<key>=...` overrides) compiles a second
config and times the two in alternation, `--rounds` times `--steps` steps each, then prints
the ratio of their step times per round and its spread (alternating cancels slow drifts of a
shared machine; only ratios from one such run compare). `--env_b=NAME=VALUE` sets an
environment variable while B is traced (B is --config itself when --config_b is not given),
e.g. `--env_b=S4JAX_DILATED_CONV=xla` for the dilated-convolution implementation.

Batches are random (drawn once); the numbers are for the step only, not the input pipeline.
FLOPs and bytes are XLA's cost analysis of the compiled step (every op, forward and
backward); GFLOP/s is that over the median step time. images/s counts every image the step
reads (labelled + unlabelled). Memory: XLA's compiled-program estimate (arguments + outputs
+ temporaries) and the process's peak resident size. Measure on an idle machine.
"""

import contextlib
import os
import resource
import statistics
import time

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

import op_profile  # benchmarks/, beside this script

from s4jax import compilation_cache
from s4jax import config_schema
from s4jax import errors
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
_CONFIG_B = config_flags.DEFINE_config_file(
  "config_b",
  None,
  "A second config for an A/B comparison (alternated with --config).",
  lock_config=True,
)
_ENV_B = flags.DEFINE_multi_string(
  "env_b",
  [],
  "A/B: NAME=VALUE environment variables set while B's step is traced (the implementation "
  "switches S4JAX_CONV_WEIGHT_GRAD, S4JAX_DILATED_CONV are read then), restored after. "
  "With --env_b and no --config_b, B is --config itself.",
)
_ROUNDS = flags.DEFINE_integer("rounds", 3, "A/B: alternations of --steps steps each.")
_COMPILATION_CACHE = flags.DEFINE_string(
  "compilation_cache",
  "off",
  "JAX's persistent compilation cache, as `python -m s4jax.main --compilation_cache`: "
  f"{compilation_cache.SETTINGS_HELP}. Off by default, so the compile time printed is a "
  "cold one; give a directory twice to measure the warm (cache filled) compile time.",
)
_PROFILE_STEPS = flags.DEFINE_integer(
  "profile_steps", 0, "After timing, trace this many steps and print the per-op profile."
)


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
  batch = {
    "image": rng.integers(0, 256, (n, c, c, 3), dtype=np.uint8),
    "mask": rng.integers(0, _NUM_CLASSES.value, (n, c, c), dtype=np.uint8),
  }
  if config.method != "supervised":
    nu = config_schema.unlabelled_batch_size(config)
    batch["u_image"] = rng.integers(0, 256, (nu, c, c, 3), dtype=np.uint8)
    batch["u_valid"] = np.ones((nu, c, c), np.uint8)
  return batch


def compile_step(config, mesh):
  """(compiled step, state, batch, compile seconds, memory analysis, cost analysis)."""
  model = segmenter.build_segmenter(
    config.model, _NUM_CLASSES.value, aux_heads=registry.required_heads(config)
  )
  tx = optim.make_optimizer(config.optim, config.total_steps)
  crop = config.data.crop_size
  state = state_lib.init_on_mesh(
    model,
    tx,
    mesh,
    (1, crop, crop, 3),
    seed=0,
    aux=registry.init_aux(config, _NUM_CLASSES.value, segmenter.feature_widths(model)),
  )
  batch = sharding.host_to_global(random_batch(config, np.random.default_rng(0)), mesh)
  train_step = step_lib.make_train_step(model, tx, config, mesh)
  t0 = time.perf_counter()
  compiled = train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jaxlibs: one dict per program
    cost = cost[0] if cost else None
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  return compiled, state, batch, compile_s, compiled.memory_analysis(), cost or {}


def time_steps(compiled, state, batch, steps: int):
  """(state, [seconds per step])."""
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  return state, times


def images_per_step(config) -> int:
  n = config.batch_size
  return n + (config_schema.unlabelled_batch_size(config) if config.method != "supervised" else 0)


def report(config, mesh, compile_s, times, mem, cost) -> None:
  median = statistics.median(times)
  crop = config.data.crop_size
  print(
    f"config: method={config.method} backbone={config.model.backbone} "
    f"width={config.model.width} crop={crop} batch={config.batch_size} "
    f"dtype={config.model.dtype} "
    f"devices={mesh.size} ({jax.devices()[0].platform})"
  )
  objectives = [o.name for o, _ in registry.enabled(config)]
  train_mode, extra, teacher = encoder_images(config)
  print(
    f"objectives: {', '.join(objectives) or 'none'}; images through the encoder per step: "
    f"{train_mode} student train-mode + {extra} objective extra + {teacher} teacher"
  )
  print(f"compile time      {compile_s:8.2f} s")
  print(
    f"median step time  {median:8.3f} s   (min {min(times):.3f}, max {max(times):.3f}, "
    f"{len(times)} steps)"
  )
  unlabelled = (
    f" + {config_schema.unlabelled_batch_size(config) / median:.2f} unlabelled"
    if config.method != "supervised"
    else ""
  )
  print(
    f"throughput        {images_per_step(config) / median:8.2f} images/s   "
    f"({config.batch_size / median:.2f} labelled{unlabelled})"
  )
  flops = cost.get("flops")
  if flops:
    print(
      f"XLA cost          {flops / 1e9:8.1f} GFLOP/step, "
      f"{cost.get('bytes accessed', 0) / 2**30:.2f} GiB accessed/step, "
      f"{flops / 1e9 / median:.1f} GFLOP/s achieved"
    )
  if mem is not None:
    total = (
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      + mem.temp_size_in_bytes
      - mem.alias_size_in_bytes
    )
    print(
      f"XLA memory        {total / 2**30:8.2f} GiB   (arguments "
      f"{mem.argument_size_in_bytes / 2**30:.2f}, temporaries "
      f"{mem.temp_size_in_bytes / 2**30:.2f})"
    )


@contextlib.contextmanager
def environment(assignments):
  """Sets NAME=VALUE environment variables for the block, then restores them."""
  saved = {}
  for assignment in assignments:
    name, sep, value = assignment.partition("=")
    if not sep or not name:
      raise app.UsageError(f"--env_b={assignment!r}: expected NAME=VALUE")
    saved.setdefault(name, os.environ.get(name))
    os.environ[name] = value
  try:
    yield
  finally:
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


def main(argv):
  del argv
  config = _CONFIG.value
  try:
    cache_dir = compilation_cache.enable(_COMPILATION_CACHE.value)
  except errors.ConfigError as e:
    raise app.UsageError(str(e)) from None
  if cache_dir:
    print(f"compilation cache {cache_dir}")
  mesh = sharding.make_mesh()
  compiled, state, batch, compile_s, mem, cost = compile_step(config, mesh)
  if _CONFIG_B.value is None and not _ENV_B.value:
    state, times = time_steps(compiled, state, batch, _STEPS.value)
    report(config, mesh, compile_s, times, mem, cost)
    if _PROFILE_STEPS.value > 0:
      # The step donates its state: feed each call the state the previous one returned.
      holder = [state]

      def step():
        holder[0], metrics = compiled(holder[0], batch)
        return metrics

      per_kind, per_op, ops = op_profile.profile(step, compiled.as_text(), _PROFILE_STEPS.value)
      op_profile.print_table(per_kind, per_op, ops, statistics.median(times))
  else:
    config_b = config if _CONFIG_B.value is None else _CONFIG_B.value
    with environment(_ENV_B.value):
      compiled_b, state_b, batch_b, compile_b, mem_b, cost_b = compile_step(config_b, mesh)
    times_a, times_b, ratios = [], [], []
    for _ in range(_ROUNDS.value):
      state, ta = time_steps(compiled, state, batch, _STEPS.value)
      state_b, tb = time_steps(compiled_b, state_b, batch_b, _STEPS.value)
      times_a += ta
      times_b += tb
      ratios.append(statistics.median(tb) / statistics.median(ta))
    print("== A ==")
    report(config, mesh, compile_s, times_a, mem, cost)
    print("== B ==" + (f" ({' '.join(_ENV_B.value)})" if _ENV_B.value else ""))
    report(config_b, mesh, compile_b, times_b, mem_b, cost_b)
    print(
      f"B/A step time     {statistics.median(ratios):8.3f}   (per round: "
      f"{', '.join(f'{r:.3f}' for r in ratios)}; {_ROUNDS.value} alternations of "
      f"{_STEPS.value} steps)"
    )
  peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"peak process RSS  {peak_rss_gib:8.2f} GiB")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
