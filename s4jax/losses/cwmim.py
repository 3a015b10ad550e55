"""Class-wise masked image modelling (`config.losses.cwmim`), docs/methods.md §2.

Reference: Li, Hao, Shang, Jiao, "Masked Image Modeling Boosting Semi-Supervised Semantic
Segmentation", arXiv 2411.08756. Verified there: image regions are reconstructed
independently per class; a feature aggregation loss pulls features of masked and visible
parts of one class together; masked image modelling is also applied in the semantic space.
Everything below the verified ideas is our design (docs/methods.md §2 "our design"):

- Mask: a grid of `patch_size` patches, exactly round(mask_ratio * patches) of them masked
  per image (a random permutation); masked pixels are 0 in normalised space.
- Class map Y: ground truth on labelled images, the teacher's y_hat where c >= tau (and the
  crop is valid) on unlabelled ones, 255 elsewhere.
- Class-wise reconstruction: per image up to `classes_per_image` classes of Y, largest area
  first (static count; a pair is valid if its class has masked pixels). The class-k input is
  the masked image with every pixel outside class k blanked (0). The student (encoder,
  decoder, D_rec) reconstructs it; L1/L2 on pixels in mask & class k, normalised by their
  count per pair, averaged over valid pairs. All class-images of a batch run as one batch.
- Feature aggregation: on the encoder's stride-OS features of each class-image, pixel masks
  resized (area) to the feature grid; a cell is class k if over half of it is class k, and
  masked if over half of it is masked. v_k = mean feature of visible class-k cells
  (stop-gradient), z_i = features of masked class-k cells, L_fa = mean (1 - cos(z_i, v_k))
  over all such cells of valid pairs.
- Semantic-space MIM: the student's prediction on the whole masked weak image matches the
  teacher's pseudo-label of the clean weak image, thresholded like L_s (docs/methods.md §0).
- Total: rec_weight * L_cwmim + fa_weight * L_fa + smim_weight * L_smim.

The class-wise forwards multiply the encoder's batch by `classes_per_image` (on labelled
images, and on unlabelled ones with `on_unlabelled`). `batch_norm` picks their BatchNorm
statistics: "running" (default; the running statistics, losses/objective.py, which make the
classes fully independent) or "batch" (those of the extra batch, not recorded). Neither
worked on MSRC from an ImageNet backbone (docs/methods.md §2).
"""

import jax
import jax.numpy as jnp

from s4jax.losses import consistency
from s4jax.losses import cwmim_config
from s4jax.losses import objective as objective_lib
from s4jax.models import heads
from s4jax.losses import recon

from s4jax.labels import IGNORE_INDEX


def patch_mask(key, num_images: int, height: int, width: int, patch_size: int, mask_ratio: float):
  """float32 [N, H, W], 1 on masked pixels: whole patches of an aligned grid.

  Each image masks exactly round(mask_ratio * P) of its P = ceil(H/p) * ceil(W/p) patches
  (patches on the bottom/right border are cut by the image edge).
  """
  grid_h, grid_w = -(-height // patch_size), -(-width // patch_size)
  num_patches = grid_h * grid_w
  num_masked = int(round(mask_ratio * num_patches))
  keys = jax.random.split(key, num_images)
  ranks = jax.vmap(lambda k: jax.random.permutation(k, num_patches))(keys)
  patches = (ranks < num_masked).astype(jnp.float32).reshape(num_images, grid_h, grid_w)
  pixels = jnp.repeat(jnp.repeat(patches, patch_size, axis=1), patch_size, axis=2)
  return pixels[:, :height, :width]


def select_classes(class_map, num_classes: int, count: int):
  """Up to `count` classes per image, largest area first.

  Args:
    class_map: int [N, H, W] with 255 for "no class".
    num_classes: K.
    count: classes per image (static).

  Returns:
    (classes int32 [N, count], present bool [N, count]); absent slots repeat a class of
    area 0 and are flagged False.
  """
  one_hot = jax.nn.one_hot(class_map.astype(jnp.int32), num_classes, dtype=jnp.float32)
  area = one_hot.sum(axis=(1, 2))  # 255 one-hot encodes to all zeros
  top_area, classes = jax.lax.top_k(area, count)
  return classes.astype(jnp.int32), top_area > 0


def class_regions(class_map, classes):
  """float32 [N, P, H, W]: 1 where the pixel's class is classes[n, p]."""
  return (class_map[:, None].astype(jnp.int32) == classes[:, :, None, None]).astype(jnp.float32)


def class_inputs(images, mask, regions):
  """[N, P, H, W, 3]: the masked image with every pixel outside the class blanked (0)."""
  visible = (1.0 - mask)[:, None, :, :, None] * regions[..., None]
  return images[:, None] * visible


def classwise_reconstruction_loss(
  reconstructions, target, mask, regions, present, norm: str = "l1"
):
  """Per (image, class) pair: error on masked class pixels / their count; mean over pairs
  that are present and have masked pixels. Returns (loss, number of valid pairs)."""
  error = recon.pixel_error(reconstructions, target[:, None], norm)  # [N, P, H, W]
  counted = mask[:, None] * regions
  count = counted.sum(axis=(2, 3))
  pair_loss = (error * counted).sum(axis=(2, 3)) / jnp.maximum(count, 1.0)
  valid = present & (count > 0)
  num_valid = valid.sum()
  loss = jnp.where(valid, pair_loss, 0.0).sum() / jnp.maximum(num_valid, 1)
  return loss, num_valid


def _to_grid(maps, height: int, width: int):
  """Area-resizes [..., H, W] float maps to [..., height, width]."""
  lead = maps.shape[:-2]
  return jax.image.resize(maps, (*lead, height, width), method="linear", antialias=True)


def feature_aggregation_loss(features, mask, regions, present):
  """1 - cos between features of masked class-k cells and the (stop-gradient) mean feature
  of visible class-k cells, averaged over all masked cells of pairs that have both.

  Args:
    features: [N, P, h, w, C] encoder features of the class-images.
    mask: float [N, H, W] pixel mask (1 = masked).
    regions: float [N, P, H, W] class regions.
    present: bool [N, P].
  """
  h, w = features.shape[2:4]
  region_cells = _to_grid(regions, h, w) > 0.5
  masked_cells = (_to_grid(mask, h, w) > 0.5)[:, None]
  masked = (region_cells & masked_cells).astype(jnp.float32)
  visible = (region_cells & ~masked_cells).astype(jnp.float32)
  features = features.astype(jnp.float32)
  num_visible = visible.sum(axis=(2, 3))
  prototype = (features * visible[..., None]).sum(axis=(2, 3)) / jnp.maximum(num_visible, 1.0)[
    ..., None
  ]
  prototype = jax.lax.stop_gradient(prototype)
  eps = 1e-6
  cosine = (features * prototype[:, :, None, None]).sum(-1) / (
    jnp.maximum(jnp.linalg.norm(features, axis=-1), eps)
    * jnp.maximum(jnp.linalg.norm(prototype, axis=-1), eps)[:, :, None, None]
  )
  pair_ok = present & (num_visible > 0)
  weight = masked * pair_ok[:, :, None, None]
  return recon.masked_mean(1.0 - cosine, weight)


def _encode_and_decode(module, images, train):
  """Encoder stride-OS features and fused decoder features of `images`."""
  low, high = module.encode(images, train=train)
  return high, module.decode(low, high, train=train)["features"]


def _class_map_unlabelled(pseudo, confidence, valid, threshold):
  keep = (confidence >= threshold) & (valid > 0)
  return jnp.where(keep, pseudo, IGNORE_INDEX).astype(jnp.int32)


def _loss(ctx: objective_lib.StepContext, cfg, aux):
  k_mask_l, k_mask_u = jax.random.split(ctx.rng)
  # Dropout keys of the extra forwards (with batch_norm="batch" and model.aspp_dropout > 0).
  k_drop_class, k_drop_smim = (jax.random.fold_in(ctx.rng, i) for i in (1, 2))
  batch_statistics = cfg.batch_norm == "batch"
  n_l, h, w = ctx.labelled_image.shape[:3]
  images = [ctx.labelled_image]
  maps = [ctx.labelled_mask.astype(jnp.int32)]
  masks = [patch_mask(k_mask_l, n_l, h, w, cfg.patch_size, cfg.mask_ratio)]
  mask_u = None
  if ctx.has_unlabelled:
    n_u = ctx.weak_image.shape[0]
    mask_u = patch_mask(k_mask_u, n_u, h, w, cfg.patch_size, cfg.mask_ratio)
    if cfg.on_unlabelled:
      images.append(ctx.weak_image)
      maps.append(_class_map_unlabelled(ctx.pseudo, ctx.confidence, ctx.weak_valid, ctx.threshold))
      masks.append(mask_u)
  images, class_map, mask = (jnp.concatenate(x) for x in (images, maps, masks))
  metrics = {"masked_fraction": mask.mean()}
  total = jnp.zeros((), jnp.float32)

  if cfg.rec_weight > 0 or cfg.fa_weight > 0:
    classes, present = select_classes(class_map, ctx.num_classes, cfg.classes_per_image)
    regions = class_regions(class_map, classes)
    inputs = class_inputs(images, mask, regions)
    n, p = classes.shape
    encoded, decoded = ctx.student_apply(
      inputs.reshape(n * p, h, w, 3),
      method=_encode_and_decode,
      batch_statistics=batch_statistics,
      rng=k_drop_class,
    )
    if cfg.rec_weight > 0:
      reconstructions = ctx.reconstruct(decoded, "recon").reshape(n, p, h, w, 3)
      loss_rec, num_pairs = classwise_reconstruction_loss(
        reconstructions, images, mask, regions, present, cfg.norm
      )
      metrics["loss_rec"] = loss_rec
      metrics["valid_pairs"] = num_pairs.astype(jnp.float32)
      total += cfg.rec_weight * loss_rec
    if cfg.fa_weight > 0:
      loss_fa = feature_aggregation_loss(
        encoded.reshape(n, p, *encoded.shape[1:]), mask, regions, present
      )
      metrics["loss_fa"] = loss_fa
      total += cfg.fa_weight * loss_fa

  if cfg.smim_weight > 0:
    masked_weak = ctx.weak_image * (1.0 - mask_u)[..., None]
    logits = ctx.student_apply(masked_weak, batch_statistics=batch_statistics, rng=k_drop_smim)[
      "logits"
    ]
    loss_smim = consistency.pseudo_label_loss(
      logits, ctx.pseudo, ctx.confidence, ctx.weak_valid, ctx.threshold
    )
    metrics["loss_smim"] = loss_smim
    total += cfg.smim_weight * loss_smim
  metrics["loss"] = total
  return total, metrics, aux


def _heads(cfg):
  return (heads.HeadSpec("recon", "rgb"),) if cfg.rec_weight > 0 else ()


def _visualise(model, variables, images, masks, rng, cfg):
  """input | masked input | per class: class-wise masked input, its reconstruction.

  Classes come from the ground truth of the shown (validation) images."""
  n, h, w = images.shape[:3]
  mask = patch_mask(rng, n, h, w, cfg.patch_size, cfg.mask_ratio)
  class_map = masks.astype(jnp.int32)
  classes, present = select_classes(class_map, model.num_classes, cfg.classes_per_image)
  regions = class_regions(class_map, classes) * present[:, :, None, None]
  inputs = class_inputs(images, mask, regions)
  p = classes.shape[1]
  _, decoded = model.apply(
    variables, inputs.reshape(n * p, h, w, 3), train=False, method=_encode_and_decode
  )
  panels = [images, images * (1.0 - mask)[..., None]]
  if cfg.rec_weight > 0:
    rec = model.apply(
      {"params": variables["params"]}, decoded, (h, w), "recon", method="reconstruct"
    ).reshape(n, p, h, w, 3)
    for k in range(p):
      panels += [inputs[:, k], rec[:, k]]
  return {"cwmim": jnp.stack(panels, axis=1)}


OBJECTIVE = objective_lib.Objective(
  name="cwmim",
  heads=_heads,
  loss=_loss,
  validate=cwmim_config.validate,
  visualise=_visualise,
)
