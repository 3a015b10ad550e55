"""UniMatch + Mix-and-Match patch triplets on PASCAL VOC 2012 (docs/methods.md §3).

  python -m s4jax.main --config=configs/voc_triplet.py --config.data.root=/data/VOCdevkit/VOC2012 --config.data.split=92 --config.model.pretrained=/weights/resnet101.pth --workdir=runs/voc_triplet

Base recipe: voc_unimatch.py (UniMatch configs/pascal.yaml). The triplet objective follows
Zhan et al., AAAI 2018 (code XiaohangZhan/mix-and-match); the parts marked "our adaptation"
in docs/methods.md §3 are ours. Its cost: a projection head on the labelled images'
stride-16 encoder features (8 x 21 x 21 cells), 72 patches and a 72 x 72 graph per step;
no extra encoder pass. Confident unlabelled patches too:
--config.losses.triplet.on_unlabelled=True (144 patches). Tuning the backbone on the
triplet loss alone first (the paper's use): configs/voc_triplet_tuning.py.
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "voc_unimatch.py")
  config.losses.triplet.enabled = True
  # The reference: 9 patches per image, 1 on background, sides 64-256 px on 512 crops,
  # here scaled to the 321 crop: 40-160 px, 2.5-10 cells of the stride-16 map.
  config.losses.triplet.patches_per_image = 9
  config.losses.triplet.background_share = 0.1
  config.losses.triplet.side_range = (64, 256)
  config.losses.triplet.reference_crop = 512
  config.losses.triplet.margin = 2.1
  config.losses.triplet.features = "high"
  config.losses.triplet.on_unlabelled = False
  return config
