"""The base semi-supervised methods, one file each (docs/methods.md §0).

`NAMES` is the one list of methods; `get(name)` imports that method's file and returns its
`base.Method` record. The import is lazy so that the config schema can list the names
without importing JAX.
"""

import importlib

NAMES = ("supervised", "fixmatch", "unimatch", "unimatch_v2")


def get(name: str):
  """The `base.Method` record of method `name` (one of `NAMES`)."""
  if name not in NAMES:
    raise ValueError(f"Unknown method {name!r}; known: {NAMES}.")
  return importlib.import_module(f"s4jax.methods.{name}").METHOD
