"""A tiny configuration shared by the tests: compiles in seconds on a CPU."""

import jax

from s4jax import config_schema
from s4jax import optim
from s4jax import sharding
from s4jax import state as state_lib
from s4jax import step as step_lib
from s4jax.losses import registry
from s4jax.models import segmenter


def tiny_config(**overrides):
  c = config_schema.default_config()
  c.unlock()
  c.seed = 0
  c.total_steps = 4
  c.batch_size = 8
  c.log_every = 2
  c.eval_every = 4
  c.checkpoint_every = 2
  c.num_visualised = 2
  c.model.backbone = "resnet18"
  c.model.width = 8
  c.model.aspp_channels = 16
  c.model.decoder_channels = 16
  c.data.image_size = 48
  c.data.crop_size = 32
  c.data.num_train = 64
  c.data.num_val = 16
  c.data.labelled_fraction = 0.5
  c.eval.batch_size = 8
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  c.lock()
  return c


def run_steps(config, devices, batches, num_classes=6, crop=32):
  """Initialises a state on a mesh of `devices` and applies the train step to each batch.

  Returns (final state on the host, per-step metrics on the host, the compiled step).
  """
  mesh = sharding.make_mesh(devices)
  model = segmenter.build_segmenter(
    config.model, num_classes, aux_heads=registry.required_heads(config)
  )
  tx = optim.make_optimizer(config.optim, config.total_steps)
  state = state_lib.init_on_mesh(
    model,
    tx,
    mesh,
    (1, crop, crop, 3),
    seed=0,
    aux=registry.init_aux(config, num_classes, segmenter.feature_widths(model)),
  )
  step = step_lib.make_train_step(model, tx, config, mesh)
  history = []
  for batch in batches:
    state, metrics = step(state, sharding.host_to_global(batch, mesh))
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history, step
