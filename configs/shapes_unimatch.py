"""UniMatch (V1) on shapes: feature perturbation + two strong views.

python -m s4jax.main --config=configs/shapes_unimatch.py --workdir=runs/u
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "shapes_semi_base.py")
  config.method = "unimatch"
  return config
