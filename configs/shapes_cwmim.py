"""UniMatch + class-wise masked image modelling on shapes (docs/methods.md §2).

  python -m s4jax.main --config=configs/shapes_cwmim.py --workdir=runs/shapes_cwmim

Parts can be switched off one by one for ablations, e.g.
--config.losses.cwmim.fa_weight=0 or --config.losses.cwmim.smim_weight=0.
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "shapes_unimatch.py")
  config.losses.cwmim.enabled = True
  # Patches of 16 px on 64-px crops: a 4x4 grid, one patch per stride-16 feature cell.
  config.losses.cwmim.patch_size = 16
  return config
