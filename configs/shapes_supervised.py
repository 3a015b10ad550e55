"""Supervised-only baseline on the embedded shapes dataset: the demo (no downloads).

python -m s4jax.main --config=configs/shapes_supervised.py --workdir=runs/demo
"""

from s4jax import config_schema


def get_config():
  return config_schema.sibling_config(__file__, "shapes_base.py")
