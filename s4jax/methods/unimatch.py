"""UniMatch V1 (Yang et al., CVPR 2023, arXiv 2208.09910; code unimatch.py).

Pass 1: `[labelled; weak]` through the encoder; the decoder sees the clean features and
channel-dropped copies of the weak half (feature perturbation) in one batch. Pass 2:
`[s1; s2]`. `L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2`.
"""

import dataclasses

import jax
import jax.numpy as jnp

from s4jax.losses import consistency
from s4jax.losses import supervised as supervised_losses
from s4jax.methods import base


def run(passes, x_l, y_l, u, keys, config):
  semi = config.semi
  n_l, n_u = x_l.shape[0], u.weak.shape[0]
  n_1 = n_l + n_u

  # The reference decodes perturbed copies of the labelled rows too and discards them; they
  # only enter the decoder's BatchNorm statistics. `semi.fp_on_labelled=False` skips them.
  fp_from = 0 if semi.fp_on_labelled else n_l
  images1 = jnp.concatenate([x_l, u.weak])

  def perturbed(low, high):
    k_low, k_high = jax.random.split(keys["fp"])
    return (
      base.channel_dropout(k_low, low[fp_from:], semi.fp_dropout),
      base.channel_dropout(k_high, high[fp_from:], semi.fp_dropout),
    )

  if semi.fp_batch_norm == "joint":
    # The reference: clean and perturbed rows share one decoder batch, so the decoder's
    # BatchNorm normalises the clean rows with statistics that include the perturbed ones.
    def encode_decode_fp(module, images, train):
      low, high = module.encode(images, train=train)
      low_fp, high_fp = perturbed(low, high)
      return base.decoded(
        module,
        images,
        low,
        high,
        jnp.concatenate([low, low_fp]),
        jnp.concatenate([high, high_fp]),
        train,
      )

    out1 = passes(images1, encode_decode_fp)
    logits_fp = out1["logits"][n_1 + n_l - fp_from :]
  else:  # "separate" (docs/methods.md, BatchNorm grouping): the clean pass is a plain one
    out1 = passes(images1)

    def decode(module, features, train):
      return base.decoded(module, images1, *features, *features, train)

    # The perturbed copies are decoded on their own batch statistics, which are not recorded:
    # the running statistics stay those of clean features (what evaluation sees).
    out_fp = passes(perturbed(out1["low"], out1["high"]), decode, record_statistics=False)
    logits_fp = out_fp["logits"][n_l - fp_from :]
  targets = u.targets_from(out1["logits"], n_l)
  s1, s2 = u.labelled_views(targets)
  out2 = passes(jnp.concatenate([s1.image, s2.image]))
  losses = {
    "loss_sup": supervised_losses.labelled_loss(out1["logits"][:n_l], y_l, config.losses),
    "loss_s1": base.view_loss(out2["logits"][:n_u], s1, semi.threshold),
    "loss_s2": base.view_loss(out2["logits"][n_u:], s2, semi.threshold),
    "loss_fp": consistency.pseudo_label_loss(
      logits_fp, targets.pseudo, targets.confidence, u.valid, semi.threshold, weight=targets.weight
    ),
  }
  total = 0.5 * (
    losses["loss_sup"]
    + 0.25 * losses["loss_s1"]
    + 0.25 * losses["loss_s2"]
    + 0.5 * losses["loss_fp"]
  )
  features = {
    "labelled": base.features_of(out1, slice(None, n_l)),
    "weak": base.features_of(out1, slice(n_l, n_1)),
    "strong1": base.features_of(out2, slice(None, n_u)),
    "strong2": base.features_of(out2, slice(n_u, None)),
  }
  views = (
    dataclasses.replace(s1, features=out2["features"][:n_u]),
    dataclasses.replace(s2, features=out2["features"][n_u:]),
  )
  return base.MethodResult(total, losses, features, views, targets)


METHOD = base.Method(
  name="unimatch",
  num_strong_views=2,
  passes=("[labelled; weak] (+ feature-perturbed copies in the decoder)", "[strong1; strong2]"),
  encoder_passes_per_unlabelled=3,
  has_weak_pass=True,
  run=run,
)
