"""UniMatch + class-wise masked image modelling on PASCAL VOC 2012 (the flagship).

  python -m s4jax.main --config=configs/voc_cwmim.py --config.data.root=/data/VOCdevkit/VOC2012 --config.data.split=92 --workdir=runs/voc_cwmim

Base recipe: voc_unimatch.py (UniMatch configs/pascal.yaml). The cwmim objective follows
docs/methods.md §2 (Li et al., arXiv 2411.08756; the parts marked "our design" there are ours).
Its cost: `classes_per_image` extra encoder+decoder passes per labelled and unlabelled
image (here 2 x 16 = 32 class-images per step beside UniMatch's 40 image passes) plus one
pass over the masked weak images; see `benchmarks/train_step.py`.
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "voc_unimatch.py")
  config.losses.cwmim.enabled = True
  # 32-px patches on the 321 crop: an 11 x 11 grid, 2 x 2 cells of the stride-16 features.
  config.losses.cwmim.patch_size = 32
  config.losses.cwmim.mask_ratio = 0.5
  # VOC images hold 1-3 classes (background included) in most crops.
  config.losses.cwmim.classes_per_image = 2
  config.losses.cwmim.rec_weight = 1.0
  config.losses.cwmim.fa_weight = 0.1
  config.losses.cwmim.smim_weight = 0.5
  return config
