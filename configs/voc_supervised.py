"""Supervised baseline on PASCAL VOC 2012: the labelled images of a split only.

  python -m s4jax.main --config=configs/voc_supervised.py --config.data.root=/data/VOCdevkit/VOC2012 --config.data.split=1464 --workdir=runs/voc1464_sup

UniMatch's supervised.py: the same recipe as voc_base.py, batch doubled to 16 ("double the
batch_size ... if you use the same number of GPUs", UniMatch README), and 80 epochs over the
LABELLED set, so the step count depends on the split: 80 x 1464 / 16 = 7320 steps below
(split 1464); set --config.total_steps=$((80 * N / 16)) for a split of N labelled images.
"""

from s4jax import config_schema

NUM_LABELLED = 1464  # the split the step count below is computed for


def get_config():
  config = config_schema.sibling_config(__file__, "voc_base.py")
  config.method = "supervised"
  config.batch_size = 16
  config.unlabelled_batch_size = 0
  config.total_steps = 80 * NUM_LABELLED // config.batch_size
  return config
