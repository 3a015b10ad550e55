"""Your own images and masks (the folder dataset): a template to copy and adapt.

  python -m s4jax.main --config=configs/folder_supervised.py --config.data.root=/data/my_data --workdir=runs/my_data

Layout and classes.json: README.md, "Real datasets". For semi-supervised training put the
unlabelled images beside the labelled ones without masks and add --config.method=unimatch.
"""

from s4jax import config_schema


def get_config():
  config = config_schema.default_config()
  config.data.name = "folder"
  config.data.root = ""
  config.data.crop_size = 321
  config.model.backbone = "resnet50"
  config.batch_size = 8
  config.unlabelled_batch_size = 8
  config.optim.lr = 0.001
  config.optim.head_lr_multiplier = 10.0
  config.total_steps = 20000
  config.eval_every = 1000
  config.checkpoint_every = 1000
  return config
