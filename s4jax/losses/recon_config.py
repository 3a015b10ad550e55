"""`config.losses.recon`: defaults and checks of the reconstruction objective (recon.py).

Kept apart from the objective so that loading a config file does not import JAX.
"""

import ml_collections

from s4jax.errors import require

NORMS = ("l1", "l2")


def defaults() -> ml_collections.ConfigDict:
  """Image reconstruction from the decoder features (docs/methods.md §1)."""
  c = ml_collections.ConfigDict()
  c.enabled = False
  c.weight = 1.0
  c.norm = "l1"  # "l1" | "l2"
  c.on_labelled = True  # reconstruct the labelled images
  c.on_strong = True  # and the unlabelled strong views (semi methods)
  # Object/background variant: two heads, each region's error normalised by its own size.
  c.split_foreground = False
  # Classes that count as background for the split; empty = the dataset's own.
  c.background_classes = ()
  return c


def validate(config) -> None:
  cfg = config.losses.recon
  require(cfg.weight >= 0, "losses.recon.weight", cfg.weight, "a number >= 0")
  require(cfg.norm in NORMS, "losses.recon.norm", cfg.norm, f"one of {NORMS}")
  require(
    cfg.on_labelled or (cfg.on_strong and config.method != "supervised"),
    "losses.recon.on_labelled",
    cfg.on_labelled,
    "True, or on_strong=True with a semi-supervised method (else recon sees no image)",
  )
  require(
    all(int(c) >= 0 for c in cfg.background_classes),
    "losses.recon.background_classes",
    tuple(cfg.background_classes),
    "class indices >= 0 (empty = the dataset's own)",
  )
