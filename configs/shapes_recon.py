"""UniMatch + image reconstruction on shapes (docs/methods.md §1).

  python -m s4jax.main --config=configs/shapes_recon.py --workdir=runs/shapes_recon

The object/background variant: --config.losses.recon.split_foreground=True.
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "shapes_unimatch.py")
  config.losses.recon.enabled = True
  return config
