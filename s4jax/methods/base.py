"""What every base method shares: its record, the student's passes, the unlabelled inputs
with their pseudo-labels, strong views and CutMix.

A base method owns the student's train-mode forward passes, because their BatchNorm
grouping is part of the method (docs/methods.md §0). Its `run(passes, x_l, y_l, unlabelled,
keys, config)` returns a `MethodResult`: the weighted base loss, the named loss terms, the
features of every pass, the strong views (with labels and features) and the pseudo-labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp

from s4jax import augment
from s4jax.losses import consistency
from s4jax.models import segmenter


@dataclasses.dataclass(frozen=True)
class Method:
  """A base method.

  Attributes:
    name: its `config.method` value.
    num_strong_views: strong views drawn from every unlabelled image.
    passes: the student's train-mode passes in order, as BatchNorm sees them (for docs and
      the benchmark's printout), e.g. ("[labelled; weak]", "[strong]").
    encoder_passes_per_unlabelled: unlabelled images' trips through the student encoder per
      unlabelled image (weak and strong views); the labelled images go through once.
    has_weak_pass: it runs the weak view through the student in train mode, so
      `teacher.source = "student"` can take the pseudo-labels from that pass.
    run: (passes, x_l, y_l, unlabelled, keys, config) -> MethodResult.
  """

  name: str
  num_strong_views: int
  passes: tuple[str, ...]
  encoder_passes_per_unlabelled: int
  has_weak_pass: bool
  run: Callable[..., "MethodResult"]

  def encoder_images(self, n_l: int, n_u: int, teacher_source: str) -> dict[str, int]:
    """Images through the encoder per step: {"student": train-mode, "teacher": inference}."""
    semi = self.num_strong_views > 0
    return {
      "student": n_l + (self.encoder_passes_per_unlabelled * n_u if semi else 0),
      "teacher": n_u if semi and teacher_source == "ema" else 0,
    }


@flax.struct.dataclass
class Features:
  """Named features of one group of images: encoder stride-4 (`low`) and stride-OS
  (`high`) maps and the decoder's fused stride-4 map (`fused`)."""

  low: jax.Array
  high: jax.Array
  fused: jax.Array


@flax.struct.dataclass
class Targets:
  """What the unlabelled losses train on, per weak-view pixel: the pseudo-label, its
  confidence, a weight (1 unless an objective's target hook changes it) and the logits
  the labels came from (teacher or student weak pass, no gradient)."""

  pseudo: jax.Array  # int32 [n, H, W]
  confidence: jax.Array  # float32 [n, H, W]
  weight: jax.Array  # float32 [n, H, W]
  logits: jax.Array  # float32 [n, H, W, K]


@dataclasses.dataclass(frozen=True)
class MethodResult:
  total: jax.Array  # the base method's weighted loss
  losses: dict  # its named loss terms (logged)
  features: dict  # pass group name ("labelled", "weak", "strong1", ...) -> Features
  views: tuple  # StrongViews, with labels and fused features
  targets: Targets | None  # the weak view's training targets (no gradient)


class StudentPasses:
  """Runs the student's train-mode passes of one step, threading BatchNorm statistics.

  Each pass gets its own dropout key (the pass index folded into the step's key), so no two
  passes of a step share a dropout mask.
  """

  def __init__(self, model, params, batch_stats, dropout_key):
    self.model, self.params, self.batch_stats = model, params, batch_stats
    self.dropout_key = dropout_key
    self.count = 0

  def __call__(self, images, fn=None, record_statistics=True):
    """A train-mode pass of `images` (or of whatever `fn(module, images, train)` takes).
    `record_statistics=False`: BatchNorm still normalises with the statistics of this pass's
    own batch, but the running statistics are left as they were."""
    key = jax.random.fold_in(self.dropout_key, self.count)
    self.count += 1
    out, mutated = self.model.apply(
      {"params": self.params, "batch_stats": self.batch_stats},
      images,
      train=True,
      mutable=["batch_stats"],
      method=fn,
      rngs={"dropout": key},
    )
    if record_statistics:
      self.batch_stats = mutated["batch_stats"]
    return out


def features_of(out, rows: slice, fused_rows: slice | None = None) -> Features:
  """Features of `rows` of a pass output (`fused_rows` where the decoder saw more rows)."""
  fused_rows = rows if fused_rows is None else fused_rows
  return Features(low=out["low"][rows], high=out["high"][rows], fused=out["features"][fused_rows])


@dataclasses.dataclass(frozen=True)
class Unlabelled:
  """The unlabelled half of a step's inputs, as the base methods read it.

  `targets_from(pass_logits, offset)` gives the weak view's training targets: from the EMA
  teacher's logits (computed before the passes) or, with `teacher.source = "student"`, from
  rows [offset, offset + n_u) of a train-mode pass (stop-gradient); then every enabled
  objective's target hook in registry order (`refine`).
  """

  weak: jax.Array  # normalised weak view [n_u, H, W, 3]
  valid: jax.Array  # float32 [n_u, H, W]
  views: tuple  # StrongViews without labels
  teacher_logits: jax.Array | None  # EMA teacher logits of the weak view, or None
  refine: Callable[[Targets], Targets] = lambda targets: targets

  def targets_from(self, pass_logits, offset: int) -> Targets:
    if self.teacher_logits is not None:
      logits = self.teacher_logits
    else:
      logits = pass_logits[offset : offset + self.weak.shape[0]]
    logits = jax.lax.stop_gradient(logits).astype(jnp.float32)
    pseudo, confidence = consistency.pseudo_labels(logits)
    return self.refine(
      Targets(pseudo=pseudo, confidence=confidence, weight=jnp.ones_like(confidence), logits=logits)
    )

  def labelled_views(self, targets: Targets):
    return tuple(with_targets(v, targets) for v in self.views)


@flax.struct.dataclass
class StrongView:
  """One strong view of the unlabelled batch as the base method saw it (a pytree)."""

  image: jax.Array  # normalised student input [n, H, W, 3]
  clean: jax.Array  # the clean weak image under the same CutMix, normalised
  valid: jax.Array  # float32 [n, H, W]: 0 where the crop was padded
  box: jax.Array  # bool [n, H, W]: where the CutMix partner was pasted
  pseudo: jax.Array | None = None  # weak-view labels int32 [n, H, W], CutMixed
  confidence: jax.Array | None = None  # their confidence float32 [n, H, W]
  weight: jax.Array | None = None  # their loss weight float32 [n, H, W]
  features: jax.Array | None = None  # the student's fused stride-4 decoder features


def strong_views(key, unit_images, valid, config) -> StrongView:
  """One strong view of every unlabelled image, CutMixed with its partner's strong view.

  Photometric ops run per example with keys split from `key` (identical on any device
  count). The partner is taken over the global batch (`augment.cutmix_partners`), so one
  unlabelled image per device still mixes, and the result does not depend on the device
  count. The partner's validity and clean weak image (the reconstruction target) are pasted
  with the same box here; its targets are pasted by `with_targets` once they exist (strong
  images never depend on pseudo-labels, so with `teacher.source = "student"` they are built
  before the pass that yields the labels).
  """
  n, h, w = unit_images.shape[:3]
  k_photo, k_box = jax.random.split(key)
  aug = config.augment
  views = jax.vmap(lambda k, x: augment.strong_photometric(k, x, aug))(
    jax.random.split(k_photo, n), unit_images
  )
  boxes = jax.vmap(
    lambda k: augment.cutmix_box(
      k, h, w, tuple(aug.cutmix_area), tuple(aug.cutmix_aspect), aug.cutmix_p
    )
  )(jax.random.split(k_box, n))
  partner = augment.cutmix_partners(n)

  def mix(own):
    return augment.paste(boxes, own, own[partner])

  return StrongView(
    image=augment.normalize(mix(views)),
    clean=augment.normalize(mix(unit_images)),
    valid=mix(valid),
    box=boxes,
  )


def with_targets(view: StrongView, targets: Targets) -> StrongView:
  """`view` with the weak view's targets CutMixed by the view's own box."""
  partner = augment.cutmix_partners(targets.pseudo.shape[0])

  def mix(own):
    return augment.paste(view.box, own, own[partner])

  return dataclasses.replace(
    view, pseudo=mix(targets.pseudo), confidence=mix(targets.confidence), weight=mix(targets.weight)
  )


def view_loss(logits, view: StrongView, threshold: float):
  """The pseudo-label loss of one strong view's student logits."""
  return consistency.pseudo_label_loss(
    logits, view.pseudo, view.confidence, view.valid, threshold, weight=view.weight
  )


def channel_dropout(key, features, rate):
  """Dropout2d: whole channels of each example zeroed with prob `rate`, the rest scaled."""
  keep = jax.random.bernoulli(key, 1.0 - rate, (features.shape[0], 1, 1, features.shape[-1]))
  return features * keep.astype(features.dtype) / (1.0 - rate)


def complementary_dropout(key, a, b):
  """UniMatch V2: channel mask m in {0, 2}^D per example; a * m, b * (2 - m); a random half
  of the examples keep both views unchanged (mask 1)."""
  k_mask, k_keep = jax.random.split(key)
  n, d = a.shape[0], a.shape[-1]
  m = 2.0 * jax.random.bernoulli(k_mask, 0.5, (n, 1, 1, d)).astype(a.dtype)
  kept = jax.random.permutation(k_keep, n) < n // 2
  m = jnp.where(kept[:, None, None, None], 1.0, m)
  return a * m, b * (2.0 - m)


def decoded(module, images, low, high, decoder_low, decoder_high, train):
  """Decoder output for possibly perturbed features, as a pass output dict (the clean
  encoder features under "low"/"high")."""
  out = module.decode(decoder_low, decoder_high, train=train)
  return {
    "logits": segmenter.upsample_logits(out["logits"], images.shape[1:3]),
    "features": out["features"],
    "low": low,
    "high": high,
  }
