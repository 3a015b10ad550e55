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
from s4jax.losses import supervised


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


def make_train_step(model, tx, config, mesh):
  """The jitted, sharded, state-donating train step."""
  step_fn = functools.partial(supervised_train_step, model=model, tx=tx, config=config)
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
