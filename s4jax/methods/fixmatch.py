"""FixMatch (Sohn et al., NeurIPS 2020) as UniMatch's repository runs it (fixmatch.py):
pass 1 `[labelled; weak]`, pass 2 the strong view; `L = (L_x + L_s) / 2`."""

import dataclasses

import jax.numpy as jnp

from s4jax.losses import supervised as supervised_losses
from s4jax.methods import base


def run(passes, x_l, y_l, u, keys, config):
  """The weak half of pass 1 gives the targets with `teacher.source = "student"`."""
  del keys
  n_l = x_l.shape[0]
  out1 = passes(jnp.concatenate([x_l, u.weak]))
  targets = u.targets_from(out1["logits"], n_l)
  (s1,) = u.labelled_views(targets)
  out2 = passes(s1.image)
  losses = {
    "loss_sup": supervised_losses.labelled_loss(out1["logits"][:n_l], y_l, config.losses),
    "loss_s1": base.view_loss(out2["logits"], s1, config.semi.threshold),
  }
  total = 0.5 * (losses["loss_sup"] + losses["loss_s1"])
  features = {
    "labelled": base.features_of(out1, slice(None, n_l)),
    "weak": base.features_of(out1, slice(n_l, None)),
    "strong1": base.features_of(out2, slice(None)),
  }
  views = (dataclasses.replace(s1, features=out2["features"]),)
  return base.MethodResult(total, losses, features, views, targets)


METHOD = base.Method(
  name="fixmatch",
  num_strong_views=1,
  passes=("[labelled; weak]", "[strong]"),
  encoder_passes_per_unlabelled=2,
  has_weak_pass=True,
  run=run,
)
