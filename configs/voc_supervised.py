"""Supervised baseline on PASCAL VOC 2012: the labelled images of a split only.

  python -m s4jax.main --config=configs/voc_supervised.py --config.data.root=/data/VOCdevkit/VOC2012 --config.data.split=1464 --workdir=runs/voc1464_sup

UniMatch's supervised.py: the same recipe as voc_base.py, batch doubled to 16 ("double the
batch_size ... if you use the same number of GPUs", UniMatch README), and 80 epochs over the
LABELLED set (total_epochs, from voc_base.py), so the step count depends on the split:
80 x (1464 // 16) = 7280 steps for split 1464, derived when the run starts.
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "voc_base.py")
  config.method = "supervised"
  config.batch_size = 16
  config.unlabelled_batch_size = 0
  return config
