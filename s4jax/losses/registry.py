"""Registry of auxiliary objectives by name (the plug-in interface: losses/objective.py).

To add an objective: write `losses/<name>.py` ending in `OBJECTIVE = Objective(...)`, add
it to `_ALL` below, give it a config block `config.losses.<name>` with an `enabled` key in
`config_schema.default_config()`, and test it. The step and the loop need no change.
"""

from s4jax.losses import cwmim
from s4jax.losses import recon

_ALL = (recon.OBJECTIVE, cwmim.OBJECTIVE)
OBJECTIVES = {objective.name: objective for objective in _ALL}


def enabled(config):
  """[(objective, its config block)] for every objective switched on, in registry order."""
  blocks = config.get("losses", {})
  return [(OBJECTIVES[name], blocks[name]) for name in OBJECTIVES
          if name in blocks and blocks[name].enabled]


def required_heads(config) -> tuple[str, ...]:
  """The auxiliary model heads the enabled objectives need (sorted, no repeats)."""
  return tuple(sorted({head for objective, cfg in enabled(config)
                       for head in objective.heads(cfg)}))


def init_aux(config, num_classes: int) -> dict:
  """Initial non-trainable state of every enabled objective, keyed by name."""
  return {objective.name: objective.init_aux(cfg, num_classes)
          for objective, cfg in enabled(config)}


def validate(config) -> None:
  """Each enabled objective checks its own block (raises ConfigError naming the key)."""
  for objective, _ in enabled(config):
    objective.validate(config)
