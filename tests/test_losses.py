"""Supervised cross-entropy against a NumPy reference."""

import jax
import numpy as np

from s4jax.losses import supervised


def _reference_ce(logits, labels, ignore=255):
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  k = logits.shape[-1]
  valid = (labels != ignore) & (labels < k)
  total, count = 0.0, 0
  for idx in zip(*np.nonzero(valid)):
    total -= log_probs[idx + (labels[idx],)]
    count += 1
  return total / max(count, 1)


def test_cross_entropy_matches_numpy_with_ignored_pixels():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 6, 4)).astype(np.float32) * 3
  labels = rng.integers(0, 4, size=(2, 5, 6))
  labels[rng.random(labels.shape) < 0.3] = 255
  labels[0, 0, 0] = 7  # out of range: ignored too
  got = jax.jit(supervised.cross_entropy)(logits, labels)
  np.testing.assert_allclose(float(got), _reference_ce(logits, labels), rtol=1e-5)


def test_cross_entropy_all_ignored_is_zero_not_nan():
  logits = np.zeros((1, 2, 2, 3), np.float32)
  labels = np.full((1, 2, 2), 255)
  assert float(supervised.cross_entropy(logits, labels)) == 0.0


def test_ignored_pixels_get_no_gradient():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(1, 3, 3, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=(1, 3, 3))
  labels[0, 1, :] = 255
  grad = jax.grad(supervised.cross_entropy)(logits, labels)
  assert np.all(np.asarray(grad)[0, 1] == 0)
  assert np.any(np.asarray(grad)[0, 0] != 0)
