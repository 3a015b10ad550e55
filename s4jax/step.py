"""The train and eval steps: pure functions of (state, batch), compiled once with shardings.

`make_train_step` returns a `jax.jit`-compiled function whose state argument is donated and
replicated and whose batch is split over the mesh's 'data' axis. Every mean in the loss is
over the global batch, so 1 device and N devices compute the same update.
"""

import dataclasses
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
from s4jax.losses import objective as objective_lib
from s4jax.losses import registry
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
  confidence, validity and clean weak image (the reconstruction target) with the same box;
  the partner swap runs inside `shard_map` on each device's rows, so nothing crosses
  devices. Returns a `StrongView` without features (the base method adds them).
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

  def mix(box, *arrays):
    return tuple(augment.paste(box, own, augment.swap_pairs(own)) for own in arrays)

  view, y, c, v, clean = jax.shard_map(mix, mesh=mesh, in_specs=(spec,) * 6,
                                       out_specs=(spec,) * 5)(
      boxes, views, pseudo, confidence, valid, unit_images)
  return objective_lib.StrongView(
      image=augment.normalize(view), clean=augment.normalize(clean), pseudo=y, confidence=c,
      valid=v, features=None)


def _pseudo_label_diagnostics(pseudo, confidence, valid, hidden_mask, threshold, num_classes,
                              background_classes=(0,)):
  """Share of confident pixels, and (when the dataset has hidden masks) pseudo-label
  accuracy, a confusion matrix, and the object-class coverage and precision against them.
  Never used for training.

  Object coverage: of the object pixels (hidden class not in `background_classes`), the
  share that are confident and correctly labelled. Object precision: of the confident
  pixels labelled as an object class, the share that are right. The pseudo-label loss
  teaches object classes only through covered pixels, so a low coverage (or a precision
  near chance) means the unlabelled images teach little more than background.
  """
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
    background = jnp.asarray(background_classes, jnp.int32)
    truth_object = ~jnp.isin(hidden_mask.astype(jnp.int32), background) * labelled
    pseudo_object = ~jnp.isin(pseudo, background) * conf_lab
    metrics["train/pseudo_object_coverage"] = (correct * confident * truth_object).sum() / (
        jnp.maximum(truth_object.sum(), 1.0))
    metrics["train/pseudo_object_precision"] = (correct * pseudo_object).sum() / jnp.maximum(
        pseudo_object.sum(), 1.0)
  return metrics


# ---- base methods: the student's forward passes and the base losses ------------------------
# Each returns (total loss, {name: loss}, labelled features, strong views with features).
# `forward(images, fn)` runs the student in train mode and threads BatchNorm statistics
# from pass to pass; the grouping of images into passes follows the papers (METHODS.md §0).

def _supervised_method(forward, data, keys, config):
  del keys
  out = forward(data["x_l"], None)
  loss_sup = supervised.labelled_loss(out["logits"], data["y_l"], config.losses)
  return loss_sup, {"loss_sup": loss_sup}, out["features"], ()


def _fixmatch_method(forward, data, keys, config):
  """One train-mode pass over [labelled; strong] (the UniMatch repository's FixMatch)."""
  del keys
  n_l = data["x_l"].shape[0]
  (s1,) = data["views"]
  out = forward(jnp.concatenate([data["x_l"], s1.image]), None)
  losses = {
      "loss_sup": supervised.labelled_loss(out["logits"][:n_l], data["y_l"], config.losses),
      "loss_s1": consistency.pseudo_label_loss(out["logits"][n_l:], s1.pseudo, s1.confidence,
                                               s1.valid, config.semi.threshold),
  }
  total = 0.5 * (losses["loss_sup"] + losses["loss_s1"])
  views = (dataclasses.replace(s1, features=out["features"][n_l:]),)
  return total, losses, out["features"][:n_l], views


def _unimatch_method(forward, data, keys, config):
  """Pass 1: [labelled; weak] through the encoder; the decoder sees the clean features and
  channel-dropped copies (feature perturbation) in one batch. Pass 2: [s1; s2]."""
  semi = config.semi
  x_l, x_w = data["x_l"], data["x_w"]
  n_l, n_u = x_l.shape[0], x_w.shape[0]

  def encode_decode_fp(module, images, train):
    low, high = module.encode(images, train=train)
    k_low, k_high = jax.random.split(keys["fp"])
    low_all = jnp.concatenate([low, _channel_dropout(k_low, low, semi.fp_dropout)])
    high_all = jnp.concatenate([high, _channel_dropout(k_high, high, semi.fp_dropout)])
    decoded = module.decode(low_all, high_all, train=train)
    return {"logits": segmenter.upsample_logits(decoded["logits"], images.shape[1:3]),
            "features": decoded["features"]}

  out1 = forward(jnp.concatenate([x_l, x_w]), encode_decode_fp)
  logits_fp = out1["logits"][2 * n_l + n_u:]
  s1, s2 = data["views"]
  out2 = forward(jnp.concatenate([s1.image, s2.image]), None)
  losses = {
      "loss_sup": supervised.labelled_loss(out1["logits"][:n_l], data["y_l"], config.losses),
      "loss_s1": consistency.pseudo_label_loss(out2["logits"][:n_u], s1.pseudo, s1.confidence,
                                               s1.valid, semi.threshold),
      "loss_s2": consistency.pseudo_label_loss(out2["logits"][n_u:], s2.pseudo, s2.confidence,
                                               s2.valid, semi.threshold),
      "loss_fp": consistency.pseudo_label_loss(logits_fp, data["pseudo"], data["confidence"],
                                               data["valid"], semi.threshold),
  }
  total = 0.5 * (losses["loss_sup"] + 0.25 * losses["loss_s1"] + 0.25 * losses["loss_s2"]
                 + 0.5 * losses["loss_fp"])
  views = (dataclasses.replace(s1, features=out2["features"][:n_u]),
           dataclasses.replace(s2, features=out2["features"][n_u:]))
  return total, losses, out1["features"][:n_l], views


def _unimatch_v2_method(forward, data, keys, config):
  """A labelled pass, then [s1; s2] with complementary channel dropout."""
  semi = config.semi
  n_u = data["x_w"].shape[0]
  out_l = forward(data["x_l"], None)

  def encode_decode_comp(module, images, train):
    low, high = module.encode(images, train=train)
    k_low, k_high = jax.random.split(keys["comp"])
    low1, low2 = _complementary_dropout(k_low, low[:n_u], low[n_u:])
    high1, high2 = _complementary_dropout(k_high, high[:n_u], high[n_u:])
    decoded = module.decode(jnp.concatenate([low1, low2]), jnp.concatenate([high1, high2]),
                            train=train)
    return {"logits": segmenter.upsample_logits(decoded["logits"], images.shape[1:3]),
            "features": decoded["features"]}

  s1, s2 = data["views"]
  out = forward(jnp.concatenate([s1.image, s2.image]), encode_decode_comp)
  losses = {
      "loss_sup": supervised.labelled_loss(out_l["logits"], data["y_l"], config.losses),
      "loss_s1": consistency.pseudo_label_loss(out["logits"][:n_u], s1.pseudo, s1.confidence,
                                               s1.valid, semi.threshold),
      "loss_s2": consistency.pseudo_label_loss(out["logits"][n_u:], s2.pseudo, s2.confidence,
                                               s2.valid, semi.threshold),
  }
  total = 0.5 * (losses["loss_sup"] + 0.5 * (losses["loss_s1"] + losses["loss_s2"]))
  views = (dataclasses.replace(s1, features=out["features"][:n_u]),
           dataclasses.replace(s2, features=out["features"][n_u:]))
  return total, losses, out_l["features"], views


BASE_METHODS = {
    "supervised": _supervised_method,
    "fixmatch": _fixmatch_method,
    "unimatch": _unimatch_method,
    "unimatch_v2": _unimatch_v2_method,
}
# Strong views each method draws from every unlabelled image.
_NUM_STRONG_VIEWS = {"supervised": 0, "fixmatch": 1, "unimatch": 2, "unimatch_v2": 2}


def train_step(state, batch, *, model, tx, config, mesh, background_classes=(0,)):
  """One step of `config.method` plus every enabled auxiliary objective.

  The teacher (EMA weights, inference mode, clean weak view) gives pseudo-labels; strong
  views are drawn on device; the base method runs the student's passes; each objective adds
  its weighted loss from the recorded context; then the optimizer update and the EMA update
  of the teacher.
  """
  method = config.method
  num_views = _NUM_STRONG_VIEWS[method]
  rng = step_rng(config.seed, state.step)
  k_views, k_fp, k_comp, k_dropout, k_objectives = jax.random.split(rng, 5)
  objectives = registry.enabled(config)
  objective_keys = jax.random.split(k_objectives, max(len(objectives), 1))

  data = {"x_l": augment.normalize_uint8(batch["image"]), "y_l": batch["mask"], "views": ()}
  metrics = {}
  if num_views:
    u_unit = augment.to_unit_range(batch["u_image"])
    data["x_w"] = augment.normalize(u_unit)
    data["valid"] = batch["u_valid"].astype(jnp.float32)
    teacher_logits = model.apply(state.teacher_variables(), data["x_w"], train=False)["logits"]
    data["pseudo"], data["confidence"] = consistency.pseudo_labels(teacher_logits)
    data["views"] = tuple(
        _strong_views(k, u_unit, data["pseudo"], data["confidence"], data["valid"], config,
                      mesh) for k in jax.random.split(k_views, num_views))
    metrics.update(_pseudo_label_diagnostics(
        data["pseudo"], data["confidence"], data["valid"], batch.get("u_mask"),
        config.semi.threshold, teacher_logits.shape[-1], tuple(background_classes)))
  keys = {"fp": k_fp, "comp": k_comp}

  def loss_fn(params):
    batch_stats = [state.batch_stats]

    def forward(images, fn):
      out, mutated = model.apply({"params": params, "batch_stats": batch_stats[0]}, images,
                                 train=True, mutable=["batch_stats"], method=fn,
                                 rngs={"dropout": k_dropout})
      batch_stats[0] = mutated["batch_stats"]
      return out

    total, losses, labelled_features, views = BASE_METHODS[method](forward, data, keys, config)
    context = objective_lib.StepContext(
        config=config, model=model, params=params, batch_stats=state.batch_stats,
        rng=None, step=state.step, num_classes=model.num_classes,
        background_classes=tuple(background_classes), labelled_image=data["x_l"],
        labelled_mask=data["y_l"], labelled_features=labelled_features,
        weak_image=data.get("x_w"), weak_valid=data.get("valid"), pseudo=data.get("pseudo"),
        confidence=data.get("confidence"), strong_views=views)
    new_aux = dict(state.aux)
    for (objective, cfg), key in zip(objectives, objective_keys):
      loss, obj_metrics, new_aux[objective.name] = objective.loss(
          dataclasses.replace(context, rng=key), cfg, state.aux.get(objective.name, {}))
      total = total + loss
      losses.update({f"{objective.name}/{k}": v for k, v in obj_metrics.items()})
    return total, (losses, batch_stats[0], new_aux)

  (total, (losses, new_batch_stats, new_aux)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  new_state = _apply_updates_and_ema(state, grads, new_batch_stats, tx, config.teacher.ema_decay)
  new_state = new_state.replace(aux=new_aux)
  metrics.update({"train/loss": total, "train/grad_norm": optax.tree.norm(grads)})
  metrics.update({f"train/{k}": v for k, v in losses.items()})
  return new_state, metrics


def make_train_step(model, tx, config, mesh, background_classes=(0,)):
  """The jitted, sharded, state-donating train step for `config.method` and objectives."""
  step_fn = functools.partial(train_step, model=model, tx=tx, config=config, mesh=mesh,
                              background_classes=tuple(background_classes))
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
