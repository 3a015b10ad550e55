"""Supervised cross-entropy with an ignore label."""

import jax
import jax.numpy as jnp

IGNORE_INDEX = 255


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
