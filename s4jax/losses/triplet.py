"""Mix-and-Match patch triplets (`config.losses.triplet`), docs/methods.md §3.

Reference: Zhan, Liu, Luo, Tang, Loy, "Mix-and-Match Tuning for Self-Supervised Semantic
Segmentation", AAAI 2018, arXiv 1712.00661, code XiaohangZhan/mix-and-match. Verified from
that code (resources/create_patch.py, sampling_layers.py, the TripletLoss layer):

- 9 patches per image; max(1, int(0.1 * 9)) = 1 of them centred on a background pixel, the
  others on object pixels (ignore never); a patch's label is its centre pixel's class; side
  U[64, 256] on 512 crops (128 fixed on Cityscapes);
- object-centred candidates (5 per patch) are visited in draw order; one more than 60 %
  covered by the ones accepted before it is rejected; rejected ones refill the count in draw
  order when too few pass; background patches have no overlap rule;
- embeddings are L2-normalised pooled features;
- the graph: patches are visited in random order; each links to a random earlier patch of
  its class (so each class forms one tree) and to a random earlier patch of another class;
  the first patch of a class (of all) falls back to any other patch of its class (of another
  class);
- loss 1/(2N) sum max(0, alpha + |e_a - e_p|^2 - |e_a - e_n|^2), alpha = 2.1, with
  gradients through anchor, positive and negative.

Ours (docs/methods.md §3, "our adaptation"): an auxiliary loss on the base method's
labelled batch (optionally also on unlabelled weak views, labelled by confident
pseudo-labels), or the whole loss in tuning mode (`only`); the embedding is a projection
head on the pass's feature map, averaged over each box (cells weighted by their overlap
with it; no re-run of the backbone on crops); sides are scaled by crop / 512; the coverage
share is over the candidate's part inside the crop; static shapes (a categorical draw over
earlier nodes of the permutation); a node with no partner at all is masked out instead of
pairing with itself or a zero vector, and N counts the triplets kept. The graph spans the
global batch: every device's patches are nodes of one graph.
"""

import jax
import jax.numpy as jnp

from s4jax import augment
from s4jax import viz
from s4jax.labels import IGNORE_INDEX
from s4jax.losses import objective as objective_lib
from s4jax.losses import triplet_config
from s4jax.models import heads

HEAD = "triplet"


# ---- patch sampling ------------------------------------------------------------------------


def patch_counts(cfg) -> tuple[int, int]:
  """(background-centred, object-centred) patches per image (the reference's rule)."""
  p = int(cfg.patches_per_image)
  background = max(1, int(cfg.background_share * p)) if cfg.background_share > 0 else 0
  return background, p - background


def side_range_pixels(cfg, crop: int) -> tuple[float, float, float]:
  """(min, max) side in paper pixels and the scale to crop pixels (crop / reference)."""
  lo, hi = (cfg.fixed_side, cfg.fixed_side) if cfg.fixed_side else tuple(cfg.side_range)
  return int(lo), int(hi), crop / float(cfg.reference_crop)


def _draw_sides(key, count, lo, hi, scale):
  paper = jax.random.randint(key, (count,), lo, hi + 1)
  return jnp.maximum(jnp.round(paper * scale), 1.0).astype(jnp.int32)


def _boxes(centres, sides, height, width):
  """int32 [..., 4] (y0, x0, y1, x1), half-open, clipped to the crop; each holds its centre."""
  y0 = centres[..., 0] - sides // 2
  x0 = centres[..., 1] - sides // 2
  return jnp.stack(
    [
      jnp.clip(y0, 0, height),
      jnp.clip(x0, 0, width),
      jnp.clip(y0 + sides, 0, height),
      jnp.clip(x0 + sides, 0, width),
    ],
    -1,
  )


def _box_mask(box, height, width):
  rows = (jnp.arange(height) >= box[0]) & (jnp.arange(height) < box[2])
  cols = (jnp.arange(width) >= box[1]) & (jnp.arange(width) < box[3])
  return rows[:, None] & cols[None, :]


def overlap_rule(boxes, height: int, width: int, max_covered: float):
  """bool [C]: which candidates (visited in order) pass; a candidate fails when more than
  `max_covered` of its area is covered by the candidates that passed before it."""

  def visit(union, box):
    mask = _box_mask(box, height, width)
    area = (box[2] - box[0]) * (box[3] - box[1])
    covered = (union & mask).sum() / jnp.maximum(area, 1)
    passed = covered <= max_covered
    return union | (mask & passed), passed

  _, passed = jax.lax.scan(visit, jnp.zeros((height, width), bool), boxes)
  return passed


def _centres(key, scope, count):
  """`count` pixel centres drawn uniformly from `scope` [H, W] (with replacement): a rank
  among the allowed pixels, found in their running count (O(H W) memory, where a
  categorical draw would hold count x H x W noise)."""
  width = scope.shape[1]
  running = jnp.cumsum(scope.reshape(-1).astype(jnp.int32))
  rank = jax.random.randint(key, (count,), 0, jnp.maximum(running[-1], 1))
  flat = jnp.searchsorted(running, rank, side="right")  # the first pixel with count > rank
  return jnp.stack([flat // width, flat % width], -1).astype(jnp.int32)


def sample_image_patches(key, labels, cfg, background_classes):
  """Patches of one image (static count `cfg.patches_per_image`).

  Args:
    key: its key.
    labels: int [H, W], 255 = ignore (padding, unconfident pseudo-labels).
    cfg: the `losses.triplet` block.
    background_classes: the classes a background-centred patch is centred on.

  Returns:
    {"boxes": int32 [P, 4] (y0, x0, y1, x1), half-open, clipped to the image;
     "centres": int32 [P, 2]; "sides": int32 [P], before clipping; "labels": int32 [P],
     the centre pixel's class, 255 = dropped (the image has no labelled pixel);
     "background": bool [P], drawn as background-centred; "passed": bool [P], passed the
     overlap rule (background patches: True); "candidates": int32 [C, 4] the object
     candidates in draw order, "candidate_passed": bool [C]}. Object patches come first.
  """
  height, width = labels.shape
  labels = labels.astype(jnp.int32)
  num_background, num_object = patch_counts(cfg)
  lo, hi, scale = side_range_pixels(cfg, max(height, width))
  valid = labels != IGNORE_INDEX
  is_background = valid & jnp.isin(labels, jnp.asarray(background_classes, jnp.int32))
  is_object = valid & ~is_background
  # The reference's fallbacks: no object pixel -> object patches on background, and back;
  # no labelled pixel at all -> anywhere, and the patches are dropped by their label.
  object_scope = jnp.where(is_object.any(), is_object, is_background)
  background_scope = jnp.where(is_background.any(), is_background, is_object)
  object_scope = jnp.where(object_scope.any(), object_scope, True)
  background_scope = jnp.where(background_scope.any(), background_scope, True)

  k_obj, k_obj_side, k_bg, k_bg_side = jax.random.split(key, 4)
  num_candidates = num_object * int(cfg.candidates_per_patch)
  candidate_centres = _centres(k_obj, object_scope, num_candidates)
  candidate_sides = _draw_sides(k_obj_side, num_candidates, lo, hi, scale)
  candidates = _boxes(candidate_centres, candidate_sides, height, width)
  passed = overlap_rule(candidates, height, width, float(cfg.max_covered))
  # Those that passed in draw order, then (if too few passed) the rejected ones in draw order.
  index = jnp.arange(num_candidates)
  chosen = jnp.argsort(jnp.where(passed, index, num_candidates + index))[:num_object]
  bg_centres = _centres(k_bg, background_scope, num_background)
  bg_sides = _draw_sides(k_bg_side, num_background, lo, hi, scale)
  bg_boxes = _boxes(bg_centres, bg_sides, height, width)
  centres = jnp.concatenate([candidate_centres[chosen], bg_centres])
  return {
    "boxes": jnp.concatenate([candidates[chosen], bg_boxes]),
    "centres": centres,
    "sides": jnp.concatenate([candidate_sides[chosen], bg_sides]),
    "labels": labels[centres[:, 0], centres[:, 1]],
    "background": jnp.arange(num_object + num_background) >= num_object,
    "passed": jnp.concatenate([passed[chosen], jnp.ones((num_background,), bool)]),
    "candidates": candidates,
    "candidate_passed": passed,
  }


def sample_patches(key, labels, cfg, background_classes):
  """`sample_image_patches` of every image of `labels` [n, H, W], one key each (the same
  draws on any number of devices); every output has a leading [n]."""
  keys = jax.random.split(key, labels.shape[0])
  return jax.vmap(lambda k, y: sample_image_patches(k, y, cfg, background_classes))(keys, labels)


# ---- embeddings ----------------------------------------------------------------------------


def _cell_overlap(start, stop, size: int, cells: int):
  """[..., cells]: pixels of [start, stop) in each cell (cell i spans [i, i+1) * size/cells)."""
  edges = jnp.arange(cells + 1, dtype=jnp.float32) * (size / cells)
  lo = jnp.maximum(start[..., None].astype(jnp.float32), edges[:-1])
  hi = jnp.minimum(stop[..., None].astype(jnp.float32), edges[1:])
  return jnp.maximum(hi - lo, 0.0)


def box_pool(features, boxes, image_size):
  """Mean of `features` [n, h, w, D] over each box [n, P, 4] given in pixels of an image of
  `image_size` (H, W): each cell weighted by the pixels of the box it covers (the box's
  pixel mask area-resized to the grid). -> [n, P, D]."""
  height, width = image_size
  grid_h, grid_w = features.shape[1:3]
  wy = _cell_overlap(boxes[..., 0], boxes[..., 2], height, grid_h)
  wx = _cell_overlap(boxes[..., 1], boxes[..., 3], width, grid_w)
  total = jnp.einsum("npi,npj,nijd->npd", wy, wx, features.astype(jnp.float32))
  area = wy.sum(-1) * wx.sum(-1)
  return total / jnp.maximum(area, 1e-6)[..., None]


def l2_normalise(x, eps: float = 1e-12):
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


# ---- the graph and the loss ----------------------------------------------------------------


def build_graph(key, labels):
  """Mix-and-Match's graph on nodes with `labels` [N] (255 = not a node).

  Nodes are visited in a random order; each draws its positive uniformly among the earlier
  nodes of its class (falling back to any other node of its class) and its negative among
  the earlier nodes of other classes (falling back to any node of another class).

  Returns {"order": int32 [N] visiting position of each node, "positive", "negative": int32
  [N] partner indices (the node itself where it has none), "has_positive", "has_negative":
  bool [N]}.
  """
  k_order, k_pos, k_neg = jax.random.split(key, 3)
  n = labels.shape[0]
  labels = labels.astype(jnp.int32)
  node = labels != IGNORE_INDEX
  order = jnp.argsort(jax.random.permutation(k_order, n)).astype(jnp.int32)
  both = node[:, None] & node[None, :]
  same = both & (labels[:, None] == labels[None, :]) & ~jnp.eye(n, dtype=bool)
  other = both & (labels[:, None] != labels[None, :])
  earlier = order[None, :] < order[:, None]  # [i, j]: j was visited before i

  def draw(k, allowed):
    before = allowed & earlier
    pool = jnp.where(before.any(-1, keepdims=True), before, allowed)
    has = pool.any(-1)
    chosen = jax.random.categorical(k, jnp.where(pool, 0.0, -jnp.inf), axis=-1)
    return jnp.where(has, chosen, jnp.arange(n)).astype(jnp.int32), has

  positive, has_positive = draw(k_pos, same)
  negative, has_negative = draw(k_neg, other)
  return {
    "order": order,
    "positive": positive,
    "negative": negative,
    "has_positive": has_positive,
    "has_negative": has_negative,
  }


def triplet_loss(embeddings, positive, negative, mask, margin: float):
  """sum_i mask_i max(0, margin + |e_i - e_p(i)|^2 - |e_i - e_n(i)|^2) / (2 sum_i mask_i).

  Returns (loss, per-anchor {"d_pos", "d_neg", "hinge"})."""
  d_pos = jnp.sum(jnp.square(embeddings - embeddings[positive]), axis=-1)
  d_neg = jnp.sum(jnp.square(embeddings - embeddings[negative]), axis=-1)
  hinge = jnp.maximum(margin + d_pos - d_neg, 0.0)
  mask = mask.astype(jnp.float32)
  loss = jnp.sum(hinge * mask) / (2.0 * jnp.maximum(mask.sum(), 1.0))
  return loss, {"d_pos": d_pos, "d_neg": d_neg, "hinge": hinge}


# ---- the objective -------------------------------------------------------------------------


def _background(ctx_background, cfg):
  return (
    tuple(int(c) for c in cfg.background_classes)
    if len(cfg.background_classes)
    else tuple(ctx_background)
  )


def _unlabelled_class_map(pseudo, confidence, valid, threshold):
  keep = (confidence >= threshold) & (valid > 0)
  return jnp.where(keep, pseudo, IGNORE_INDEX).astype(jnp.int32)


def _sources(ctx, cfg):
  """[(features [n, h, w, C], class map [n, H, W])] of the images the patches come from."""
  sources = [(getattr(ctx.features["labelled"], cfg.features), ctx.labelled_mask.astype(jnp.int32))]
  if cfg.on_unlabelled and ctx.has_unlabelled:
    if "weak" in ctx.features:  # the weak view's own train-mode pass (FixMatch, UniMatch)
      class_map = _unlabelled_class_map(ctx.pseudo, ctx.confidence, ctx.weak_valid, ctx.threshold)
      sources.append((getattr(ctx.features["weak"], cfg.features), class_map))
    else:  # UniMatch V2 has no weak pass: strong view 1 with its CutMixed targets
      view = ctx.strong_views[0]
      class_map = _unlabelled_class_map(view.pseudo, view.confidence, view.valid, ctx.threshold)
      sources.append((getattr(ctx.features["strong1"], cfg.features), class_map))
  return sources


def _loss(ctx: objective_lib.StepContext, cfg, aux):
  k_patches, k_graph = jax.random.split(ctx.rng)
  size = ctx.labelled_image.shape[1:3]
  background = _background(ctx.background_classes, cfg)
  sources = _sources(ctx, cfg)
  patches = [
    sample_patches(k, class_map, cfg, background)
    for k, (_, class_map) in zip(jax.random.split(k_patches, len(sources)), sources)
  ]
  # One head application over every source, so its BatchNorm sees one (global) batch.
  projected = ctx.head(HEAD, jnp.concatenate([f for f, _ in sources]), train=True)
  boxes = jnp.concatenate([p["boxes"] for p in patches])
  labels = jnp.concatenate([p["labels"] for p in patches]).reshape(-1)
  embeddings = l2_normalise(box_pool(projected, boxes, size).reshape(labels.shape[0], -1))
  graph = build_graph(k_graph, labels)
  kept = (labels != IGNORE_INDEX) & graph["has_positive"] & graph["has_negative"]
  loss, parts = triplet_loss(
    embeddings, graph["positive"], graph["negative"], kept, float(cfg.margin)
  )
  kept_f = kept.astype(jnp.float32)
  count = jnp.maximum(kept_f.sum(), 1.0)
  n_l = ctx.labelled_image.shape[0] * int(cfg.patches_per_image)
  metrics = {
    "loss": loss,
    "triplets": kept_f.sum(),
    "patches_labelled": (labels[:n_l] != IGNORE_INDEX).sum().astype(jnp.float32),
    "distance_positive": (parts["d_pos"] * kept_f).sum() / count,
    "distance_negative": (parts["d_neg"] * kept_f).sum() / count,
    "active": ((parts["hinge"] > 0) * kept_f).sum() / count,
  }
  if len(sources) > 1:
    metrics["patches_unlabelled"] = (labels[n_l:] != IGNORE_INDEX).sum().astype(jnp.float32)
  return cfg.weight * loss, metrics, aux


def _heads(cfg):
  return (heads.HeadSpec(HEAD, "projection", channels=int(cfg.embedding_dim), source=cfg.features),)


def _replaces_base(cfg) -> bool:
  return bool(cfg.only)


# ---- the evaluation picture ----------------------------------------------------------------


def _segment_distance(points, start, end):
  """Distance of `points` [H, W, 2] to the segments start-end [E, 2] -> [E, H, W]."""
  start, end = start[:, None, None], end[:, None, None]
  direction = end - start
  length2 = jnp.maximum(jnp.sum(direction * direction, -1), 1e-6)
  t = jnp.clip(jnp.sum((points - start) * direction, -1) / length2, 0.0, 1.0)
  nearest = start + t[..., None] * direction
  return jnp.sqrt(jnp.sum(jnp.square(points - nearest), -1))


def draw_patches(image, boxes, colours, shown, edges, edge_colours, edge_shown, thickness: int):
  """One image [H, W, 3] with box outlines (colour per box) over edge segments between box
  centres (`edges` [E, 2] box indices, a colour each); `shown` / `edge_shown` bool."""
  height, width = image.shape[:2]
  ys, xs = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
  points = jnp.stack([ys, xs], -1).astype(jnp.float32) + 0.5
  centres = jnp.stack([boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]], -1) / 2.0
  on_edge = _segment_distance(points, centres[edges[:, 0]], centres[edges[:, 1]]) <= thickness / 2.0
  for e in range(edges.shape[0]):
    image = jnp.where((on_edge[e] & edge_shown[e])[..., None], edge_colours[e], image)
  for b in range(boxes.shape[0]):
    y0, x0, y1, x1 = boxes[b]
    inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    border = inside & (
      (ys < y0 + thickness)
      | (ys >= y1 - thickness)
      | (xs < x0 + thickness)
      | (xs >= x1 - thickness)
    )
    image = jnp.where((border & shown[b])[..., None], colours[b], image)
  return image


def _visualise(model, variables, images, masks, rng, cfg):
  """input | patches coloured by class with the class trees (positive edges, the anchor's
  class colour) | the same patches with the negative edges (white).

  Patches are drawn from the shown images' ground truth; the graph is built over each
  image's own patches (the training graph spans the whole batch, whose cross-image edges
  could not be drawn)."""
  del variables
  n, height, width = images.shape[:3]
  k_patches, k_graph = jax.random.split(rng)
  # The dataset's background classes are not known here: VOC's and shapes' (0) unless the
  # block names them.
  background = _background((0,), cfg)
  patches = sample_patches(k_patches, masks.astype(jnp.int32), cfg, background)
  graphs = jax.vmap(build_graph)(jax.random.split(k_graph, n), patches["labels"])
  palette = augment.normalize(
    jnp.asarray(viz.make_palette(max(model.num_classes, 1)), jnp.float32) / 255.0
  )
  white = augment.normalize(jnp.ones((3,), jnp.float32))
  thickness = max(1, round(min(height, width) / 128))
  node = patches["labels"] != IGNORE_INDEX
  index = jnp.broadcast_to(jnp.arange(node.shape[1]), node.shape)

  def draw(image, boxes, labels, shown, partner, has, edge_colours):
    edges = jnp.stack([jnp.arange(boxes.shape[0]), partner], -1)
    return draw_patches(
      image, boxes, palette[labels], shown, edges, edge_colours, has & shown, thickness
    )

  trees = jax.vmap(draw)(
    images,
    patches["boxes"],
    patches["labels"],
    node,
    graphs["positive"],
    graphs["has_positive"],
    palette[patches["labels"]],
  )
  negatives = jax.vmap(draw)(
    images,
    patches["boxes"],
    patches["labels"],
    node,
    graphs["negative"],
    graphs["has_negative"],
    jnp.broadcast_to(white, (*index.shape, 3)),
  )
  return {"triplet": jnp.stack([images, trees, negatives], axis=1)}


OBJECTIVE = objective_lib.Objective(
  name="triplet",
  heads=_heads,
  loss=_loss,
  validate=triplet_config.validate,
  visualise=_visualise,
  replaces_base=_replaces_base,
)
