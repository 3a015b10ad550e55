"""UniMatch + AuxSegNet's auxiliary tasks and cross-task affinity on shapes (docs/methods.md §4).

  python -m s4jax.main --config=configs/shapes_affinity.py --workdir=runs/shapes_affinity

The ablation arms (issue 15), each a set of overrides of this file:
  heads only:            --config.losses.affinity.refine_predictions=False
  + refined predictions: (this file as it is)
  + refined pseudo-labels: --config.losses.affinity.refine_pseudo_labels=True
  + refined evaluation:  --config.losses.affinity.refine_pseudo_labels=True
                         --config.losses.affinity.refine_eval=True
The pretrained regime: configs/shapes_affinity_imagenet.py.
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "shapes_unimatch.py")
  aff = config.losses.affinity
  aff.enabled = True
  # 64-px crops: an 8 x 8 affinity grid at stride 8 (16 would leave 4 x 4 cells).
  aff.stride = 8
  # On an 8 x 8 grid the paper's (6, 12) would mostly read zero padding.
  aff.dilations = (1, 2)
  aff.branch_channels = 128
  aff.refine_predictions = True
  aff.refine_pseudo_labels = False
  aff.refine_eval = False
  return config
