"""Shared settings for experiments on the embedded synthetic shapes dataset.

Not a runnable experiment by itself; `shapes_*.py` configs start from it.
"""

from s4jax import config_schema


def get_config():
  config = config_schema.default_config()
  config.data.name = "shapes"
  config.data.image_size = 96
  config.data.crop_size = 64
  config.data.num_train = 2000
  config.data.num_val = 200
  config.data.labelled_fraction = 1.0
  # A small network: the demo has to train on 2 CPU cores in minutes.
  config.model.backbone = "resnet18"
  config.model.output_stride = 16
  config.model.width = 32
  config.model.aspp_channels = 128
  config.model.decoder_channels = 128
  config.batch_size = 8
  config.optim.lr = 0.01
  config.total_steps = 3000
  config.log_every = 50
  config.eval_every = 500
  config.checkpoint_every = 500
  config.eval.batch_size = 40
  return config
