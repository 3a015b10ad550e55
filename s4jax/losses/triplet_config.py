"""`config.losses.triplet`: defaults and checks of Mix-and-Match patch triplets (triplet.py).

Kept apart from the objective so that loading a config file does not import JAX.
"""

import ml_collections

from s4jax.errors import require

FEATURES = ("high", "fused", "low")


def defaults() -> ml_collections.ConfigDict:
  """Class-aware patch triplets of Mix-and-Match (docs/methods.md §3)."""
  c = ml_collections.ConfigDict()
  c.enabled = False
  c.weight = 1.0
  # Patches per image (the reference: 9), and the share of them centred on a background
  # pixel: max(1, int(share * patches)) of them when the share is > 0 (the reference's
  # rule: 1 of 9 at 0.1); the others are centred on object pixels.
  c.patches_per_image = 9
  c.background_share = 0.1
  # Patch side in the paper's pixels, drawn uniformly from this integer range and scaled by
  # crop / reference_crop (the paper's 512 crops): 64-256 px on a 321 crop are 40-160 px.
  c.side_range = (64, 256)
  # > 0: every patch has this side (paper pixels, scaled like side_range; Cityscapes: 128).
  c.fixed_side = 0
  c.reference_crop = 512
  # An object-centred candidate is rejected when more than this share of it (inside the
  # crop) is covered by the patches accepted before it; candidates_per_patch candidates are
  # drawn per object patch (the reference: 5), and rejected ones refill the count in draw
  # order when too few pass.
  c.max_covered = 0.6
  c.candidates_per_patch = 5
  # The hinge margin alpha of 1/(2N) sum max(0, alpha + |e_a - e_p|^2 - |e_a - e_n|^2).
  c.margin = 2.1
  # The embedding: a projection head (3x3 conv + BN + ReLU + 1x1 conv to embedding_dim) on
  # these features of the base method's pass, averaged over each box, L2-normalised. "high":
  # the encoder's stride-OS map (the reference pools its backbone's last map), "fused": the
  # decoder's stride-4 map, "low": the encoder's stride-4 map.
  c.features = "high"
  c.embedding_dim = 128
  # Also sample patches on unlabelled weak views, labelled by the pseudo-label of their
  # centre where its confidence is >= semi.threshold (semi-supervised methods only).
  c.on_unlabelled = False
  # Tuning mode (the paper's use): train on the triplet loss alone; the base method's
  # losses are still computed and logged, but not trained on. Needs method="supervised";
  # then export the backbone (python -m s4jax.export_backbone) and start the segmentation
  # run from it with model.pretrained (configs/shapes_triplet_tuning.py).
  c.only = False
  # Classes whose pixels count as background for the background share; empty = the
  # dataset's own (VOC, shapes: [0]; Cityscapes: the stuff classes).
  c.background_classes = ()
  return c


def validate(config) -> None:
  cfg = config.losses.triplet
  key = "losses.triplet."
  require(cfg.weight > 0, key + "weight", cfg.weight, "a number > 0")
  require(
    isinstance(cfg.patches_per_image, int) and cfg.patches_per_image >= 2,
    key + "patches_per_image",
    cfg.patches_per_image,
    "an integer >= 2",
  )
  require(
    0 <= cfg.background_share < 1,
    key + "background_share",
    cfg.background_share,
    "a share in [0, 1)",
  )
  if cfg.background_share > 0:
    require(
      max(1, int(cfg.background_share * cfg.patches_per_image)) < cfg.patches_per_image,
      key + "background_share",
      cfg.background_share,
      "a share that leaves at least one object-centred patch per image",
    )
  lo, hi = cfg.side_range
  require(
    isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi,
    key + "side_range",
    tuple(cfg.side_range),
    "(min, max) integers with 1 <= min <= max",
  )
  require(
    isinstance(cfg.fixed_side, int) and cfg.fixed_side >= 0,
    key + "fixed_side",
    cfg.fixed_side,
    "an integer >= 0 (0 = draw sides from side_range)",
  )
  require(
    isinstance(cfg.reference_crop, int) and cfg.reference_crop > 0,
    key + "reference_crop",
    cfg.reference_crop,
    "a positive integer (the paper: 512)",
  )
  require(0 < cfg.max_covered <= 1, key + "max_covered", cfg.max_covered, "a share in (0, 1]")
  require(
    isinstance(cfg.candidates_per_patch, int) and cfg.candidates_per_patch >= 1,
    key + "candidates_per_patch",
    cfg.candidates_per_patch,
    "an integer >= 1",
  )
  require(cfg.margin > 0, key + "margin", cfg.margin, "a number > 0")
  require(cfg.features in FEATURES, key + "features", cfg.features, f"one of {FEATURES}")
  require(
    isinstance(cfg.embedding_dim, int) and cfg.embedding_dim >= 1,
    key + "embedding_dim",
    cfg.embedding_dim,
    "an integer >= 1",
  )
  require(
    not cfg.on_unlabelled or config.method != "supervised",
    key + "on_unlabelled",
    cfg.on_unlabelled,
    "False with method='supervised' (unlabelled patches are labelled "
    "by the teacher's pseudo-labels)",
  )
  require(
    not cfg.only or config.method == "supervised",
    key + "only",
    cfg.only,
    "False, or method='supervised' (tuning on the triplet loss alone trains no "
    "teacher, so pseudo-labels would never improve)",
  )
  require(
    all(int(c) >= 0 for c in cfg.background_classes),
    key + "background_classes",
    tuple(cfg.background_classes),
    "class indices >= 0 (empty = the dataset's own)",
  )
