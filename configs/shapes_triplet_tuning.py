"""Mix-and-Match tuning on shapes: the backbone trained on the triplet loss alone (stage 1).

  python -m s4jax.main --config=configs/shapes_triplet_tuning.py --workdir=runs/mm_tuning
  python -m s4jax.export_backbone --workdir=runs/mm_tuning --out=runs/mm_tuning/backbone.npz
  python -m s4jax.main --config=configs/shapes_unimatch_imagenet.py --config.model.pretrained=runs/mm_tuning/backbone.npz --workdir=runs/mm_then_unimatch

Zhan et al., AAAI 2018 (docs/methods.md §3): a pretrained backbone is tuned with the
class-aware patch triplets of the labelled images, then fine-tuned for segmentation. Stage 1
is this config: the labelled images of shapes_unimatch_imagenet.py's split (same data
settings and split seed), `method="supervised"` so that only those images are read, and
`losses.triplet.only=True`, which keeps the supervised loss out of the training loss (it is
still logged). The decoder gets no gradient here, so the evaluations of this stage score an
untrained decoder; only the exported backbone matters. Stage 2 is any segmentation config
started from the exported backbone (`export_backbone` writes the EMA teacher's by default;
`--weights=student` for the student's). Compare with configs/shapes_triplet.py, the triplet
loss as an auxiliary loss of UniMatch.
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "shapes_unimatch_imagenet.py")
  config.method = "supervised"
  config.losses.triplet.enabled = True
  config.losses.triplet.only = True
  config.losses.triplet.on_unlabelled = False
  # The paper tunes for 8000 iterations of 16 images; 1000 steps of 8 images (72 patches)
  # pass ~64 times over the 125 labelled images of the 1/16 split.
  config.total_steps = 1000
  config.eval_every = 1000
  config.checkpoint_every = 500
  return config
