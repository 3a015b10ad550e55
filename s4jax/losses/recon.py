"""Image reconstruction as an auxiliary task (`config.losses.recon`), docs/methods.md §1.

Reference: Lin et al., "Revisiting Image Reconstruction for Semi-supervised Semantic
Segmentation", DICTA 2023, arXiv 2303.09794 (no public code). The head and the losses are
our design: a light decoder `D_rec` on the fused stride-4 decoder features predicts the
image in normalised space; the target is the clean weak image (for a strong view, the clean
weak image under the same CutMix, so only the photometric corruption is undone).

  L_rec = mean_valid e(D_rec(h), x),   e = mean over RGB of |d| (l1) or d^2 (l2)

Object/background variant (`split_foreground`): two heads, D_fg and D_bg; the object mask is
`y not in background_classes` on labelled pixels and `y_hat not in background_classes and
c >= tau` on unlabelled ones; the prediction is m*D_fg + (1-m)*D_bg, and each region's
error is normalised by that region's own pixel count: L = L_fg + L_bg.

With both sources on, L = (L_labelled + mean over strong views of L_strong) / 2, so the
weight of the labelled images does not shrink with the number of unlabelled views.
"""

import jax.numpy as jnp

from s4jax.labels import IGNORE_INDEX
from s4jax.losses import recon_config
from s4jax.losses import objective as objective_lib
from s4jax.models import heads

NORMS = recon_config.NORMS


def pixel_error(prediction, target, norm: str):
  """Per-pixel error [N, H, W]: mean over the channels of |d| (l1) or d^2 (l2)."""
  diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(jnp.abs(diff) if norm == "l1" else diff * diff, axis=-1)


def masked_mean(values, weight):
  """sum(values * weight) / sum(weight), 0 when the weight is empty (global batch)."""
  weight = weight.astype(jnp.float32)
  return (values * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def reconstruction_loss(prediction, target, valid, norm: str = "l1"):
  """Mean error over valid pixels."""
  return masked_mean(pixel_error(prediction, target, norm), valid)


def split_reconstruction_loss(
  prediction_fg, prediction_bg, target, object_mask, valid, norm: str = "l1"
):
  """Object/background reconstruction: (L_fg + L_bg, L_fg, L_bg), each region normalised
  by its own valid pixel count."""
  m = object_mask.astype(jnp.float32)[..., None]
  prediction = m * prediction_fg + (1.0 - m) * prediction_bg
  error = pixel_error(prediction, target, norm)
  valid = valid.astype(jnp.float32)
  fg = masked_mean(error, valid * m[..., 0])
  bg = masked_mean(error, valid * (1.0 - m[..., 0]))
  return fg + bg, fg, bg


def object_mask(labels, background_classes, confident=None):
  """1 where `labels` is an object class (not background, not 255) [and confident]."""
  labels = labels.astype(jnp.int32)
  is_object = labels != IGNORE_INDEX
  for c in background_classes:
    is_object &= labels != int(c)
  if confident is not None:
    is_object &= confident
  return is_object


def _head_names(cfg):
  return ("recon_fg", "recon_bg") if cfg.split_foreground else ("recon",)


def _heads(cfg):
  return tuple(heads.HeadSpec(name, "rgb") for name in _head_names(cfg))


def _background(ctx, cfg):
  return tuple(cfg.background_classes) if len(cfg.background_classes) else ctx.background_classes


def _source_loss(ctx, cfg, features, target, valid, objects):
  if not cfg.split_foreground:
    return reconstruction_loss(ctx.reconstruct(features, "recon"), target, valid, cfg.norm), {}
  total, fg, bg = split_reconstruction_loss(
    ctx.reconstruct(features, "recon_fg"),
    ctx.reconstruct(features, "recon_bg"),
    target,
    objects,
    valid,
    cfg.norm,
  )
  return total, {"loss_fg": fg, "loss_bg": bg}


def _loss(ctx: objective_lib.StepContext, cfg, aux):
  background = _background(ctx, cfg)
  parts, metrics = [], {}
  if cfg.on_labelled:
    objects = object_mask(ctx.labelled_mask, background)
    loss_l, extra = _source_loss(
      ctx, cfg, ctx.labelled_features, ctx.labelled_image, ctx.labelled_valid(), objects
    )
    parts.append(loss_l)
    metrics["loss_labelled"] = loss_l
    metrics.update({f"{k}_labelled": v for k, v in extra.items()})
  if cfg.on_strong and ctx.strong_views:
    view_losses = []
    for view in ctx.strong_views:
      objects = object_mask(view.pseudo, background, view.confidence >= ctx.threshold)
      loss_v, extra = _source_loss(ctx, cfg, view.features, view.clean, view.valid, objects)
      view_losses.append(loss_v)
    loss_s = sum(view_losses) / len(view_losses)
    parts.append(loss_s)
    metrics["loss_strong"] = loss_s
  loss = sum(parts) / len(parts)
  metrics["loss"] = loss
  return cfg.weight * loss, metrics, aux


def _visualise(model, variables, images, masks, rng, cfg):
  """input | reconstruction (the fg/bg variant shows both heads' outputs)."""
  del masks, rng
  features = model.apply(variables, images, train=False)["features"]
  size = images.shape[1:3]
  panels = [images] + [
    model.apply({"params": variables["params"]}, features, size, head, method="reconstruct")
    for head in _head_names(cfg)
  ]
  return {"reconstruction": jnp.stack(panels, axis=1)}


OBJECTIVE = objective_lib.Objective(
  name="recon", heads=_heads, loss=_loss, validate=recon_config.validate, visualise=_visualise
)
