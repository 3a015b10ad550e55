"""Segmentation evaluation: confusion matrix on device, mIoU on host.

The device side (`confusion_matrix`, `sliding_window_probabilities`, `make_eval_fn`) is
pure and has static shapes, so the training loop can jit it under its own sharding and
sum the per-batch [K, K] matrices. The host side (`iou_from_confusion`) turns the matrix
summed over the WHOLE validation set into IoUs with int64 arithmetic: per-image IoUs are
never averaged, because that weights small images and rare classes differently from the
standard protocol the papers report.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from s4jax import augment

_EVAL_MODES = ("whole", "sliding")


def confusion_matrix(pred, label, num_classes: int, ignore_index: int = 255) -> jax.Array:
  """Counts (true class, predicted class) pairs over all pixels.

  Args:
    pred: integer predictions of any shape, values expected in [0, num_classes).
    label: integer labels, same shape as `pred`.
    num_classes: K.
    ignore_index: label value to skip (255 on VOC / Cityscapes).

  Returns:
    int32 [K, K]; rows are the true class, columns the predicted class. Pixels whose
    label is `ignore_index`, negative or >= K are skipped; so are pixels whose prediction
    is out of range (an argmax never produces one, and folding it into a real cell would
    silently credit a wrong class).
  """
  k = num_classes
  pred = jnp.asarray(pred).astype(jnp.int32).reshape(-1)
  label = jnp.asarray(label).astype(jnp.int32).reshape(-1)
  if pred.shape != label.shape:
    raise ValueError(f"pred and label sizes differ: {pred.shape} vs {label.shape}")
  valid = (label != ignore_index) & (label >= 0) & (label < k) & (pred >= 0) & (pred < k)
  # Invalid pixels go to an extra overflow bin that is dropped, which keeps the output
  # shape static (no boolean indexing) and so stays jit-friendly.
  index = jnp.where(valid, label * k + pred, k * k)
  counts = jnp.bincount(index, length=k * k + 1)
  return counts[: k * k].reshape(k, k).astype(jnp.int32)


def iou_from_confusion(conf: np.ndarray) -> dict:
  """Per-class IoU, mIoU and accuracies from a dataset-wide confusion matrix.

  Classes absent from both the ground truth and the predictions (empty union) have an
  undefined IoU: they get nan and are excluded from the mean, rather than counted as 0
  (which would punish a model for a class the split never contains) or as 1. A class
  that is predicted but absent from the ground truth has IoU 0 and does count. On the
  full VOC / Cityscapes validation sets every class occurs, so this only matters for
  small subsets (smoke runs, debugging).

  Args:
    conf: [K, K] counts, rows = true class, cols = predicted class, summed over the
      whole dataset (never per-image IoUs averaged).

  Returns:
    {"miou": float, "iou": float64 [K] (nan where the union is empty),
     "pixel_accuracy": float, "mean_accuracy": float (mean over classes present in the
     ground truth)}. Metrics are nan if no pixel was counted.
  """
  # int64: summed Cityscapes counts (500 x 2 Mpx) overflow int32 for large classes.
  conf = np.asarray(conf, dtype=np.int64)
  if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
    raise ValueError(f"confusion matrix must be square [K, K], got {conf.shape}")
  true_pos = np.diag(conf)
  gt_count = conf.sum(axis=1)
  pred_count = conf.sum(axis=0)
  union = gt_count + pred_count - true_pos
  total = conf.sum()

  iou = np.full(conf.shape[0], np.nan, dtype=np.float64)
  has_union = union > 0
  iou[has_union] = true_pos[has_union] / union[has_union]
  class_acc = np.full(conf.shape[0], np.nan, dtype=np.float64)
  has_gt = gt_count > 0
  class_acc[has_gt] = true_pos[has_gt] / gt_count[has_gt]

  # Explicit guards instead of np.nanmean, which warns on all-nan input.
  miou = float(iou[has_union].mean()) if has_union.any() else float("nan")
  mean_acc = float(class_acc[has_gt].mean()) if has_gt.any() else float("nan")
  pixel_acc = float(true_pos.sum() / total) if total > 0 else float("nan")
  return {
    "miou": miou,
    "iou": iou,
    "pixel_accuracy": pixel_acc,
    "mean_accuracy": mean_acc,
  }


def format_iou_table(iou_result: dict, class_names: Sequence[str] | None = None) -> str:
  """Readable per-class table (IoU in %) followed by the summary metrics."""
  iou = np.asarray(iou_result["iou"])
  if class_names is None:
    class_names = [f"class_{i}" for i in range(len(iou))]
  if len(class_names) != len(iou):
    raise ValueError(f"{len(class_names)} class names for {len(iou)} classes")
  name_width = max([len("class")] + [len(str(n)) for n in class_names])

  def pct(value):
    return "   n/a" if np.isnan(value) else f"{100.0 * value:6.2f}"

  lines = [f"{'id':>3}  {'class':<{name_width}}  {'IoU %':>6}"]
  for i, (name, value) in enumerate(zip(class_names, iou)):
    lines.append(f"{i:>3}  {str(name):<{name_width}}  {pct(value)}")
  lines.append(
    f"mIoU {pct(iou_result['miou'])}  "
    f"pixel acc {pct(iou_result['pixel_accuracy'])}  "
    f"mean acc {pct(iou_result['mean_accuracy'])}"
  )
  return "\n".join(lines)


def resize_logits(logits, height: int, width: int) -> jax.Array:
  """Bilinear resize of [N, h, w, K] logits to [N, height, width, K].

  Half-pixel centres without antialiasing, i.e. PyTorch's
  `F.interpolate(..., mode="bilinear", align_corners=False)` that the reference
  implementations use; jax.image.resize would otherwise antialias when shrinking.
  """
  logits = jnp.asarray(logits)
  n, h, w, k = logits.shape
  if (h, w) == (height, width):
    return logits
  return jax.image.resize(logits, (n, height, width, k), method="bilinear", antialias=False)


def _window_starts(size: int, window: int, stride: int) -> list[int]:
  """Start offsets along one axis, mmseg 'slide' style: stride steps, last one flush.

  `size` must be >= `window` (the caller pads first). The grid has
  ceil((size - window) / stride) + 1 positions; the last start is clamped to
  size - window so that the final window ends exactly at the border.
  """
  num = max(size - window + stride - 1, 0) // stride + 1
  return [min(i * stride, size - window) for i in range(num)]


def sliding_window_probabilities(
  predict_fn: Callable[[jax.Array], jax.Array], images, num_classes: int, window: int, stride: int
) -> jax.Array:
  """Softmax probabilities averaged over overlapping square windows.

  Args:
    predict_fn: float images [N, h, w, C] -> logits [N, h, w, K] (logits at another
      resolution are bilinearly resized to the window).
    images: [N, H, W, C] float, already normalised.
    num_classes: K.
    window: window side in pixels. If H or W is smaller, the images are zero-padded at
      the bottom/right up to the window for the forward pass and the result is cropped.
    stride: step between window starts; the last window is flush with the border.

  Returns:
    float32 [N, H, W, K]: per-pixel sum of window softmaxes divided by the number of
    windows covering the pixel.
  """
  if window <= 0 or stride <= 0:
    raise ValueError(f"window and stride must be positive, got {window}, {stride}")
  images = jnp.asarray(images)
  n, height, width, _ = images.shape
  padded_h, padded_w = max(height, window), max(width, window)
  if (padded_h, padded_w) != (height, width):
    images = jnp.pad(images, ((0, 0), (0, padded_h - height), (0, padded_w - width), (0, 0)))

  # Positions and per-pixel coverage are static (numpy at trace time).
  starts = [
    (y, x)
    for y in _window_starts(padded_h, window, stride)
    for x in _window_starts(padded_w, window, stride)
  ]
  coverage = np.zeros((padded_h, padded_w), np.float32)
  for y, x in starts:
    coverage[y : y + window, x : x + window] += 1.0

  def body(acc, start):
    y, x = start[0], start[1]
    crop = jax.lax.dynamic_slice_in_dim(
      jax.lax.dynamic_slice_in_dim(images, y, window, axis=1), x, window, axis=2
    )
    logits = resize_logits(predict_fn(crop), window, window)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    zeros = jnp.zeros((), jnp.int32)
    index = (zeros, y, x, zeros)
    window_acc = jax.lax.dynamic_slice(acc, index, probs.shape)
    return jax.lax.dynamic_update_slice(acc, window_acc + probs, index), None

  # A scan (rather than an unrolled Python loop) keeps one copy of the network in the
  # compiled program, so compile time does not grow with the number of windows, and
  # only the [N, H, W, K] accumulator is live instead of every window's logits.
  acc = jnp.zeros((n, padded_h, padded_w, num_classes), jnp.float32)
  acc, _ = jax.lax.scan(body, acc, jnp.asarray(starts, jnp.int32))
  probs = acc / jnp.asarray(coverage)[None, :, :, None]
  return probs[:, :height, :width, :]


def make_eval_fn(
  apply_fn: Callable,
  num_classes: int,
  *,
  mode: str = "whole",
  window: int | None = None,
  stride: int | None = None,
  ignore_index: int = 255,
) -> Callable:
  """Builds eval_fn(variables, images_uint8, masks) -> int32 [K, K] confusion matrix.

  Args:
    apply_fn: (variables, normalised float images [N, H, W, 3]) -> logits [N, H, W, K],
      inference mode already bound by the caller. Logits at another resolution are
      bilinearly resized to the mask size.
    num_classes: K.
    mode: "whole" (one forward pass per image; VOC) or "sliding" (averaged window
      softmaxes; Cityscapes).
    window: sliding window side; required for "sliding".
    stride: sliding stride; defaults to int(2/3 * window), UniMatch's Cityscapes
      setting.
    ignore_index: mask value skipped in the confusion matrix; padding and dummy rows in
      a batch are expected to carry it as well.

  Returns:
    A pure function; the caller jits it (with its sharding) and sums the matrices.
  """
  if mode not in _EVAL_MODES:
    raise ValueError(f"eval.mode must be one of {_EVAL_MODES}, got {mode!r}")
  if mode == "sliding":
    if window is None or window <= 0:
      raise ValueError(
        f"eval.window must be a positive int for eval.mode='sliding', got {window!r}"
      )
    if stride is None:
      stride = max(1, (2 * window) // 3)
    if stride <= 0:
      raise ValueError(f"eval.stride must be positive, got {stride!r}")

  def eval_fn(variables, images_uint8, masks):
    images = augment.normalize_uint8(images_uint8)
    height, width = masks.shape[1], masks.shape[2]
    if mode == "whole":
      scores = resize_logits(apply_fn(variables, images), height, width)
    else:
      scores = sliding_window_probabilities(
        lambda x: apply_fn(variables, x), images, num_classes, window, stride
      )
      scores = resize_logits(scores, height, width)
    pred = jnp.argmax(scores, axis=-1)
    return confusion_matrix(pred, masks, num_classes, ignore_index)

  return eval_fn
