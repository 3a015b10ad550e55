"""Registry of auxiliary objectives by name (the plug-in interface: losses/objective.py).

To add an objective `<name>`:
  - `losses/<name>.py` ends in `OBJECTIVE = Objective(name="<name>", ...)` (JAX);
  - `losses/<name>_config.py` has `defaults()` (the block `config.losses.<name>`, with an
    `enabled` key) and `validate(config)`, importing no JAX, so that loading a config file
    stays light;
  - its name goes into `BUILT_IN` below, and it gets tests and a `configs/` file.
The step, the loop and the config schema need no change.

An objective in a researcher's own module is added with `register(OBJECTIVE)` and its config
block added by that module or the config file (`config.losses.<name> = ...` before locking);
it then runs like a built-in, after them.

This module imports no JAX: the objectives are imported the first time they are asked for.
"""

import importlib

# The one list of built-in objectives; registry order is the order their target hooks and
# losses run in.
BUILT_IN = ("recon", "cwmim", "triplet", "contrastive", "affinity")

_external = {}  # name -> Objective, registered from outside the package


def config_blocks() -> dict:
  """{name: default config block} of every built-in objective (no JAX imported)."""
  return {
    name: importlib.import_module(f"s4jax.losses.{name}_config").defaults() for name in BUILT_IN
  }


def eval_keys() -> tuple:
  """Keys of the built-in objectives that change only what evaluation computes (a module's
  optional `EVAL_KEYS`, e.g. affinity's refine_eval): `--mode=eval` may differ in them from
  the run's config, so one checkpoint can be scored both ways."""
  keys = []
  for name in BUILT_IN:
    module = importlib.import_module(f"s4jax.losses.{name}_config")
    keys += [f"losses.{name}.{key}" for key in getattr(module, "EVAL_KEYS", ())]
  return tuple(keys)


def objectives() -> dict:
  """{name: Objective} of every objective, built-in then registered, in registry order."""
  found = {name: importlib.import_module(f"s4jax.losses.{name}").OBJECTIVE for name in BUILT_IN}
  found.update(_external)
  return found


def register(objective, *, replace: bool = False) -> None:
  """Adds an objective from outside the package (it runs after the built-in ones)."""
  taken = objective.name in BUILT_IN or objective.name in _external
  if taken and not replace and _external.get(objective.name) is not objective:
    raise ValueError(f"An objective named {objective.name!r} is already registered.")
  _external[objective.name] = objective


def unregister(name: str) -> None:
  """Removes an objective added with `register` (tests; built-ins stay)."""
  _external.pop(name, None)


def enabled(config):
  """[(objective, its config block)] for every objective switched on, in registry order."""
  blocks = config.get("losses", {})
  return [
    (objective, blocks[name])
    for name, objective in objectives().items()
    if name in blocks and blocks[name].enabled
  ]


def required_heads(config) -> tuple:
  """The `HeadSpec`s the enabled objectives need, sorted by name, each once. Two objectives
  may share a head only if they declare it identically."""
  specs = {}
  for objective, cfg in enabled(config):
    for spec in objective.heads(cfg):
      if spec.name in specs and specs[spec.name] != spec:
        raise ValueError(
          f"Objectives declare head {spec.name!r} differently: "
          f"{specs[spec.name]} and {spec} ({objective.name})."
        )
      specs[spec.name] = spec
  return tuple(specs[name] for name in sorted(specs))


def init_aux(config, num_classes: int, feature_widths: dict | None = None) -> dict:
  """Initial non-trainable state of every enabled objective, keyed by name."""
  widths = dict(feature_widths or {})
  return {
    objective.name: objective.init_aux(cfg, num_classes, widths)
    for objective, cfg in enabled(config)
  }


def validate(config) -> None:
  """Each enabled objective checks its own block (raises ConfigError naming the key)."""
  for objective, _ in enabled(config):
    objective.validate(config)
