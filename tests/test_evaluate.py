"""Tests for s4jax.evaluate: confusion matrix, mIoU, sliding window, eval_fn."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from s4jax import augment
from s4jax import evaluate

K = 5


def _np_confusion(pred, label, k, ignore_index=255):
  """Reference: np.bincount over the valid pixels only."""
  pred = np.asarray(pred).reshape(-1).astype(np.int64)
  label = np.asarray(label).reshape(-1).astype(np.int64)
  valid = (label != ignore_index) & (label >= 0) & (label < k)
  return np.bincount(label[valid] * k + pred[valid], minlength=k * k).reshape(k, k)


def _np_iou(pred, label, k, ignore_index=255):
  """Reference IoU straight from pixel sets, independent of the confusion matrix."""
  pred = np.asarray(pred).reshape(-1)
  label = np.asarray(label).reshape(-1)
  keep = label != ignore_index
  pred, label = pred[keep], label[keep]
  ious = []
  for c in range(k):
    inter = np.sum((pred == c) & (label == c))
    union = np.sum((pred == c) | (label == c))
    ious.append(inter / union if union else np.nan)
  ious = np.array(ious)
  return ious, np.nanmean(ious), np.mean(pred == label)


def _random_pred_label(seed, shape, k, ignore_frac=0.2):
  rng = np.random.default_rng(seed)
  pred = rng.integers(0, k, shape)
  label = rng.integers(0, k, shape)
  label[rng.random(shape) < ignore_frac] = 255
  return pred, label


def test_confusion_matches_numpy_bincount_jitted():
  pred, label = _random_pred_label(0, (3, 17, 23), K)
  label[0, 0, :4] = K + 2  # Out-of-range labels are ignored like 255.
  fn = jax.jit(evaluate.confusion_matrix, static_argnums=(2,))
  got = fn(jnp.asarray(pred), jnp.asarray(label.astype(np.uint8)), K)
  assert got.dtype == jnp.int32 and got.shape == (K, K)
  np.testing.assert_array_equal(np.asarray(got), _np_confusion(pred, label, K))
  # The ignored pixels really are dropped, not folded into a cell.
  assert int(got.sum()) == int(np.sum(label < K))


def test_iou_matches_reference_with_absent_and_false_positive_classes():
  pred, label = _random_pred_label(1, (4, 16, 16), 6)
  # Class 4: absent from GT and prediction -> nan, excluded from the mean.
  # Class 5: predicted but absent from GT -> IoU 0, counted in the mean.
  label[label == 4] = 0
  label[label == 5] = 1
  pred[pred == 4] = 2
  conf = evaluate.confusion_matrix(jnp.asarray(pred), jnp.asarray(label), 6)
  result = evaluate.iou_from_confusion(np.asarray(conf))
  ref_iou, ref_miou, ref_acc = _np_iou(pred, label, 6)

  np.testing.assert_allclose(result["iou"], ref_iou, equal_nan=True)
  assert np.isnan(result["iou"][4])
  assert result["iou"][5] == 0.0
  assert result["miou"] == pytest.approx(ref_miou)
  assert result["miou"] == pytest.approx(np.mean(result["iou"][[0, 1, 2, 3, 5]]))
  assert result["pixel_accuracy"] == pytest.approx(ref_acc)
  present = [0, 1, 2, 3]
  ref_macc = np.mean([np.mean(pred[label == c] == c) for c in present])
  assert result["mean_accuracy"] == pytest.approx(ref_macc)


def test_iou_hand_computed_and_empty():
  # Rows = GT, cols = prediction. Class 2 never occurs.
  conf = np.array([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
  result = evaluate.iou_from_confusion(conf)
  np.testing.assert_allclose(result["iou"], [3 / 6, 4 / 7, np.nan], equal_nan=True)
  assert result["miou"] == pytest.approx((3 / 6 + 4 / 7) / 2)
  assert result["pixel_accuracy"] == pytest.approx(7 / 10)
  assert result["mean_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
  empty = evaluate.iou_from_confusion(np.zeros((3, 3), np.int32))
  assert np.isnan(empty["miou"]) and np.isnan(empty["pixel_accuracy"])
  # int64 on the host: counts beyond int32 do not overflow.
  big = evaluate.iou_from_confusion(np.array([[2**31, 2**31], [0, 2**31]], np.int64))
  np.testing.assert_allclose(big["iou"], [0.5, 0.5])


def test_format_iou_table():
  result = evaluate.iou_from_confusion(np.array([[3, 1, 0], [2, 4, 0], [0, 0, 0]]))
  table = evaluate.format_iou_table(result, ["road", "sky", "train"])
  assert "road" in table and "50.00" in table and "n/a" in table and "mIoU" in table
  with pytest.raises(ValueError):
    evaluate.format_iou_table(result, ["road"])


def test_summed_batch_confusions_equal_concatenated():
  pred, label = _random_pred_label(2, (6, 9, 11), K)
  fn = jax.jit(evaluate.confusion_matrix, static_argnums=(2,))
  total = sum(np.asarray(fn(pred[i : i + 2], label[i : i + 2], K)) for i in range(0, 6, 2))
  np.testing.assert_array_equal(total, np.asarray(fn(pred, label, K)))


def test_confusion_under_batch_sharding():
  devices = np.array(jax.devices())
  mesh = Mesh(devices, ("data",))
  pred, label = _random_pred_label(3, (len(devices), 8, 8), K)
  sharding = NamedSharding(mesh, P("data"))
  fn = jax.jit(
    lambda p, l: evaluate.confusion_matrix(p, l, K), out_shardings=NamedSharding(mesh, P())
  )
  got = fn(jax.device_put(pred, sharding), jax.device_put(label, sharding))
  np.testing.assert_array_equal(np.asarray(got), _np_confusion(pred, label, K))


def test_window_starts_are_flush_with_border():
  assert evaluate._window_starts(32, 16, 8) == [0, 8, 16]
  assert evaluate._window_starts(30, 16, 10) == [0, 10, 14]
  assert evaluate._window_starts(16, 16, 10) == [0]


class _TinyConvNet(nn.Module):
  """Non-pointwise: two 3x3 convs, so a pixel's logits depend on its neighbours."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return nn.Conv(K, (3, 3))(x)


@pytest.fixture(scope="module")
def conv_predict():
  net = _TinyConvNet()
  variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  return lambda x: net.apply(variables, x)


def _pointwise_predict(x):
  """Per-pixel function of the channels only (no spatial context)."""
  w = jnp.arange(3 * K, dtype=jnp.float32).reshape(3, K) / 7.0 - 1.0
  return jnp.tanh(x @ w) * 3.0 + jnp.sin(x[..., :1] * jnp.arange(K))


def _images(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _slide(predict, images, window, stride):
  fn = jax.jit(lambda x: evaluate.sliding_window_probabilities(predict, x, K, window, stride))
  return fn(images)


def test_sliding_equals_whole_when_window_covers_image(conv_predict):
  images = _images(0, (2, 12, 12, 3))
  whole = jax.nn.softmax(conv_predict(images), axis=-1)
  np.testing.assert_allclose(_slide(conv_predict, images, 12, 4), whole, atol=1e-6)
  # Window larger than the image: padded, then cropped back. Use a pointwise
  # predictor, since the padding legitimately changes a conv net's border outputs.
  images = _images(1, (2, 10, 14, 3))
  whole = jax.nn.softmax(_pointwise_predict(images), axis=-1)
  got = _slide(_pointwise_predict, images, 16, 8)
  assert got.shape == (2, 10, 14, K)
  np.testing.assert_allclose(got, whole, atol=1e-6)


@pytest.mark.parametrize(
  "shape,window,stride",
  [
    ((2, 20, 28, 3), 8, 5),  # Overlaps and flush last windows on both axes.
    ((1, 12, 30, 3), 16, 6),  # H < window (padded), W slid.
  ],
)
def test_sliding_equals_whole_for_pointwise_predictor(shape, window, stride):
  images = _images(2, shape)
  whole = jax.nn.softmax(_pointwise_predict(images), axis=-1)
  got = _slide(_pointwise_predict, images, window, stride)
  assert got.shape == shape[:3] + (K,)
  np.testing.assert_allclose(got, whole, atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_sliding_differs_for_spatial_predictor(conv_predict):
  # Shows the equality above is a real check: with spatial context, window borders
  # change the predictions.
  images = _images(3, (2, 20, 28, 3))
  whole = jax.nn.softmax(conv_predict(images), axis=-1)
  got = _slide(conv_predict, images, 8, 5)
  assert np.max(np.abs(np.asarray(got) - np.asarray(whole))) > 1e-3
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_resize_logits():
  logits = _images(4, (2, 6, 8, K))
  assert evaluate.resize_logits(logits, 6, 8) is logits
  up = evaluate.resize_logits(logits, 12, 16)
  assert up.shape == (2, 12, 16, K)
  const = jnp.full((1, 3, 5, K), 2.5)
  np.testing.assert_allclose(evaluate.resize_logits(const, 7, 4), 2.5, rtol=1e-6)


def _pointwise_apply(variables, images):
  return images @ variables["w"]


@pytest.mark.parametrize("mode", ["whole", "sliding"])
def test_make_eval_fn_confusion(mode):
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, (2, 14, 18, 3), dtype=np.uint8)
  masks = rng.integers(0, K, (2, 14, 18)).astype(np.int32)
  masks[:, -3:, :] = 255  # E.g. padding rows.
  variables = {"w": jnp.asarray(rng.normal(size=(3, K)), jnp.float32)}
  eval_fn = evaluate.make_eval_fn(_pointwise_apply, K, mode=mode, window=8, stride=5)
  got = jax.jit(eval_fn)(variables, images, masks)

  normed = (images / 255.0 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)
  pred = np.argmax(normed @ np.asarray(variables["w"], np.float64), axis=-1)
  np.testing.assert_array_equal(np.asarray(got), _np_confusion(pred, masks, K))


def test_make_eval_fn_rejects_bad_config():
  with pytest.raises(ValueError, match="eval.mode"):
    evaluate.make_eval_fn(_pointwise_apply, K, mode="multiscale")
  with pytest.raises(ValueError, match="eval.window"):
    evaluate.make_eval_fn(_pointwise_apply, K, mode="sliding")
