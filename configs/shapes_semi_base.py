"""Shared settings of the semi-supervised shapes experiments (few labels, many unlabelled).

Not a runnable experiment by itself; `shapes_fixmatch.py`, `shapes_unimatch.py` and
`shapes_unimatch_v2.py` start from it. `shapes_supervised_semi_baseline.py` is the
supervised-only run on the same labelled images and steps.
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "shapes_base.py")
  config.data.labelled_fraction = 1 / 16
  config.unlabelled_batch_size = 8
  config.semi.threshold = 0.95
  return config
