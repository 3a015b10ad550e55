"""Registry of auxiliary objectives by name (the plug-in interface: losses/objective.py).

To add an objective: write `losses/<name>.py` ending in `OBJECTIVE = Objective(...)`, add
it to `_BUILT_IN` below, give it a config block `config.losses.<name>` with an `enabled` key
in `config_schema.default_config()`, and test it. The step and the loop need no change.
An objective in a researcher's own module is added with `register(OBJECTIVE)` (its config
block added to the config by that module or the config file); it then runs like a built-in.
"""

from s4jax.losses import cwmim
from s4jax.losses import recon

_BUILT_IN = (recon.OBJECTIVE, cwmim.OBJECTIVE)
# Registry order is the order losses and target hooks run in.
OBJECTIVES = {objective.name: objective for objective in _BUILT_IN}


def register(objective, *, replace: bool = False) -> None:
  """Adds an objective from outside the package (after the built-in ones)."""
  if objective.name in OBJECTIVES and not replace and OBJECTIVES[objective.name] is not objective:
    raise ValueError(f"An objective named {objective.name!r} is already registered.")
  OBJECTIVES[objective.name] = objective


def enabled(config):
  """[(objective, its config block)] for every objective switched on, in registry order."""
  blocks = config.get("losses", {})
  return [(OBJECTIVES[name], blocks[name]) for name in OBJECTIVES
          if name in blocks and blocks[name].enabled]


def required_heads(config) -> tuple:
  """The `HeadSpec`s the enabled objectives need, sorted by name, each once. Two objectives
  may share a head only if they declare it identically."""
  specs = {}
  for objective, cfg in enabled(config):
    for spec in objective.heads(cfg):
      if spec.name in specs and specs[spec.name] != spec:
        raise ValueError(f"Objectives declare head {spec.name!r} differently: "
                         f"{specs[spec.name]} and {spec} ({objective.name}).")
      specs[spec.name] = spec
  return tuple(specs[name] for name in sorted(specs))


def init_aux(config, num_classes: int, feature_widths: dict | None = None) -> dict:
  """Initial non-trainable state of every enabled objective, keyed by name."""
  widths = dict(feature_widths or {})
  return {objective.name: objective.init_aux(cfg, num_classes, widths)
          for objective, cfg in enabled(config)}


def validate(config) -> None:
  """Each enabled objective checks its own block (raises ConfigError naming the key)."""
  for objective, _ in enabled(config):
    objective.validate(config)
