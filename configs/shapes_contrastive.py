"""UniMatch + CSS's collaborative logit/representation supervision on shapes (docs/methods.md §5).

  python -m s4jax.main --config=configs/shapes_contrastive.py --workdir=runs/shapes_contrastive

The ablation (same labelled set, steps and seeds as configs/shapes_unimatch.py):
  + contrastive:                         this file
  + contrastive without cross supervision: --config.losses.contrastive.cross_supervision=False
  the pretrained regime:                 configs/shapes_contrastive_imagenet.py

CSS's values are kept (docs/methods.md §5). Note: at label_temperature 0.5 no pixel's
representation confidence can exceed 1 / (1 + 5 e^-4) = 0.916 with the 6 shapes classes, below
rep_threshold 0.97, so every image weight of the cross-supervised unlabelled CE is 0 (the run
warns at start and logs train/contrastive/rep_kept); --config.losses.contrastive.
label_temperature=0.1 (the default of CSS's Model_cross) makes the weights reachable.
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "shapes_unimatch.py")
  config.losses.contrastive.enabled = True
  # The shapes decoder is 128 wide; the representation stays CSS's 256.
  config.losses.contrastive.dim = 256
  # One strong view beside the labelled images, as CSS's single unlabelled forward.
  config.losses.contrastive.strong_views = 1
  return config
