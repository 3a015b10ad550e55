"""Collaborative logit/representation supervision (`config.losses.contrastive`), docs/methods.md
§5.

Reference: Wang, Xie et al., "Space Engage: Collaborative Space Supervision for
Contrastive-based Semi-Supervised Semantic Segmentation" (CSS), ICCV 2023, arXiv 2307.09755,
code WangChangqi98/CSS (cross_label.py, networks/ddp_model.py Model_cross, loss/loss.py
Contrast_Loss and Attention_Threshold_Loss). Verified from that code and implemented as it does:

- a representation head beside the classifier (3x3 conv + BN + ReLU + 1x1 conv -> D = 256);
- class prototypes P [K, D] (not trained): a class's first batch sets it, later batches move
  it by EMA 0.99 towards the mean student representation of its pixels (labelled pixels
  by ground truth, unlabelled ones by the teacher's logit label where its confidence >= 0.7),
  over the whole (global) batch, without gradient;
- two teacher pseudo-labels of the weak view: logit space (argmax of the softmax) and
  representation space (argmax of softmax_c(cos(r_teacher, P_c) / T), the cosine upsampled
  bilinearly to the image first); cross supervision: the unlabelled CE trains on the
  representation-space labels, each image weighted by its share of pixels whose
  representation confidence is >= 0.97; the contrastive loss uses the logit-space labels;
- the contrastive loss: per present class c, hard anchors are its pixels whose student
  indicator softmax_c(cos(r, P) / T)[c] is < 0.8 (with the prototypes before this step's
  update); 256 anchors drawn with replacement; the positive is the updated P_c; each anchor
  gets 512 negatives, each of a class j != c drawn with probability softmax_j(cos(P_c, P_j)/T)
  over the other present classes, then a uniformly drawn pixel of class j; negatives and
  positive carry no gradient; InfoNCE on cosines at temperature 0.5; the sum over classes
  with anchors divided by the number of present classes; 0 with fewer than two classes;
- the weight ramps down, lambda(e) = exp(-5 (e / E)^2).

Our interpretation (docs/methods.md §5 "our design"):
- e / E is step / total_steps (CSS counts epochs).
- The pixels: the labelled images and the first `strong_views` strong views of the base
  method (their fused stride-4 decoder features from the base passes), labels taken to that
  grid by nearest resizing; the head runs once, in train mode, over all of them (one
  BatchNorm group; CSS runs it inside its labelled and unlabelled forwards).
- Anchors and negatives are drawn from the global batch (CSS: each GPU's own pixels), so one
  device and eight compute the same loss. Static shapes: every class has its 256 x 512 slots;
  absent classes are masked out (and skipped at run time with class_chunk = 1).
- The target hook runs the teacher (`teacher.source`) once more for its representation; the
  per-image weight is computed on the weak view and pasted with CutMix like the labels (CSS
  computes it on the mixed image). With `threshold_rep_labels = False` (CSS) the hook sets
  the confidence to 1, so every valid pixel trains; True applies semi.threshold to the
  representation confidence as well.

Memory: the anchors x negatives representations are gathered one class (`class_chunk`
classes) at a time under `lax.map` with rematerialisation: at VOC settings (K = 21, 256
anchors, 512 negatives, D = 256, float32) the whole tensor would be 2.62 GiB; one class is
128 MiB. Nothing is pixels x pixels.
"""

from absl import logging
import jax
import jax.numpy as jnp

from s4jax import augment
from s4jax import viz
from s4jax.labels import IGNORE_INDEX
from s4jax.losses import consistency
from s4jax.losses import contrastive_config
from s4jax.losses import objective as objective_lib
from s4jax.methods import base as method_base
from s4jax.models import heads

HEAD = "contrastive"  # params["head_contrastive"]
NORM_EPS = 1e-12  # torch F.normalize's eps


# ---- pure functions (tested against NumPy) ---------------------------------------------


def normalise(x):
  """x / max(||x||, eps) along the last axis: zero vectors (unseen prototypes) stay zero."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), NORM_EPS)


def cosine_to_prototypes(reps, prototypes):
  """cos(r_i, P_c) [..., K] for representations [..., D] and prototypes [K, D]."""
  return jnp.einsum(
    "...d,kd->...k", normalise(reps), normalise(prototypes), precision=jax.lax.Precision.HIGHEST
  )


def representation_labels(cosine, temperature: float, size=None):
  """(labels int32, confidence float32) = (argmax, max) of softmax_c(cos / T).

  `cosine` [n, h, w, K] is upsampled bilinearly to `size` first, as CSS interpolates the
  similarity map before its softmax."""
  if size is not None and tuple(cosine.shape[1:3]) != tuple(size):
    cosine = jax.image.resize(cosine, (cosine.shape[0], *size, cosine.shape[-1]), "bilinear")
  probs = jax.nn.softmax(cosine / temperature, axis=-1)
  return jnp.argmax(probs, axis=-1).astype(jnp.int32), jnp.max(probs, axis=-1)


def image_weights(confidence, valid, threshold: float):
  """Per image [n]: the share of its valid pixels whose confidence is >= threshold."""
  valid = valid.astype(jnp.float32)
  kept = (confidence >= threshold).astype(jnp.float32) * valid
  return kept.sum(axis=(1, 2)) / jnp.maximum(valid.sum(axis=(1, 2)), 1.0)


def update_prototypes(prototypes, initialised, reps, labels, momentum: float):
  """One prototype step over the global batch.

  Args:
    prototypes: [K, D]; initialised: bool [K] (the class has had a batch).
    reps: [P, D] pixel representations (no gradient is taken through them).
    labels: int [P]; values outside [0, K) (255) are not counted.
    momentum: m in P_c <- m P_c + (1 - m) mean.

  Returns:
    (new prototypes, new initialised, present bool [K]): a present class that was not yet
    initialised takes its batch mean; an absent class keeps its prototype.
  """
  num_classes = prototypes.shape[0]
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # 255 -> all zeros
  counts = one_hot.sum(axis=0)
  sums = jnp.einsum(
    "pk,pd->kd",
    one_hot,
    jax.lax.stop_gradient(reps).astype(jnp.float32),
    precision=jax.lax.Precision.HIGHEST,
  )
  means = sums / jnp.maximum(counts, 1.0)[:, None]
  present = counts > 0
  moved = momentum * prototypes + (1.0 - momentum) * means
  new = jnp.where(present[:, None], jnp.where(initialised[:, None], moved, means), prototypes)
  return jax.lax.stop_gradient(new), initialised | present, present


def class_slots(labels, allowed, num_classes: int):
  """The allowed pixels grouped by class: (order [P], start [K], count [K]); the pixel of
  rank r in class c is order[start[c] + r]."""
  key = jnp.where(allowed, labels, num_classes).astype(jnp.int32)
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  count = jnp.bincount(key, length=num_classes + 1)[:num_classes].astype(jnp.int32)
  return order, jnp.cumsum(count) - count, count


def draw_pixels(key, slots, classes):
  """For each entry of `classes` (int, any shape) an allowed pixel of that class, uniformly,
  with replacement. Entries of a class without pixels get an arbitrary index (mask them)."""
  order, start, count = slots
  available = count[classes]
  u = jax.random.uniform(key, classes.shape)
  # floor(u * n) can round up to n in float32: clamp to the last rank.
  rank = jnp.minimum(jnp.floor(u * available).astype(jnp.int32), jnp.maximum(available - 1, 0))
  return order[jnp.minimum(start[classes] + rank, order.shape[0] - 1)]


def negative_class_probs(prototypes, present, temperature: float):
  """[K, K]: row c is softmax_j(cos(P_c, P_j) / T) over present classes j != c (a zero row
  when there is none)."""
  num_classes = prototypes.shape[0]
  logits = cosine_to_prototypes(prototypes, prototypes) / temperature
  allowed = present[None, :] & ~jnp.eye(num_classes, dtype=bool)
  top = jnp.max(jnp.where(allowed, logits, -jnp.inf), axis=-1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  e = jnp.where(allowed, jnp.exp(logits - top), 0.0)
  return e / jnp.maximum(e.sum(axis=-1, keepdims=True), 1e-30)


def draw_classes(key, probs, shape):
  """Classes drawn from each row of `probs` [K, K] by inverse CDF: int32 [K, *shape].

  r = total (1 - u) lies in (0, total], so the first CDF entry >= r always has a
  probability > 0 (classes of probability 0 are never drawn). Rows without mass give 0."""
  num_classes = probs.shape[0]
  cdf = jnp.cumsum(probs, axis=-1)
  u = jax.random.uniform(key, (num_classes, *shape))
  r = cdf[:, -1].reshape(num_classes, *([1] * len(shape))) * (1.0 - u)
  flat = jax.vmap(lambda c, x: jnp.searchsorted(c, x, side="left"))(cdf, r.reshape(num_classes, -1))
  return jnp.minimum(flat, num_classes - 1).astype(jnp.int32).reshape(num_classes, *shape)


def sample_pairs(
  key,
  labels,
  valid,
  hard,
  prototypes,
  present,
  num_anchors: int,
  num_negatives: int,
  temperature: float,
):
  """Anchor and negative pixel indices for every class (static shapes).

  Args:
    labels: int [P] pixel classes (anything where not `valid`).
    valid: bool [P] pixels that count (labelled, or confident unlabelled).
    hard: bool [P] valid pixels that may be anchors of their own class.
    prototypes: [K, D] (after this step's update); present: bool [K].

  Returns:
    (anchor_index int32 [K, A], negative_index int32 [K, A, N], negative_class [K, A, N],
    has_anchors bool [K]): rows of classes without hard pixels are arbitrary.
  """
  num_classes = prototypes.shape[0]
  k_anchor, k_class, k_pixel = jax.random.split(key, 3)
  hard_slots = class_slots(labels, hard, num_classes)
  own = jnp.broadcast_to(jnp.arange(num_classes)[:, None], (num_classes, num_anchors))
  anchor_index = draw_pixels(k_anchor, hard_slots, own)
  negative_class = draw_classes(
    k_class, negative_class_probs(prototypes, present, temperature), (num_anchors, num_negatives)
  )
  negative_index = draw_pixels(k_pixel, class_slots(labels, valid, num_classes), negative_class)
  return anchor_index, negative_index, negative_class, present & (hard_slots[2] > 0)


def info_nce(anchors, positive, negatives, temperature: float):
  """mean_a -log softmax([cos(a, positive), cos(a, n_1..N)] / T)[0].

  anchors [A, D], positive [D], negatives [A, N, D]."""
  a = normalise(anchors)
  pos = jnp.einsum("ad,d->a", a, normalise(positive))[:, None]
  neg = jnp.einsum("ad,and->an", a, normalise(negatives))
  logits = jnp.concatenate([pos, neg], axis=-1) / temperature
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])


def class_losses(
  reps, anchor_index, negative_index, prototypes, use, temperature: float, class_chunk: int = 1
):
  """InfoNCE per class [K], 0 where `use` is False.

  Anchors carry the gradient; positives (prototypes) and negatives do not (as in CSS). The
  negatives [A, N, D] are gathered `class_chunk` classes at a time and rematerialised in the
  backward pass, so at most class_chunk x A x N x D floats are alive at once.
  """
  anchors = reps[anchor_index]  # [K, A, D], with gradient
  pixels = jax.lax.stop_gradient(reps)
  positives = jax.lax.stop_gradient(prototypes)

  @jax.checkpoint
  def one_class(args):
    anchors_c, negative_c, positive_c, use_c = args

    def compute():
      return info_nce(anchors_c, positive_c, pixels[negative_c], temperature)

    if class_chunk == 1:  # a real branch: absent classes cost nothing at run time
      return jax.lax.cond(use_c, compute, lambda: jnp.zeros((), jnp.float32))
    return jnp.where(use_c, compute(), 0.0)

  losses = jax.lax.map(
    one_class,
    (anchors, negative_index, positives, use),
    batch_size=None if class_chunk == 1 else class_chunk,
  )
  return jnp.where(use, losses, 0.0)


def contrastive_loss(
  key,
  reps,
  labels,
  valid,
  hard,
  prototypes,
  present,
  *,
  num_anchors,
  num_negatives,
  temperature,
  class_chunk=1,
):
  """CSS's loss: the sum over present classes with hard anchors of their InfoNCE, divided by
  the number of present classes; 0 with fewer than two present classes. Returns (loss,
  number of classes with anchors)."""
  anchor_index, negative_index, _, has_anchors = sample_pairs(
    key, labels, valid, hard, prototypes, present, num_anchors, num_negatives, temperature
  )
  num_present = present.sum()
  use = has_anchors & (num_present >= 2)
  per_class = class_losses(
    reps, anchor_index, negative_index, prototypes, use, temperature, class_chunk
  )
  return per_class.sum() / jnp.maximum(num_present, 1).astype(jnp.float32), use.sum()


def rampdown(step, total_steps: int, rate: float):
  """lambda(e) = exp(-rate (e / E)^2) with e / E = step / total_steps."""
  progress = jnp.asarray(step, jnp.float32) / float(max(total_steps, 1))
  return jnp.exp(-rate * progress * progress)


def nearest_labels(label_maps, size):
  """int [n, H, W] label maps -> int32 [n, *size] by nearest resizing (255 stays 255)."""
  out = jax.image.resize(label_maps.astype(jnp.float32), (label_maps.shape[0], *size), "nearest")
  return jnp.round(out).astype(jnp.int32)


# ---- the objective ---------------------------------------------------------------------


def _teacher_representation(module, images, train):
  """The network's representation head on its own fused features."""
  return module.head(HEAD, module(images, train)["features"], None, train)


def _logits_and_representation(module, images, train):
  out = module(images, train)
  return out["logits"], module.head(HEAD, out["features"], None, train)


def _student_pixels(ctx, cfg):
  """Label maps of the labelled images and the first `strong_views` strong views (logit-space
  labels where the teacher's confidence is >= weak_threshold), and their fused features."""
  features = [ctx.labelled_features]
  maps = [ctx.labelled_mask.astype(jnp.int32)]
  views = ctx.strong_views[: cfg.strong_views] if ctx.targets is not None else ()
  if views:
    # The logit-space labels: a target hook (ours) may have replaced ctx.targets' labels,
    # never their logits.
    pseudo, confidence = consistency.pseudo_labels(ctx.targets.logits)
    logit_space = method_base.Targets(
      pseudo=pseudo, confidence=confidence, weight=jnp.ones_like(confidence), logits=None
    )
    for view in views:
      mixed = method_base.with_targets(view, logit_space)
      keep = (mixed.confidence >= cfg.weak_threshold) & (mixed.valid > 0)
      maps.append(jnp.where(keep, mixed.pseudo, IGNORE_INDEX))
      features.append(view.features)
  return jnp.concatenate(features), jnp.concatenate(maps)


def _loss(ctx: objective_lib.StepContext, cfg, aux):
  num_classes = ctx.num_classes
  features, maps = _student_pixels(ctx, cfg)
  reps = ctx.head(HEAD, features, train=True)  # [n, h, w, D]
  labels = nearest_labels(maps, reps.shape[1:3]).reshape(-1)
  reps = reps.reshape(-1, reps.shape[-1])
  valid = labels < num_classes  # 255 = not counted

  old = aux["prototypes"]
  indicator = jax.nn.softmax(
    cosine_to_prototypes(jax.lax.stop_gradient(reps), old) / cfg.label_temperature, axis=-1
  )
  own = jnp.take_along_axis(indicator, jnp.clip(labels, 0, num_classes - 1)[:, None], axis=-1)[:, 0]
  hard = valid & (own < cfg.anchor_threshold)
  prototypes, initialised, present = update_prototypes(
    old, aux["initialised"], reps, jnp.where(valid, labels, num_classes), cfg.prototype_momentum
  )
  loss, anchor_classes = contrastive_loss(
    ctx.rng,
    reps,
    labels,
    valid,
    hard,
    prototypes,
    present,
    num_anchors=cfg.num_anchors,
    num_negatives=cfg.num_negatives,
    temperature=cfg.temperature,
    class_chunk=cfg.class_chunk,
  )
  ramp = rampdown(ctx.step, ctx.config.total_steps, cfg.rampdown)
  total = cfg.weight * ramp * loss

  norms = jnp.linalg.norm(prototypes, axis=-1)
  count = initialised.sum()
  metrics = {
    "loss": total,
    "loss_contrast": loss,
    "ramp": ramp,
    "present_classes": present.sum().astype(jnp.float32),
    "anchor_classes": anchor_classes.astype(jnp.float32),
    "hard_fraction": hard.sum() / jnp.maximum(valid.sum(), 1),
    "initialised_classes": count.astype(jnp.float32),
    "prototype_norm": jnp.where(initialised, norms, 0.0).sum() / jnp.maximum(count, 1),
    "prototype_norm_min": jnp.where(
      count > 0, jnp.min(jnp.where(initialised, norms, jnp.inf)), 0.0
    ),
  }
  return total, metrics, {"prototypes": prototypes, "initialised": initialised}


def _targets(ctx: objective_lib.TargetContext, cfg, aux):
  """Cross supervision: the unlabelled CE trains on the representation-space labels, each
  image weighted by its share of confident ones (CSS's Attention_Threshold_Loss)."""
  t = ctx.targets
  reps = ctx.teacher_apply(ctx.weak_image, method=_teacher_representation)
  rep_labels, rep_confidence = representation_labels(
    cosine_to_prototypes(reps, aux["prototypes"]), cfg.label_temperature, ctx.weak_image.shape[1:3]
  )
  weights = image_weights(rep_confidence, ctx.weak_valid, cfg.rep_threshold)
  logit_labels, logit_confidence = consistency.pseudo_labels(t.logits)
  valid = ctx.weak_valid.astype(jnp.float32)
  share = lambda keep: (keep * valid).sum() / jnp.maximum(valid.sum(), 1.0)  # noqa: E731
  metrics = {
    "agreement": share(rep_labels == logit_labels),
    "rep_kept": share(rep_confidence >= cfg.rep_threshold),
    "logit_kept": share(logit_confidence >= float(ctx.config.semi.threshold)),
    "logit_kept_contrast": share(logit_confidence >= cfg.weak_threshold),
    "rep_confidence": share(rep_confidence),
    "image_weight": weights.mean(),
  }
  if not cfg.cross_supervision:
    return t, metrics
  labels, score = rep_labels, rep_confidence
  if cfg.warmup > 0:
    # CSS's --warmup: the first steps weight the logit-space labels the same way (per image,
    # by the share of logit confidences >= rep_threshold), then switch to the representation's.
    warm = ctx.step < int(cfg.warmup * ctx.config.total_steps)
    labels = jnp.where(warm, logit_labels, rep_labels)
    score = jnp.where(warm, logit_confidence, rep_confidence)
    weights = image_weights(score, ctx.weak_valid, cfg.rep_threshold)
    metrics["warmup"] = warm.astype(jnp.float32)
  confidence = score if cfg.threshold_rep_labels else jnp.ones_like(score)
  return method_base.Targets(
    pseudo=labels, confidence=confidence, weight=t.weight * weights[:, None, None], logits=t.logits
  ), metrics


def _heads(cfg):
  return (heads.HeadSpec(HEAD, "projection", channels=int(cfg.dim)),)


def _init_aux(cfg, num_classes, feature_widths):
  del feature_widths  # the head's width is cfg.dim, whatever the decoder's
  reachable = contrastive_config.max_representation_confidence(num_classes, cfg.label_temperature)
  if cfg.cross_supervision and reachable < cfg.rep_threshold:
    logging.warning(
      "losses.contrastive: with label_temperature=%g and %d classes no pixel's "
      "representation confidence can exceed %.3f < rep_threshold=%g, so every image weight "
      "of the cross-supervised unlabelled CE is 0 (as in CSS's released code). Lower "
      "label_temperature (e.g. 0.1) or rep_threshold to train on unlabelled images.",
      cfg.label_temperature,
      num_classes,
      reachable,
      cfg.rep_threshold,
    )
  return {
    "prototypes": jnp.zeros((num_classes, int(cfg.dim)), jnp.float32),
    "initialised": jnp.zeros((num_classes,), bool),
  }


def _colour(labels, palette):
  """Label maps -> palette colours in the network's normalised space (what grids show)."""
  return augment.normalize(jnp.asarray(palette, jnp.float32)[labels] / 255.0)


def _visualise(model, variables, images, masks, rng, cfg):
  """input | ground truth | logit prediction | representation-space prediction (student)."""
  del rng
  own = variables.get("aux", {}).get("contrastive")
  plain = {k: v for k, v in variables.items() if k != "aux"}
  logits, reps = model.apply(plain, images, train=False, method=_logits_and_representation)
  palette = viz.make_palette(model.num_classes)
  panels = [
    images,
    _colour(masks.astype(jnp.int32), palette),
    _colour(jnp.argmax(logits, axis=-1), palette),
  ]
  if own is not None:
    rep_labels, _ = representation_labels(
      cosine_to_prototypes(reps, own["prototypes"]), cfg.label_temperature, images.shape[1:3]
    )
    panels.append(_colour(rep_labels, palette))
  return {"contrastive": jnp.stack(panels, axis=1)}


OBJECTIVE = objective_lib.Objective(
  name="contrastive",
  heads=_heads,
  loss=_loss,
  validate=contrastive_config.validate,
  init_aux=_init_aux,
  targets=_targets,
  visualise=_visualise,
)
