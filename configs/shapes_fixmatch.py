"""FixMatch on shapes: one strong view, EMA teacher pseudo-labels (threshold 0.95).

python -m s4jax.main --config=configs/shapes_fixmatch.py --workdir=runs/shapes_fixmatch
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "shapes_semi_base.py")
  config.method = "fixmatch"
  return config
