"""JAX's persistent compilation cache for runs: a restarted or repeated run does not recompile.

`python -m s4jax.main` turns it on (`--compilation_cache`, default "auto"): compiled steps
are written to a user cache directory and read back by the next process that compiles the
same program (same model, shapes, devices and jaxlib). Measured on the 2-core CPU machine,
a tiny UniMatch run: 2 min 07 s cold, 23 s with the cache filled (loaded machine; README).

"auto" skips one case: XLA:CPU with more than one device (simulated devices,
--xla_force_host_platform_device_count). There, with jaxlib 0.10.2, loading back a program
with a while loop (the CutMix box sampler) aborted the process.
"""

import os

import jax
from absl import logging

from s4jax.errors import ConfigError

SETTINGS_HELP = '"auto" (a user cache directory), "off", or a directory'


def default_directory() -> str:
  """$XDG_CACHE_HOME/s4jax/xla, else ~/.cache/s4jax/xla."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "s4jax", "xla")


def enable(setting: str = "auto") -> str | None:
  """Turns the persistent cache on per `setting`; returns the directory used, or None."""
  if setting == "off":
    return None
  if setting == "auto":
    if jax.default_backend() == "cpu" and jax.device_count() > 1:
      logging.info(
        "Compilation cache off: XLA:CPU with %d devices (see s4jax/compilation_cache.py).",
        jax.device_count(),
      )
      return None
    directory = default_directory()
  elif setting:
    directory = os.path.abspath(os.path.expanduser(setting))
  else:
    raise ConfigError(f"--compilation_cache={setting!r} is not valid: give {SETTINGS_HELP}.")
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise ConfigError(
      f"--compilation_cache: cannot create {directory} ({e}); give another "
      "directory or --compilation_cache=off."
    ) from None
  jax.config.update("jax_compilation_cache_dir", directory)
  # Cache every program that took a second or more to compile (the default), of any size.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory
