"""Shared test set-up: 8 simulated CPU devices, so sharding tests see a real mesh."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# No persistent compilation cache: on XLA:CPU (jaxlib 0.10.2) an 8-device program with a
# while loop (the CutMix box sampler) aborted the process when loaded back from the cache.

from absl import flags  # noqa: E402

# grain's worker processes read absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()
