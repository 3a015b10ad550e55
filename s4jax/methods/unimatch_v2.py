"""UniMatch V2 (Yang et al., TPAMI 2025, arXiv 2410.10777): a labelled pass, then
`[s1; s2]` with complementary channel dropout on their encoder features; the EMA teacher
labels the weak view. `L = (L_x + (L_s1 + L_s2) / 2) / 2`."""

import dataclasses

import jax
import jax.numpy as jnp

from s4jax.losses import supervised as supervised_losses
from s4jax.methods import base


def run(passes, x_l, y_l, u, keys, config):
  semi = config.semi
  n_u = u.weak.shape[0]
  out_l = passes(x_l)

  def encode_decode_comp(module, images, train):
    low, high = module.encode(images, train=train)
    k_low, k_high = jax.random.split(keys["comp"])
    low1, low2 = base.complementary_dropout(k_low, low[:n_u], low[n_u:])
    high1, high2 = base.complementary_dropout(k_high, high[:n_u], high[n_u:])
    return base.decoded(
      module,
      images,
      low,
      high,
      jnp.concatenate([low1, low2]),
      jnp.concatenate([high1, high2]),
      train,
    )

  targets = u.targets_from(None, 0)  # V2 has no weak pass: the EMA teacher's labels
  s1, s2 = u.labelled_views(targets)
  out = passes(jnp.concatenate([s1.image, s2.image]), encode_decode_comp)
  losses = {
    "loss_sup": supervised_losses.labelled_loss(out_l["logits"], y_l, config.losses),
    "loss_s1": base.view_loss(out["logits"][:n_u], s1, semi.threshold),
    "loss_s2": base.view_loss(out["logits"][n_u:], s2, semi.threshold),
  }
  total = 0.5 * (losses["loss_sup"] + 0.5 * (losses["loss_s1"] + losses["loss_s2"]))
  features = {
    "labelled": base.features_of(out_l, slice(None)),
    "strong1": base.features_of(out, slice(None, n_u)),
    "strong2": base.features_of(out, slice(n_u, None)),
  }
  views = (
    dataclasses.replace(s1, features=out["features"][:n_u]),
    dataclasses.replace(s2, features=out["features"][n_u:]),
  )
  return base.MethodResult(total, losses, features, views, targets)


METHOD = base.Method(
  name="unimatch_v2",
  num_strong_views=2,
  passes=("[labelled]", "[strong1; strong2] (complementary dropout)"),
  encoder_passes_per_unlabelled=2,
  has_weak_pass=False,
  run=run,
)
