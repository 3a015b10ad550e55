"""`config.losses.cwmim`: defaults and checks of class-wise masked image modelling (cwmim.py).

Kept apart from the objective so that loading a config file does not import JAX.
"""

import ml_collections

from s4jax.errors import require
from s4jax.losses.recon_config import NORMS

BATCH_NORM_MODES = ("running", "batch")


def defaults() -> ml_collections.ConfigDict:
  """Class-wise masked image modelling (docs/methods.md §2; the flagship objective)."""
  c = ml_collections.ConfigDict()
  c.enabled = False
  c.patch_size = 16  # side of the masked patches, in crop pixels
  c.mask_ratio = 0.5  # share of the patches masked per image
  c.classes_per_image = 2  # class-images per image (static; x encoder batch)
  c.on_unlabelled = True  # class-wise inputs from unlabelled images too
  c.norm = "l1"  # "l1" | "l2"
  c.rec_weight = 1.0  # class-wise reconstruction
  c.fa_weight = 0.1  # feature aggregation
  c.smim_weight = 0.5  # semantic-space masked image modelling
  # BatchNorm of the extra forwards (class-wise and semantic-space): "running" (running
  # statistics; the classes stay independent) or "batch" (the statistics of the extra batch
  # itself, as a train-mode pass; not recorded). On MSRC from an ImageNet backbone the first
  # diverged and the second trained, below UniMatch: docs/methods.md §2.
  c.batch_norm = "running"
  return c


def validate(config) -> None:
  cfg = config.losses.cwmim
  require(cfg.patch_size >= 1, "losses.cwmim.patch_size", cfg.patch_size, "an integer >= 1")
  require(0 < cfg.mask_ratio < 1, "losses.cwmim.mask_ratio", cfg.mask_ratio, "a number in (0, 1)")
  require(
    cfg.classes_per_image >= 1,
    "losses.cwmim.classes_per_image",
    cfg.classes_per_image,
    "an integer >= 1",
  )
  require(cfg.norm in NORMS, "losses.cwmim.norm", cfg.norm, f"one of {NORMS}")
  require(
    cfg.batch_norm in BATCH_NORM_MODES,
    "losses.cwmim.batch_norm",
    cfg.batch_norm,
    f"one of {BATCH_NORM_MODES}",
  )
  for key in ("rec_weight", "fa_weight", "smim_weight"):
    require(cfg[key] >= 0, f"losses.cwmim.{key}", cfg[key], "a number >= 0")
  require(
    cfg.rec_weight + cfg.fa_weight + cfg.smim_weight > 0,
    "losses.cwmim.rec_weight",
    cfg.rec_weight,
    "some part of cwmim switched on (rec, fa or smim weight > 0), or losses.cwmim.enabled=False",
  )
  require(
    cfg.smim_weight == 0 or config.method != "supervised",
    "losses.cwmim.smim_weight",
    cfg.smim_weight,
    "0 with method='supervised' (the semantic-space loss needs the "
    "teacher's pseudo-labels of unlabelled images)",
  )
