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
from s4jax import methods
from s4jax.losses import objective as objective_lib
from s4jax.losses import registry
from s4jax.losses import supervised
from s4jax.methods import base as method_base
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


def _pseudo_label_diagnostics(
  pseudo, confidence, valid, hidden_mask, threshold, num_classes, background_classes=(0,)
):
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
    metrics["train/pseudo_accuracy"] = (correct * labelled).sum() / jnp.maximum(labelled.sum(), 1.0)
    conf_lab = confident * labelled
    metrics["train/pseudo_accuracy_confident"] = (correct * conf_lab).sum() / jnp.maximum(
      conf_lab.sum(), 1.0
    )
    masked_truth = jnp.where(labelled > 0, hidden_mask, supervised.IGNORE_INDEX)
    metrics["train/pseudo_confusion"] = evaluate.confusion_matrix(pseudo, masked_truth, num_classes)
    background = jnp.asarray(background_classes, jnp.int32)
    truth_object = ~jnp.isin(hidden_mask.astype(jnp.int32), background) * labelled
    pseudo_object = ~jnp.isin(pseudo, background) * conf_lab
    metrics["train/pseudo_object_coverage"] = (correct * confident * truth_object).sum() / (
      jnp.maximum(truth_object.sum(), 1.0)
    )
    metrics["train/pseudo_object_precision"] = (correct * pseudo_object).sum() / jnp.maximum(
      pseudo_object.sum(), 1.0
    )
  return metrics


def _refine_targets(objectives, keys, context_fields, aux):
  """The weak view's targets after every enabled objective's target hook, in registry
  order; also returns the hooks' metrics."""
  metrics = {}

  def refine(targets):
    for (objective, cfg), key in zip(objectives, keys):
      if objective.targets is None:
        continue
      ctx = objective_lib.TargetContext(targets=targets, rng=key, **context_fields)
      targets, hook_metrics = objective.targets(ctx, cfg, aux.get(objective.name, {}))
      targets = jax.lax.stop_gradient(targets)
      metrics.update({f"{objective.name}/{k}": v for k, v in hook_metrics.items()})
    return targets

  return refine, metrics


def train_step(state, batch, *, model, tx, config, mesh, background_classes=(0,)):
  """One step of `config.method` plus every enabled auxiliary objective.

  Order: the weak view's pseudo-labels (the EMA teacher, inference mode, before the
  student's passes; or with `teacher.source = "student"` the student's own train-mode pass
  over it, no teacher forward at all) -> the objectives' target hooks -> the base method's
  passes and losses (s4jax/methods/) -> each objective's loss from the recorded context ->
  the optimizer update -> the EMA update of the teacher.
  """
  del mesh  # shardings come from the jit boundary; the partner gather crosses devices there
  method = methods.get(config.method)
  rng = step_rng(config.seed, state.step)
  k_views, k_fp, k_comp, k_dropout, k_objectives = jax.random.split(rng, 5)
  objectives = registry.enabled(config)
  objective_keys = jax.random.split(k_objectives, max(len(objectives), 1))
  hook_keys = jax.random.split(jax.random.fold_in(k_objectives, 1), max(len(objectives), 1))
  widths = segmenter.feature_widths(model) if objectives else {}  # shapes only, at trace time

  x_l, y_l = augment.normalize_uint8(batch["image"]), batch["mask"]
  u_unit = valid = teacher_logits = None
  if method.num_strong_views:
    u_unit = augment.to_unit_range(batch["u_image"])
    valid = batch["u_valid"].astype(jnp.float32)
    if config.teacher.source == "ema":
      teacher_logits = model.apply(
        state.teacher_variables(), augment.normalize(u_unit), train=False
      )["logits"]
  keys = {"fp": k_fp, "comp": k_comp}

  def loss_fn(params):
    passes = method_base.StudentPasses(model, params, state.batch_stats, k_dropout)
    unlabelled, hook_metrics = None, {}
    if method.num_strong_views:
      refine, hook_metrics = _refine_targets(
        objectives,
        hook_keys,
        dict(
          config=config,
          model=model,
          params=params,
          batch_stats=state.batch_stats,
          teacher_variables=state.teacher_variables(),
          weak_image=augment.normalize(u_unit),
          weak_valid=valid,
          step=state.step,
          num_classes=model.num_classes,
          hidden_mask=batch.get("u_mask"),
        ),
        state.aux,
      )
      unlabelled = method_base.Unlabelled(
        weak=augment.normalize(u_unit),
        valid=valid,
        views=tuple(
          method_base.strong_views(k, u_unit, valid, config)
          for k in jax.random.split(k_views, method.num_strong_views)
        ),
        teacher_logits=teacher_logits,
        refine=refine,
      )
    result = method.run(passes, x_l, y_l, unlabelled, keys, config)
    total, losses = result.total, dict(result.losses)
    if any(o.replaces_base is not None and o.replaces_base(cfg) for o, cfg in objectives):
      total = jnp.zeros_like(total)  # a tuning stage: the objectives' losses alone train
    losses.update(hook_metrics)
    targets = result.targets
    context = objective_lib.StepContext(
      config=config,
      model=model,
      params=params,
      batch_stats=state.batch_stats,
      rng=None,
      step=state.step,
      num_classes=model.num_classes,
      background_classes=tuple(background_classes),
      labelled_image=x_l,
      labelled_mask=y_l,
      labelled_features=result.features["labelled"].fused,
      weak_image=unlabelled.weak if unlabelled else None,
      weak_valid=unlabelled.valid if unlabelled else None,
      pseudo=targets.pseudo if targets else None,
      confidence=targets.confidence if targets else None,
      strong_views=result.views,
      features=result.features,
      targets=targets,
      teacher_variables=state.teacher_variables(),
      feature_widths=widths,
    )
    new_aux = dict(state.aux)
    for (objective, cfg), key in zip(objectives, objective_keys):
      loss, obj_metrics, new_aux[objective.name] = objective.loss(
        dataclasses.replace(context, rng=key), cfg, state.aux.get(objective.name, {})
      )
      total = total + loss
      losses.update({f"{objective.name}/{k}": v for k, v in obj_metrics.items()})
    new_batch_stats = passes.batch_stats
    if context.head_batch_stats:  # heads applied in train mode by objectives
      new_batch_stats = {**new_batch_stats, **context.head_batch_stats}
    return total, (losses, new_batch_stats, new_aux, targets)

  (total, (losses, new_batch_stats, new_aux, targets)), grads = jax.value_and_grad(
    loss_fn, has_aux=True
  )(state.params)
  new_state = _apply_updates_and_ema(state, grads, new_batch_stats, tx, config.teacher.ema_decay)
  new_state = new_state.replace(aux=new_aux)
  metrics = {}
  if targets is not None:
    metrics.update(
      _pseudo_label_diagnostics(
        targets.pseudo,
        targets.confidence,
        valid,
        batch.get("u_mask"),
        config.semi.threshold,
        model.num_classes,
        tuple(background_classes),
      )
    )
  metrics.update({"train/loss": total, "train/grad_norm": optax.tree.norm(grads)})
  metrics.update({f"train/{k}": v for k, v in losses.items()})
  return new_state, metrics


def make_train_step(model, tx, config, mesh, background_classes=(0,)):
  """The jitted, sharded, state-donating train step for `config.method` and objectives."""
  step_fn = functools.partial(
    train_step,
    model=model,
    tx=tx,
    config=config,
    mesh=mesh,
    background_classes=tuple(background_classes),
  )
  return jax.jit(
    step_fn,
    in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
    out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)),
    donate_argnums=0,
  )


def prediction_logits_fn(model, config):
  """(variables, normalised images) -> the logits the method predicts: the network's, then
  each enabled objective's eval hook in registry order (e.g. AuxSegNet's affinity-refined
  prediction). Evaluation, the prediction grids and `s4jax.predict` all use it."""
  refiners = [(o, cfg) for o, cfg in registry.enabled(config) if o.refine_eval is not None]

  def logits_fn(variables, images):
    logits = model.apply(variables, images, train=False)["logits"]
    for objective, cfg in refiners:
      logits = objective.refine_eval(model, variables, images, logits, cfg)
    return logits

  return logits_fn


def make_eval_step(model, config, num_classes: int, mesh):
  """Jitted (variables, images, masks) -> summed confusion matrix of that batch."""
  window, stride = config_schema.eval_window(config)

  eval_fn = evaluate.make_eval_fn(
    prediction_logits_fn(model, config),
    num_classes,
    mode=config.eval.mode,
    window=window,
    stride=stride,
  )
  return jax.jit(
    eval_fn,
    in_shardings=(
      sharding.replicated(mesh),
      sharding.batch_sharded(mesh),
      sharding.batch_sharded(mesh),
    ),
    out_shardings=sharding.replicated(mesh),
  )


def make_predict_fn(model, mesh, config=None):
  """Jitted (variables, uint8 images) -> argmax predictions, for visualisation; with
  `config`, the prediction evaluation scores (`prediction_logits_fn`)."""
  if config is None:
    logits_fn = lambda v, x: model.apply(v, x, train=False)["logits"]  # noqa: E731
  else:
    logits_fn = prediction_logits_fn(model, config)

  def predict(variables, images_uint8):
    logits = logits_fn(variables, augment.normalize_uint8(images_uint8))
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)

  return jax.jit(
    predict,
    in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
    out_shardings=sharding.batch_sharded(mesh),
  )
