"""`config.losses.affinity`: defaults and checks of the AuxSegNet objective (affinity.py).

Kept apart from the objective so that loading a config file does not import JAX.
"""

import ml_collections

from s4jax.errors import require

STRIDES = (8, 16)
SOURCES = ("fused", "high")


# Keys that change only what evaluation computes: `--mode=eval` may set them differently from
# the run (plain and refined mIoU of one checkpoint).
EVAL_KEYS = ("refine_eval",)


def defaults() -> ml_collections.ConfigDict:
  """Auxiliary saliency and multi-label classification with cross-task affinity
  (docs/methods.md §4; Xu et al., AuxSegNet, ICCV 2021)."""
  c = ml_collections.ConfigDict()
  c.enabled = False
  c.weight = 1.0  # overall weight of the objective's loss
  # Input pixels per affinity cell: the HW x HW affinity is built on a ceil(crop / stride)
  # grid, 8 or 16 only (at 4 a 321 crop would need 6561^2 floats per image and map).
  c.stride = 16
  # Features every auxiliary head reads: "fused" (the decoder's stride-4 map, resized to the
  # affinity grid) or "high" (the encoder's stride-OS map, resized if OS != stride).
  c.source = "fused"
  c.branch_channels = 128  # width of each task branch F_t and of theta_t, phi_t (paper 128)
  # Dilations of the branch's 3x3 convs; the paper's (6, 12) at stride 8 cover the same
  # input pixels as (3, 6) at stride 16.
  c.dilations = (3, 6)
  c.classifier_dropout = 0.5  # dropout before the multi-label classifier (paper 0.5)
  c.cls_weight = 1.0  # multi-label soft margin loss
  c.sal_weight = 1.0  # saliency BCE, plain and refined
  c.seg_weight = 1.0  # CE of the refined segmentation (the plain one is the base's)
  c.on_labelled = True  # the losses on labelled images (ground-truth targets)
  c.on_unlabelled = True  # and on every strong view (confident pseudo-label targets)
  # Refined predictions A.P for segmentation and saliency, supervised like the plain ones.
  # False = the auxiliary heads alone (classifier and saliency; no affinity is built).
  c.refine_predictions = True
  # The refined losses also train the plain predictions P_t they refine (the paper). False
  # stops their gradient at P_t, so they train the affinity (branches, fusion) only: an
  # untrained A then cannot pull P_seg towards the image's average label.
  c.refined_trains_predictions = True
  # Divide the fused affinity by its row sums. The paper's code mixes A_seg and A_sal with
  # per-pair weights and does not renormalise, so its rows need not sum to 1 (False).
  c.normalize_rows = True
  # Propagate the teacher's probabilities once through its affinity, p <- A p, before the
  # pseudo-labels are thresholded (one more teacher forward of the weak view per step).
  c.refine_pseudo_labels = False
  # Evaluation scores the refined segmentation (upsampled from the affinity grid).
  c.refine_eval = False
  # Classes that are not salient (saliency target 0) and that the multi-label classifier
  # does not score; empty = the dataset's own (VOC and shapes: [0]).
  c.background_classes = ()
  return c


def validate(config) -> None:
  cfg = config.losses.affinity
  semi = config.method != "supervised"
  for key in ("weight", "cls_weight", "sal_weight", "seg_weight"):
    require(cfg[key] >= 0, f"losses.affinity.{key}", cfg[key], "a number >= 0")
  require(
    cfg.cls_weight + cfg.sal_weight > 0 or (cfg.refine_predictions and cfg.seg_weight > 0),
    "losses.affinity.cls_weight",
    cfg.cls_weight,
    "some part switched on (cls_weight, "
    "sal_weight, or seg_weight with refine_predictions > 0), or enabled=False",
  )
  require(
    cfg.stride in STRIDES,
    "losses.affinity.stride",
    cfg.stride,
    f"one of {STRIDES} (an HW x HW affinity at stride 4 does not fit)",
  )
  require(cfg.source in SOURCES, "losses.affinity.source", cfg.source, f"one of {SOURCES}")
  require(
    isinstance(cfg.branch_channels, int) and cfg.branch_channels >= 1,
    "losses.affinity.branch_channels",
    cfg.branch_channels,
    "an integer >= 1",
  )
  dilations = tuple(cfg.dilations)
  require(
    len(dilations) >= 1 and all(isinstance(d, int) and d >= 1 for d in dilations),
    "losses.affinity.dilations",
    dilations,
    "one or more integers >= 1",
  )
  require(
    0 <= cfg.classifier_dropout < 1,
    "losses.affinity.classifier_dropout",
    cfg.classifier_dropout,
    "a rate in [0, 1)",
  )
  require(
    cfg.on_labelled or (cfg.on_unlabelled and semi),
    "losses.affinity.on_labelled",
    cfg.on_labelled,
    "True, or on_unlabelled=True with a semi-supervised method (else affinity sees no image)",
  )
  require(
    cfg.refine_predictions or not cfg.refine_pseudo_labels,
    "losses.affinity.refine_pseudo_labels",
    cfg.refine_pseudo_labels,
    "False unless refine_predictions=True (the affinity is trained only through the "
    "refined predictions)",
  )
  require(
    not cfg.refine_pseudo_labels or semi,
    "losses.affinity.refine_pseudo_labels",
    cfg.refine_pseudo_labels,
    "False with method='supervised' (no pseudo-labels)",
  )
  require(
    cfg.refine_predictions or not cfg.refine_eval,
    "losses.affinity.refine_eval",
    cfg.refine_eval,
    "False unless refine_predictions=True (the affinity is trained "
    "only through the refined predictions)",
  )
  require(
    all(isinstance(c, int) and c >= 0 for c in cfg.background_classes),
    "losses.affinity.background_classes",
    tuple(cfg.background_classes),
    "class indices >= 0 (empty = the dataset's own)",
  )
