"""A tiny configuration shared by the tests: compiles in seconds on a CPU."""

from s4jax import config_schema


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
