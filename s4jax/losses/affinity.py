"""Auxiliary saliency and multi-label classification with cross-task affinity
(`config.losses.affinity`), docs/methods.md §4.

Reference: Xu et al., "Leveraging Auxiliary Tasks with Affinity Learning for Weakly
Supervised Semantic Segmentation" (AuxSegNet), ICCV 2021, arXiv 2107.11787, code
xulianuwa/AuxSegNet. As in its code (network/AuxSegNet.py, step/train_AuxAff.py):

- a multi-label classifier (global average pooling, dropout 0.5, 1x1 conv) trained with the
  multi-label soft margin loss; a saliency map (1 channel, BCE with logits) predicted from
  its own feature branch F_sal; each dense task t in {seg, sal} has a branch F_t of dilated
  3x3 convs + ReLU and 1x1 projections theta_t, phi_t;
- task affinities A_t = softmax_row(theta_t(F_t) phi_t(F_t)^T) (HW x HW, no scaling);
- cross-task weights w = softmax_tasks(conv1x1(relu(conv3x3([A_seg, A_sal])))) with the two
  affinities stacked as a 2-channel HW x HW image; A = w_seg * A_seg + w_sal * A_sal;
- refined predictions P~_t = A . P_t of the *logits*, upsampled to the input and supervised
  like the plain ones; no loss on the affinity itself.

Our adaptation (docs/methods.md §4, "our"):

- Segmentation is the base network's: P_seg is the DeepLabV3+ classifier on the fused
  features, resized to the affinity grid, and its plain CE is the base method's own loss
  (L_x, L_s); the objective adds L_cls + BCE(P_sal) + BCE(P~_sal) + CE(P~_seg).
- The heads read `source` features (decoder "fused" or encoder "high") resized to a
  ceil(H / stride) x ceil(W / stride) grid, stride 8 or 16 only; the saliency head (a
  "dense" head) reads F_sal, as the paper's saliency comes from its branch.
- Targets: labelled images use the ground truth (255 ignored); every strong view uses its
  pasted pseudo-labels where c >= tau (and valid), with the L_s normalisation (divided by
  the valid pixels). Saliency = label not in `background_classes`; multi-label = the
  classes present, background classes not scored, images with no target pixel skipped.
- `normalize_rows` (default on) divides A by its row sums: the elementwise mix of two
  row-stochastic maps is not row-stochastic unless w is constant along a row, and the
  paper's code does not renormalise (False reproduces it).
- `refine_pseudo_labels`: the teacher's probabilities on the weak view, resized to the
  grid, are propagated once through the teacher's A and renormalised (p <- A p), then
  upsampled to the crop before the pseudo-labels are thresholded (a target hook; one more
  inference forward of the weak view).
- `refine_eval`: evaluation scores the refined segmentation (an eval hook).
- `refined_trains_predictions = False` (not the paper) stops the refined losses' gradient at
  P_t: they then train the affinity only.
- Loss: weight * mean over {labelled, mean over strong views} of
  cls_weight L_cls + sal_weight (BCE + BCE~) + seg_weight CE~.

Memory: every image of a group holds several HW x HW float32 maps (HW = grid cells); see
`affinity_map_bytes` and docs/methods.md §4 for the measured figures.
"""

import jax
import jax.numpy as jnp

from s4jax import augment
from s4jax.labels import IGNORE_INDEX
from s4jax.losses import affinity_config
from s4jax.losses import objective as objective_lib
from s4jax.losses import supervised
from s4jax.methods import base as method_base
from s4jax.models import heads

CLASSIFIER = "affinity_classifier"
SAL_BRANCH = "affinity_sal_branch"
SALIENCY = "affinity_saliency"
SEG_BRANCH = "affinity_seg_branch"
FUSION = "affinity_fusion"
# Which entry of the Segmenter's output dict holds each feature source.
_OUTPUT_KEY = {"fused": "features", "high": "high"}


# ---- the pieces, as pure functions ------------------------------------------------------


def grid_shape(height: int, width: int, stride: int) -> tuple[int, int]:
  """Cells of the affinity grid for an input of height x width."""
  return -(-height // stride), -(-width // stride)


def affinity_map_bytes(height: int, width: int, stride: int) -> int:
  """Bytes of one float32 HW x HW map of one image at `stride`."""
  cells = grid_shape(height, width, stride)
  return 4 * (cells[0] * cells[1]) ** 2


def to_grid(maps, grid):
  """[N, h, w, C] -> float32 [N, *grid, C]: area-like (antialiased linear) downsampling,
  linear when upsampling; the identity when the size already matches."""
  maps = maps.astype(jnp.float32)
  if tuple(maps.shape[1:3]) == tuple(grid):
    return maps
  return jax.image.resize(
    maps, (maps.shape[0], *grid, maps.shape[-1]), method="linear", antialias=True
  )


def upsample(maps, size):
  """Grid maps [N, h, w, C] -> bilinear float32 [N, *size, C] (half-pixel centres)."""
  maps = maps.astype(jnp.float32)
  return jax.image.resize(maps, (maps.shape[0], *size, maps.shape[-1]), method="bilinear")


def task_affinity(theta, phi):
  """A_t = softmax_row(theta phi^T): [N, h, w, C] twice -> [N, hw, hw], rows sum to 1."""
  n, c = theta.shape[0], theta.shape[-1]
  logits = jnp.einsum(
    "nic,njc->nij",
    theta.reshape(n, -1, c).astype(jnp.float32),
    phi.reshape(n, -1, c).astype(jnp.float32),
  )
  return jax.nn.softmax(logits, axis=-1)


def fuse_affinities(stacked, weights, normalize_rows: bool = True):
  """A = sum_t w_t * A_t over the last axis of [N, hw, hw, T]; rows renormalised to 1 with
  `normalize_rows` (the paper's code does not)."""
  fused = (stacked * weights).sum(-1)
  if normalize_rows:
    fused = fused / jnp.maximum(fused.sum(-1, keepdims=True), 1e-12)
  return fused


def refine(affinity, maps):
  """P~ = A . P: [N, hw, hw] x grid maps [N, h, w, C] -> [N, h, w, C]."""
  n, h, w, c = maps.shape
  out = jnp.einsum("nij,njc->nic", affinity, maps.reshape(n, h * w, c).astype(jnp.float32))
  return out.reshape(n, h, w, c)


def decoder_logits(decoder_params, fused):
  """The DeepLabV3+ classifier (a 1x1 conv of `params["decoder"]["classifier"]`) on fused
  stride-4 features: the stride-4 segmentation logits, float32, differentiable."""
  classifier = decoder_params["classifier"]
  kernel = classifier["kernel"].reshape(classifier["kernel"].shape[-2:])
  return jnp.einsum("nhwc,ck->nhwk", fused.astype(jnp.float32), kernel) + classifier["bias"]


def bce_with_logits(logits, targets):
  """Per-element binary cross-entropy of logits against targets in [0, 1] (stable)."""
  logits = logits.astype(jnp.float32)
  # max(x, 0) - x t + log(1 + e^-|x|): no cancellation for large |x| (unlike log(1 + e^x) - x t)
  return (
    jnp.maximum(logits, 0.0)
    - logits * targets.astype(jnp.float32)
    + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  )


def multilabel_soft_margin_loss(logits, targets, class_mask, image_weight):
  """torch's multilabel_soft_margin_loss with scored classes and images.

  Args:
    logits: [N, K] image-level logits.
    targets: [N, K] in {0, 1}.
    class_mask: [K], 1 for the classes that are scored (mean over them per image).
    image_weight: [N], 1 for the images that count (mean over them).
  """
  class_mask = class_mask.astype(jnp.float32)
  per_image = (bce_with_logits(logits, targets) * class_mask).sum(-1) / jnp.maximum(
    class_mask.sum(), 1.0
  )
  image_weight = image_weight.astype(jnp.float32)
  return (per_image * image_weight).sum() / jnp.maximum(image_weight.sum(), 1.0)


def is_object(labels, background_classes):
  """1 where `labels` is not a background class (255 counts as background: weight it 0)."""
  labels = labels.astype(jnp.int32)
  out = labels != IGNORE_INDEX
  for c in background_classes:
    out &= labels != int(c)
  return out.astype(jnp.float32)


def present_classes(labels, pixel_weight, num_classes: int):
  """[N, K] 1 for the classes with some pixel of weight > 0 (255 never counts)."""
  one_hot = jax.nn.one_hot(labels.astype(jnp.int32), num_classes, dtype=jnp.float32)
  return ((one_hot * (pixel_weight > 0)[..., None]).sum(axis=(1, 2)) > 0).astype(jnp.float32)


def weighted_mean(values, weight, denominator):
  """sum(values * weight) / max(denominator, 1) over the global batch."""
  return (values * weight).sum() / jnp.maximum(denominator, 1.0)


# ---- the heads, applied through any `head(name, x)` ------------------------------------


def branch_outputs(head, grid_features, cfg):
  """F_sal and its saliency logits [N, h, w, 1]; with `refine_predictions` also the fused
  cross-task affinity [N, hw, hw] and the fusion's mean weight on the saliency affinity."""
  sal = head(SAL_BRANCH, grid_features)
  out = {"saliency": head(SALIENCY, sal["features"])}
  if cfg.refine_predictions:
    out["affinity"], out["sal_share"] = cross_task_affinity(
      head, head(SEG_BRANCH, grid_features), sal, cfg.normalize_rows
    )
  return out


def cross_task_affinity(head, seg, sal, normalize_rows: bool):
  """The fused affinity A [N, hw, hw] from the two branches' projections, and the mean
  fusion weight of the saliency affinity. The only HW x HW part of the objective."""
  stacked = jnp.stack(
    [task_affinity(seg["theta"], seg["phi"]), task_affinity(sal["theta"], sal["phi"])], axis=-1
  )
  weights = head(FUSION, stacked)
  return fuse_affinities(stacked, weights, normalize_rows), weights[..., 1].mean()


def _module_outputs(module, images, cfg, *, with_segmentation: bool, train: bool = False):
  """Inside `model.apply(..., method=...)`: the network's forward (inference mode), then the
  affinity heads on its features; with `with_segmentation` the grid segmentation logits."""
  out = module(images, train=train)
  grid = grid_shape(*images.shape[1:3], cfg.stride)
  result = branch_outputs(
    lambda name, x: module.head(name, x), to_grid(out[_OUTPUT_KEY[cfg.source]], grid), cfg
  )
  if with_segmentation:
    seg = decoder_logits(module.variables["params"]["decoder"], out["features"])
    result["segmentation"] = to_grid(seg, grid)
  return result


# ---- the loss ---------------------------------------------------------------------------


def _background(ctx, cfg):
  return tuple(cfg.background_classes) if len(cfg.background_classes) else ctx.background_classes


def _group_loss(ctx, cfg, key, source_features, fused, labels, pixel_weight, denominator):
  """Every loss term of one group of images (labelled, or one strong view).

  `pixel_weight` says which pixels carry a target (and how much), `denominator` what the
  pixel sums are divided by (labelled: the labelled pixels; unlabelled: the valid pixels,
  the L_s form)."""
  size = labels.shape[1:3]
  grid = grid_shape(*size, cfg.stride)
  background = _background(ctx, cfg)
  terms = {}
  total = jnp.zeros((), jnp.float32)

  if cfg.cls_weight > 0:
    logits = ctx.head(CLASSIFIER, source_features, train=True, rng=key)
    targets = present_classes(labels, pixel_weight, ctx.num_classes)
    class_mask = jnp.ones((ctx.num_classes,), jnp.float32)
    for c in background:
      if int(c) < ctx.num_classes:
        class_mask = class_mask.at[int(c)].set(0.0)
    image_weight = (pixel_weight.sum(axis=(1, 2)) > 0).astype(jnp.float32)
    terms["loss_cls"] = multilabel_soft_margin_loss(logits, targets, class_mask, image_weight)
    total += cfg.cls_weight * terms["loss_cls"]

  outputs = branch_outputs(lambda name, x: ctx.head(name, x), to_grid(source_features, grid), cfg)
  saliency_target = is_object(labels, background)
  if cfg.sal_weight > 0:
    plain = bce_with_logits(upsample(outputs["saliency"], size)[..., 0], saliency_target)
    terms["loss_sal"] = weighted_mean(plain, pixel_weight, denominator)
    total += cfg.sal_weight * terms["loss_sal"]

  if cfg.refine_predictions:
    segmentation = to_grid(decoder_logits(ctx.params["decoder"], fused), grid)
    saliency = outputs["saliency"]
    if not cfg.refined_trains_predictions:
      segmentation, saliency = jax.lax.stop_gradient((segmentation, saliency))
    refined_seg = refine(outputs["affinity"], segmentation)
    refined_sal = refine(outputs["affinity"], saliency)
    ce, _ = supervised.pixel_cross_entropy(upsample(refined_seg, size), labels)
    terms["loss_seg_refined"] = weighted_mean(ce, pixel_weight, denominator)
    total += cfg.seg_weight * terms["loss_seg_refined"]
    if cfg.sal_weight > 0:
      refined = bce_with_logits(upsample(refined_sal, size)[..., 0], saliency_target)
      terms["loss_sal_refined"] = weighted_mean(refined, pixel_weight, denominator)
      total += cfg.sal_weight * terms["loss_sal_refined"]
    terms["sal_share"] = outputs["sal_share"]
  return total, terms


def _features_of(ctx, group, fallback_fused, source):
  features = ctx.features.get(group)
  if features is None:  # a context without named features (fused features only)
    return fallback_fused
  return getattr(features, source)


def _loss(ctx: objective_lib.StepContext, cfg, aux):
  keys = jax.random.split(ctx.rng, 1 + len(ctx.strong_views))
  parts, metrics = [], {}
  if cfg.on_labelled:
    labels = ctx.labelled_mask.astype(jnp.int32)
    weight = ctx.labelled_valid()
    loss_l, terms = _group_loss(
      ctx,
      cfg,
      keys[0],
      _features_of(ctx, "labelled", ctx.labelled_features, cfg.source),
      ctx.labelled_features,
      labels,
      weight,
      weight.sum(),
    )
    parts.append(loss_l)
    metrics.update({f"{k}_labelled": v for k, v in terms.items()})
  if cfg.on_unlabelled and ctx.strong_views:
    view_losses, view_terms = [], []
    for i, view in enumerate(ctx.strong_views):
      weight = (view.confidence >= ctx.threshold).astype(jnp.float32) * view.valid
      if view.weight is not None:
        weight = weight * view.weight
      loss_v, terms = _group_loss(
        ctx,
        cfg,
        keys[1 + i],
        _features_of(ctx, f"strong{i + 1}", view.features, cfg.source),
        view.features,
        view.pseudo,
        weight,
        view.valid.sum(),
      )
      view_losses.append(loss_v)
      view_terms.append(terms)
    parts.append(sum(view_losses) / len(view_losses))
    for k in view_terms[0]:
      metrics[f"{k}_unlabelled"] = sum(t[k] for t in view_terms) / len(view_terms)
  loss = sum(parts) / len(parts)
  metrics["loss"] = loss
  return cfg.weight * loss, metrics, aux


# ---- hooks ------------------------------------------------------------------------------


def propagate_probabilities(affinity, probs, grid):
  """The target hook's propagation: probabilities [N, H, W, K] -> grid -> A p, renormalised
  over the classes -> bilinear back to [N, H, W, K] (a distribution per pixel)."""
  size = probs.shape[1:3]
  refined = refine(affinity, to_grid(probs, grid))
  refined = refined / jnp.maximum(refined.sum(-1, keepdims=True), 1e-12)
  refined = jnp.clip(upsample(refined, size), 0.0, 1.0)
  return refined / jnp.maximum(refined.sum(-1, keepdims=True), 1e-12)


def _label_metrics(pseudo, confidence, valid, hidden, threshold, suffix):
  valid = valid.astype(jnp.float32)
  confident = (confidence >= threshold).astype(jnp.float32) * valid
  metrics = {f"confident_{suffix}": confident.sum() / jnp.maximum(valid.sum(), 1.0)}
  if hidden is not None:
    known = valid * (hidden != IGNORE_INDEX)
    correct = (pseudo == hidden.astype(jnp.int32)).astype(jnp.float32)
    metrics[f"accuracy_{suffix}"] = (correct * known).sum() / jnp.maximum(known.sum(), 1.0)
    known_confident = known * confident
    metrics[f"accuracy_confident_{suffix}"] = (correct * known_confident).sum() / jnp.maximum(
      known_confident.sum(), 1.0
    )
  return metrics


def _targets(tctx: objective_lib.TargetContext, cfg, aux):
  """`refine_pseudo_labels`: the teacher's probabilities propagated once through the
  teacher's cross-task affinity of the weak view, before thresholding."""
  del aux
  targets = tctx.targets
  if not cfg.refine_pseudo_labels:
    return targets, {}
  grid = grid_shape(*targets.pseudo.shape[1:3], cfg.stride)
  affinity = tctx.teacher_apply(
    tctx.weak_image,
    method=lambda module, images, train: _module_outputs(
      module, images, cfg, with_segmentation=False, train=train
    )["affinity"],
  )
  probs = propagate_probabilities(affinity, jax.nn.softmax(targets.logits, axis=-1), grid)
  pseudo = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  confidence = jnp.max(probs, axis=-1)
  new = method_base.Targets(
    pseudo=pseudo,
    confidence=confidence,
    weight=targets.weight,
    logits=jnp.log(jnp.maximum(probs, 1e-12)),
  )
  valid = tctx.weak_valid.astype(jnp.float32)
  threshold = float(tctx.config.semi.threshold)
  metrics = {
    "changed": weighted_mean((pseudo != targets.pseudo).astype(jnp.float32), valid, valid.sum())
  }
  metrics.update(
    _label_metrics(targets.pseudo, targets.confidence, valid, tctx.hidden_mask, threshold, "before")
  )
  metrics.update(_label_metrics(pseudo, confidence, valid, tctx.hidden_mask, threshold, "after"))
  return new, metrics


def refined_segmentation(model, variables, images, cfg):
  """The refined segmentation logits A . P_seg of `images`, upsampled to their size."""

  def forward(module, images):
    out = _module_outputs(module, images, cfg, with_segmentation=True)
    return refine(out["affinity"], out["segmentation"])

  return upsample(model.apply(variables, images, method=forward), images.shape[1:3])


def _refine_eval(model, variables, images, logits, cfg):
  if not cfg.refine_eval:
    return logits
  return refined_segmentation(model, variables, images, cfg)


def _heatmap(values, size):
  """[N, h, w] in [0, 1] -> [N, *size] nearest-neighbour (cells stay visible)."""
  n = values.shape[0]
  return jax.image.resize(values, (n, *size), method="nearest")


def _visualise(model, variables, images, masks, rng, cfg):
  """input | saliency | the affinity row of the most salient cell (brightest = the cells it
  attends to most; that cell is marked blue), all in normalised image space."""
  del masks, rng
  n, h, w = images.shape[:3]
  out = model.apply(
    variables,
    images,
    method=lambda module, images: _module_outputs(module, images, cfg, with_segmentation=False),
  )
  mean = jnp.asarray(augment.IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(augment.IMAGENET_STD, jnp.float32)
  unit = jnp.clip(images * std + mean, 0.0, 1.0)

  def gray(values):
    return augment.normalize(jnp.repeat(values[..., None], 3, axis=-1))

  saliency = jax.nn.sigmoid(out["saliency"][..., 0])
  panels = [images, gray(_heatmap(saliency, (h, w)))]
  if "affinity" in out:
    gh, gw = saliency.shape[1:3]
    chosen = jnp.argmax(saliency.reshape(n, -1), axis=-1)
    row = jnp.take_along_axis(out["affinity"], chosen[:, None, None], axis=1)[:, 0]
    row = row / jnp.maximum(row.max(-1, keepdims=True), 1e-12)
    heat = _heatmap(row.reshape(n, gh, gw), (h, w))
    marker = _heatmap(jax.nn.one_hot(chosen, gh * gw).reshape(n, gh, gw), (h, w))
    overlay = 0.35 * unit + 0.65 * jnp.stack([heat, heat * 0.3, marker], axis=-1)
    panels.append(augment.normalize(jnp.clip(overlay, 0.0, 1.0)))
  return {"affinity": jnp.stack(panels, axis=1)}


def _heads(cfg):
  source, width = cfg.source, int(cfg.branch_channels)
  dilations = tuple(int(d) for d in cfg.dilations)
  specs = [
    heads.HeadSpec(
      SAL_BRANCH, "affinity_branch", channels=width, source=source, dilations=dilations
    ),
    heads.HeadSpec(SALIENCY, "dense", channels=1, source=source, input_channels=width),
  ]
  if cfg.cls_weight > 0:
    specs.append(
      heads.HeadSpec(
        CLASSIFIER, "image_classifier", source=source, dropout=float(cfg.classifier_dropout)
      )
    )
  if cfg.refine_predictions:
    specs += [
      heads.HeadSpec(
        SEG_BRANCH, "affinity_branch", channels=width, source=source, dilations=dilations
      ),
      heads.HeadSpec(FUSION, "affinity_fusion", channels=2, source=source, input_channels=2),
    ]
  return tuple(specs)


OBJECTIVE = objective_lib.Objective(
  name="affinity",
  heads=_heads,
  loss=_loss,
  validate=affinity_config.validate,
  targets=_targets,
  refine_eval=_refine_eval,
  visualise=_visualise,
)
