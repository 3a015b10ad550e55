"""Supervised baseline: the labelled images only, one train-mode pass."""

from s4jax.losses import supervised as supervised_losses
from s4jax.methods import base


def run(passes, x_l, y_l, unlabelled, keys, config):
  del unlabelled, keys
  out = passes(x_l)
  loss_sup = supervised_losses.labelled_loss(out["logits"], y_l, config.losses)
  features = {"labelled": base.features_of(out, slice(None))}
  return base.MethodResult(loss_sup, {"loss_sup": loss_sup}, features, (), None)


METHOD = base.Method(
  name="supervised",
  num_strong_views=0,
  passes=("[labelled]",),
  encoder_passes_per_unlabelled=0,
  has_weak_pass=False,
  run=run,
)
