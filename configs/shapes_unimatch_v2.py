"""UniMatch V2 on shapes: two strong views with complementary channel dropout.

python -m s4jax.main --config=configs/shapes_unimatch_v2.py --workdir=runs/u2
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "shapes_semi_base.py")
  config.method = "unimatch_v2"
  # UniMatch V2's teacher EMA decay.
  config.teacher.ema_decay = 0.996
  return config
