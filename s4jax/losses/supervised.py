"""Supervised losses: cross-entropy with an ignore label, and its OHEM variant."""

import jax
import jax.numpy as jnp

from s4jax.labels import IGNORE_INDEX  # noqa: F401  (re-exported)


def pixel_cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX):
  """Per-pixel CE (float32) and a validity mask; ignored pixels get loss 0 and mask 0.

  logits [..., K]; labels integer [...] with `ignore_index` (or any value >= K) ignored.
  """
  num_classes = logits.shape[-1]
  labels = labels.astype(jnp.int32)
  valid = (labels != ignore_index) & (labels < num_classes) & (labels >= 0)
  safe_labels = jnp.where(valid, labels, 0)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  return jnp.where(valid, -picked, 0.0), valid.astype(jnp.float32)


def cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX):
  """Mean CE over the non-ignored pixels of the whole (global) batch; 0 if there are none."""
  loss, valid = pixel_cross_entropy(logits, labels, ignore_index)
  return loss.sum() / jnp.maximum(valid.sum(), 1.0)


def ohem_cross_entropy(
  logits, labels, threshold: float = 0.7, min_kept: int = 200000, ignore_index: int = IGNORE_INDEX
):
  """CE over the hard pixels of the whole (global) batch: UniMatch's util/ohem.py semantics.

  A pixel is hard if its true-class probability p is at most a bar
  `max(threshold, p_(min_kept))`, `p_(m)` being the m-th smallest p over the batch
  (ignored pixels count as p = 1): at least `min_kept` pixels are kept, more if more are
  below `threshold`. The loss is the mean CE over the kept valid pixels. As in the
  reference, there is no selection (plain CE over every valid pixel) when the batch has
  fewer than `min_kept` valid pixels or when `min_kept` is 0.

  Static shapes: `p_(m)` is read at a static index of a full sort of the per-pixel
  probabilities (XLA sorts on every backend; a top-k of size m costs about the same for the
  m ~ 10^5..10^6 used here), and the selection is a mask, so nothing depends on a
  data-dependent count. p is exp(-CE) of the float32 per-pixel CE, i.e. the softmax
  probability of the true class.

  Args:
    logits: [..., K].
    labels: integer [...], `ignore_index` ignored.
    threshold: probability at or below which a pixel always counts as hard.
    min_kept: least number of pixels kept (over everything passed in: the global batch).
    ignore_index: label to skip.

  Returns:
    Scalar float32 loss.
  """
  loss, valid = pixel_cross_entropy(logits, labels, ignore_index)
  if min_kept <= 0:
    return loss.sum() / jnp.maximum(valid.sum(), 1.0)
  loss, valid = loss.reshape(-1), valid.reshape(-1) > 0
  probs = jnp.where(valid, jnp.exp(-loss), 1.0)
  kth_smallest = jnp.sort(probs)[min(min_kept, probs.shape[0]) - 1]
  bar = jnp.maximum(kth_smallest, threshold)
  selecting = valid.sum() >= min_kept
  kept = valid & ((probs <= bar) | ~selecting)
  return jnp.where(kept, loss, 0.0).sum() / jnp.maximum(kept.sum(), 1).astype(jnp.float32)


def labelled_loss(logits, labels, loss_config):
  """The loss on labelled pixels chosen by `config.losses` ("ce" or "ohem")."""
  if loss_config.supervised == "ce":
    return cross_entropy(logits, labels)
  if loss_config.supervised == "ohem":
    return ohem_cross_entropy(
      logits, labels, threshold=loss_config.ohem_threshold, min_kept=loss_config.ohem_min_kept
    )
  raise ValueError(
    f"config.losses.supervised must be 'ce' or 'ohem', got {loss_config.supervised!r}."
  )
