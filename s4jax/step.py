"""The train and eval steps: pure functions of (state, batch), compiled once with shardings.

`make_train_step` returns a `jax.jit`-compiled function whose state argument is donated and
replicated and whose batch is split over the mesh's 'data' axis. Every mean in the loss is
over the global batch, so 1 device and N devices compute the same update.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from s4jax import augment
from s4jax import config_schema
from s4jax import evaluate
from s4jax import sharding
from s4jax import state as state_lib
from s4jax.losses import consistency
from s4jax.losses import supervised
from s4jax.models import segmenter


def step_rng(seed: int, step):
  """Per-step randomness derived from (seed, step): a restarted run replays it exactly."""
  return jax.random.fold_in(jax.random.key(seed), step)


def _apply_updates_and_ema(state, grads, new_batch_stats, tx, ema_decay):
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay_t = state_lib.ema_decay_at(state.step, ema_decay)
  return state.replace(
      step=state.step + 1,
      params=params,
      batch_stats=new_batch_stats,
      opt_state=opt_state,
      ema_params=state_lib.ema_update(state.ema_params, params, decay_t),
      ema_batch_stats=state_lib.ema_update(state.ema_batch_stats, new_batch_stats, decay_t),
  )


def supervised_train_step(state, batch, *, model, tx, config):
  """One SGD step on labelled images: CE with ignore 255, then the EMA teacher update."""
  images = augment.normalize_uint8(batch["image"])
  dropout_rng = step_rng(config.seed, state.step)

  def loss_fn(params):
    outputs, mutated = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    loss_sup = supervised.cross_entropy(outputs["logits"], batch["mask"])
    return loss_sup, mutated["batch_stats"]

  (loss_sup, new_batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = _apply_updates_and_ema(state, grads, new_batch_stats, tx, config.teacher.ema_decay)
  metrics = {
      "train/loss": loss_sup,
      "train/loss_sup": loss_sup,
      "train/grad_norm": optax.tree.norm(grads),
  }
  return new_state, metrics


# ---- semi-supervised: FixMatch / UniMatch / UniMatch V2 ----------------------------------

def _channel_dropout(key, features, rate):
  """Dropout2d: whole channels of each example zeroed with prob `rate`, the rest scaled."""
  keep = jax.random.bernoulli(key, 1.0 - rate, (features.shape[0], 1, 1, features.shape[-1]))
  return features * keep.astype(features.dtype) / (1.0 - rate)


def _complementary_dropout(key, a, b):
  """UniMatch V2: channel mask m in {0, 2}^D per example; a * m, b * (2 - m); a random half
  of the examples keep both views unchanged (mask 1)."""
  k_mask, k_keep = jax.random.split(key)
  n, d = a.shape[0], a.shape[-1]
  m = 2.0 * jax.random.bernoulli(k_mask, 0.5, (n, 1, 1, d)).astype(a.dtype)
  kept = jax.random.permutation(k_keep, n) < n // 2
  m = jnp.where(kept[:, None, None, None], 1.0, m)
  return a * m, b * (2.0 - m)


def _strong_views(key, unit_images, pseudo, confidence, valid, config, mesh):
  """One strong view of every unlabelled image, CutMixed with its partner.

  Photometric ops run per example with keys split from `key` (identical on any device
  count). CutMix pastes the partner's strong view and the partner's pseudo-label,
  confidence and validity with the same box; the partner swap runs inside `shard_map` on
  each device's rows, so nothing crosses devices.
  """
  n, h, w = unit_images.shape[:3]
  k_photo, k_box = jax.random.split(key)
  aug = config.augment
  views = jax.vmap(lambda k, x: augment.strong_photometric(k, x, aug))(
      jax.random.split(k_photo, n), unit_images)
  boxes = jax.vmap(lambda k: augment.cutmix_box(
      k, h, w, tuple(aug.cutmix_area), tuple(aug.cutmix_aspect), aug.cutmix_p))(
          jax.random.split(k_box, n))
  spec = jax.sharding.PartitionSpec(sharding.DATA_AXIS)

  def mix(box, view, y, c, v):
    return tuple(augment.paste(box, own, augment.swap_pairs(own)) for own in (view, y, c, v))

  mixed = jax.shard_map(mix, mesh=mesh, in_specs=(spec,) * 5, out_specs=(spec,) * 4)(
      boxes, views, pseudo, confidence, valid)
  view, y, c, v = mixed
  return augment.normalize(view), y, c, v


def _pseudo_label_diagnostics(pseudo, confidence, valid, hidden_mask, threshold, num_classes):
  """Share of confident pixels, and (when the dataset has hidden masks) pseudo-label
  accuracy and a confusion matrix against them. Never used for training."""
  valid_f = valid.astype(jnp.float32)
  confident = (confidence >= threshold).astype(jnp.float32) * valid_f
  metrics = {"train/confident_fraction": confident.sum() / jnp.maximum(valid_f.sum(), 1.0)}
  if hidden_mask is not None:
    labelled = valid_f * (hidden_mask != supervised.IGNORE_INDEX)
    correct = (pseudo == hidden_mask.astype(jnp.int32)).astype(jnp.float32)
    metrics["train/pseudo_accuracy"] = (correct * labelled).sum() / jnp.maximum(
        labelled.sum(), 1.0)
    conf_lab = confident * labelled
    metrics["train/pseudo_accuracy_confident"] = (correct * conf_lab).sum() / jnp.maximum(
        conf_lab.sum(), 1.0)
    masked_truth = jnp.where(labelled > 0, hidden_mask, supervised.IGNORE_INDEX)
    metrics["train/pseudo_confusion"] = evaluate.confusion_matrix(pseudo, masked_truth,
                                                                  num_classes)
  return metrics


def semi_supervised_train_step(state, batch, *, model, tx, config, mesh):
  """One step of FixMatch / UniMatch / UniMatch V2 (config.method), METHODS.md §0."""
  method = config.method
  semi = config.semi
  rng = step_rng(config.seed, state.step)
  k_view1, k_view2, k_fp, k_comp, k_dropout = jax.random.split(rng, 5)

  x_l = augment.normalize_uint8(batch["image"])
  y_l = batch["mask"]
  n_l = x_l.shape[0]
  u_unit = augment.to_unit_range(batch["u_image"])
  x_w = augment.normalize(u_unit)
  valid = batch["u_valid"].astype(jnp.float32)
  n_u = x_w.shape[0]

  # Teacher: EMA weights, inference mode, clean weak view (no gradient).
  teacher_logits = model.apply(state.teacher_variables(), x_w, train=False)["logits"]
  pseudo, confidence = consistency.pseudo_labels(teacher_logits)
  num_classes = teacher_logits.shape[-1]

  s1, y1, c1, v1 = _strong_views(k_view1, u_unit, pseudo, confidence, valid, config, mesh)
  if method != "fixmatch":
    s2, y2, c2, v2 = _strong_views(k_view2, u_unit, pseudo, confidence, valid, config, mesh)

  def forward(params, batch_stats, images, fn, rngs):
    out, mutated = model.apply({"params": params, "batch_stats": batch_stats}, images,
                               train=True, mutable=["batch_stats"], method=fn, rngs=rngs)
    return out, mutated["batch_stats"]

  def loss_fn(params):
    batch_stats = state.batch_stats
    rngs = {"dropout": k_dropout}
    losses = {}
    if method == "fixmatch":
      # One train-mode pass over [labelled; strong] (the UniMatch repository's FixMatch).
      out, batch_stats = forward(params, batch_stats, jnp.concatenate([x_l, s1]), None, rngs)
      logits_l, logits_s1 = out["logits"][:n_l], out["logits"][n_l:]
      losses["loss_sup"] = supervised.cross_entropy(logits_l, y_l)
      losses["loss_s1"] = consistency.pseudo_label_loss(logits_s1, y1, c1, v1, semi.threshold)
      total = 0.5 * (losses["loss_sup"] + losses["loss_s1"])
      return total, (losses, batch_stats)

    if method == "unimatch":
      # Pass 1: [labelled; weak] through the encoder; the decoder sees the clean features
      # and channel-dropped copies (feature perturbation) in one batch.
      def encode_decode_fp(module, images, train):
        low, high = module.encode(images, train=train)
        k_low, k_high = jax.random.split(k_fp)
        low_all = jnp.concatenate([low, _channel_dropout(k_low, low, semi.fp_dropout)])
        high_all = jnp.concatenate([high, _channel_dropout(k_high, high, semi.fp_dropout)])
        decoded = module.decode(low_all, high_all, train=train)
        return segmenter.upsample_logits(decoded["logits"], images.shape[1:3])

      logits, batch_stats = forward(params, batch_stats, jnp.concatenate([x_l, x_w]),
                                    encode_decode_fp, rngs)
      n = n_l + n_u
      logits_l = logits[:n_l]
      logits_fp = logits[n + n_l:]
      # Pass 2: [s1; s2].
      out, batch_stats = forward(params, batch_stats, jnp.concatenate([s1, s2]), None, rngs)
      logits_s1, logits_s2 = out["logits"][:n_u], out["logits"][n_u:]
      losses["loss_sup"] = supervised.cross_entropy(logits_l, y_l)
      losses["loss_s1"] = consistency.pseudo_label_loss(logits_s1, y1, c1, v1, semi.threshold)
      losses["loss_s2"] = consistency.pseudo_label_loss(logits_s2, y2, c2, v2, semi.threshold)
      losses["loss_fp"] = consistency.pseudo_label_loss(logits_fp, pseudo, confidence, valid,
                                                        semi.threshold)
      total = 0.5 * (losses["loss_sup"] + 0.25 * losses["loss_s1"] + 0.25 * losses["loss_s2"]
                     + 0.5 * losses["loss_fp"])
      return total, (losses, batch_stats)

    # unimatch_v2: labelled pass, then [s1; s2] with complementary channel dropout.
    out, batch_stats = forward(params, batch_stats, x_l, None, rngs)
    losses["loss_sup"] = supervised.cross_entropy(out["logits"], y_l)

    def encode_decode_comp(module, images, train):
      low, high = module.encode(images, train=train)
      k_low, k_high = jax.random.split(k_comp)
      low1, low2 = _complementary_dropout(k_low, low[:n_u], low[n_u:])
      high1, high2 = _complementary_dropout(k_high, high[:n_u], high[n_u:])
      decoded = module.decode(jnp.concatenate([low1, low2]), jnp.concatenate([high1, high2]),
                              train=train)
      return segmenter.upsample_logits(decoded["logits"], images.shape[1:3])

    logits, batch_stats = forward(params, batch_stats, jnp.concatenate([s1, s2]),
                                  encode_decode_comp, rngs)
    losses["loss_s1"] = consistency.pseudo_label_loss(logits[:n_u], y1, c1, v1, semi.threshold)
    losses["loss_s2"] = consistency.pseudo_label_loss(logits[n_u:], y2, c2, v2, semi.threshold)
    total = 0.5 * (losses["loss_sup"] + 0.5 * (losses["loss_s1"] + losses["loss_s2"]))
    return total, (losses, batch_stats)

  (total, (losses, new_batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  new_state = _apply_updates_and_ema(state, grads, new_batch_stats, tx, config.teacher.ema_decay)
  metrics = {"train/loss": total, "train/grad_norm": optax.tree.norm(grads)}
  metrics.update({f"train/{k}": v for k, v in losses.items()})
  metrics.update(_pseudo_label_diagnostics(pseudo, confidence, valid, batch.get("u_mask"),
                                           semi.threshold, num_classes))
  return new_state, metrics


def make_train_step(model, tx, config, mesh):
  """The jitted, sharded, state-donating train step for `config.method`."""
  if config.method == "supervised":
    step_fn = functools.partial(supervised_train_step, model=model, tx=tx, config=config)
  else:
    step_fn = functools.partial(semi_supervised_train_step, model=model, tx=tx, config=config,
                                mesh=mesh)
  return jax.jit(
      step_fn,
      in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
      out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)),
      donate_argnums=0)


def make_eval_step(model, config, num_classes: int, mesh):
  """Jitted (variables, images, masks) -> summed confusion matrix of that batch."""
  window, stride = config_schema.eval_window(config)

  def apply_fn(variables, images):
    return model.apply(variables, images, train=False)["logits"]

  eval_fn = evaluate.make_eval_fn(
      apply_fn, num_classes, mode=config.eval.mode, window=window, stride=stride)
  return jax.jit(
      eval_fn,
      in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh),
                    sharding.batch_sharded(mesh)),
      out_shardings=sharding.replicated(mesh))


def make_predict_fn(model, mesh):
  """Jitted (variables, uint8 images) -> argmax predictions, for visualisation."""

  def predict(variables, images_uint8):
    logits = model.apply(variables, augment.normalize_uint8(images_uint8), train=False)["logits"]
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)

  return jax.jit(predict, in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
                 out_shardings=sharding.batch_sharded(mesh))
