"""Weak-to-strong consistency: the pseudo-label loss and the teacher's pseudo-labels.

docs/methods.md §0. The loss is normalised by the number of *valid* pixels (not the confident
ones), as in the UniMatch code: unconfident pixels count as zero-loss pixels.
"""

import jax
import jax.numpy as jnp

from s4jax.losses import supervised


def pseudo_labels(teacher_logits):
  """Teacher logits [N, H, W, K] -> (hard labels int32, confidence float32), no gradient."""
  probs = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
  return jnp.argmax(probs, axis=-1).astype(jnp.int32), jnp.max(probs, axis=-1)


def pseudo_label_loss(student_logits, labels, confidence, valid, threshold: float, weight=None):
  """sum_i 1[c_i >= tau] V_i w_i CE(f(s)_i, y_i) / sum_i V_i over the global batch.

  `weight` (default 1) is a per-pixel weight an objective's target hook may set (CSS weighs
  each image by the share of its confident representation-space labels).
  """
  ce, _ = supervised.pixel_cross_entropy(student_logits, labels)
  valid = valid.astype(jnp.float32)
  pixel_weight = valid if weight is None else valid * weight.astype(jnp.float32)
  weight = (confidence >= threshold).astype(jnp.float32) * pixel_weight
  return (ce * weight).sum() / jnp.maximum(valid.sum(), 1.0)
