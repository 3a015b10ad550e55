"""UniMatch + class-wise masked image modelling on Cityscapes.

  python -m s4jax.main --config=configs/cityscapes_cwmim.py --config.data.root=/data/cityscapes --config.data.split=1_16 --workdir=runs/cs_cwmim

Base recipe: cityscapes_unimatch.py (UniMatch configs/cityscapes.yaml: crop 801, OHEM,
tau 0, sliding-window evaluation). cwmim: docs/methods.md §2 (our design where marked there).
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "cityscapes_unimatch.py")
  config.losses.cwmim.enabled = True
  # 64-px patches on the 801 crop: a 13 x 13 grid, 4 x 4 cells of the stride-16 features.
  config.losses.cwmim.patch_size = 64
  config.losses.cwmim.mask_ratio = 0.5
  # Street scenes hold many classes; the largest three cover most pixels of a crop.
  config.losses.cwmim.classes_per_image = 3
  # UniMatch V1 uses tau = 0 on Cityscapes; the class map of unlabelled images would then be
  # every pixel's argmax. cwmim's class map and semantic loss use the same threshold.
  return config
