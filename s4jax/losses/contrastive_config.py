"""`config.losses.contrastive`: defaults and checks of CSS's collaborative logit/representation
supervision (contrastive.py, docs/methods.md §5).

Kept apart from the objective so that loading a config file does not import JAX.
"""

import math

import ml_collections

from s4jax.errors import require


def defaults() -> ml_collections.ConfigDict:
  """CSS (Wang, Xie et al., ICCV 2023): prototypes, cross supervision, hard-anchor InfoNCE."""
  c = ml_collections.ConfigDict()
  c.enabled = False
  c.weight = 1.0  # contrastive loss weight before the ramp-down
  # lambda(e) = weight * exp(-rampdown * (step / total_steps)^2); 0 keeps the weight constant.
  c.rampdown = 5.0
  c.dim = 256  # D: width of the representation head and the prototypes
  # Cross supervision: the unlabelled CE trains on the representation-space labels, each
  # image weighted by its share of confident ones; False keeps the logit-space labels (the
  # ablation "+ contrastive without cross supervision").
  c.cross_supervision = True
  c.rep_threshold = 0.97  # representation confidence counted in the per-image weight
  # Share of total_steps at the start during which the cross-supervised CE uses the
  # logit-space labels instead, weighted per image the same way (CSS's --warmup epochs:
  # default 0, its README suggests 20 of 80); needs cross_supervision.
  c.warmup = 0.0
  # False (CSS): every valid pixel of the representation-space labels trains (confidence set
  # to 1), weighted per image; True: semi.threshold also applies to the representation
  # confidence of each pixel.
  c.threshold_rep_labels = False
  c.weak_threshold = 0.7  # logit confidence of unlabelled pixels used for P and the loss
  c.anchor_threshold = 0.8  # hard anchors: own-class representation softmax below this
  # Temperature of softmax_c(cos(r, P_c) / T) for the representation-space labels and the
  # hard-anchor indicator (CSS's model temperature).
  c.label_temperature = 0.5
  c.temperature = 0.5  # InfoNCE and the negative-class softmax (CSS's loss temp)
  c.prototype_momentum = 0.99  # P_c <- m P_c + (1 - m) mean(r over class-c pixels)
  c.num_anchors = 256  # anchors per present class (drawn with replacement)
  c.num_negatives = 512  # negatives per anchor
  c.strong_views = 1  # strong views whose pixels join the labelled ones (0: none)
  # Classes whose anchor x negative similarities are computed at once; each class holds
  # num_anchors x num_negatives x dim floats (128 MiB at the defaults).
  c.class_chunk = 1
  return c


def validate(config) -> None:
  cfg = config.losses.contrastive
  name = "losses.contrastive"
  require(cfg.weight >= 0, f"{name}.weight", cfg.weight, "a number >= 0")
  require(cfg.rampdown >= 0, f"{name}.rampdown", cfg.rampdown, "a number >= 0 (0 = constant)")
  for key in ("dim", "num_anchors", "num_negatives", "class_chunk"):
    require(cfg[key] >= 1, f"{name}.{key}", cfg[key], "an integer >= 1")
  require(0 <= cfg.strong_views <= 2, f"{name}.strong_views", cfg.strong_views, "0, 1 or 2")
  for key in ("rep_threshold", "weak_threshold", "anchor_threshold"):
    require(0 <= cfg[key] <= 1, f"{name}.{key}", cfg[key], "a number in [0, 1]")
  for key in ("label_temperature", "temperature"):
    require(cfg[key] > 0, f"{name}.{key}", cfg[key], "a number > 0")
  require(0 <= cfg.warmup < 1, f"{name}.warmup", cfg.warmup, "a share of total_steps in [0, 1)")
  require(
    0 <= cfg.prototype_momentum < 1,
    f"{name}.prototype_momentum",
    cfg.prototype_momentum,
    "a number in [0, 1)",
  )


def max_representation_confidence(num_classes: int, label_temperature: float) -> float:
  """The highest softmax_c(cos / T) any pixel can reach: cos(P_c) = 1, every other -1."""
  return 1.0 / (1.0 + (num_classes - 1) * math.exp(-2.0 / label_temperature))
