"""Writes the backbone of a trained run as a weights file that `model.pretrained` reads.

  python -m s4jax.export_backbone --workdir=runs/pretrain --out=backbone.npz

The file holds torchvision-named arrays (see models/convert.py), so a backbone trained here
(on one dataset, or in a pretraining run) starts another run exactly as an ImageNet ResNet
does: `--config.model.pretrained=backbone.npz`. By default the teacher (EMA) weights of the
latest checkpoint are written; `--which=best` and `--weights=student` choose otherwise.
An existing output file is never replaced.
"""

import os
import sys

from absl import app
from absl import flags
import jax
import numpy as np

from s4jax import logs
from s4jax import train
from s4jax import workdir as workdir_lib
from s4jax.errors import UserInputError
from s4jax.models import convert
from s4jax.models import names

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the trained run.", required=True)
_OUT = flags.DEFINE_string("out", None, "The .npz file to write.", required=True)
_WHICH = flags.DEFINE_enum("which", "latest", ["latest", "best"], "Which checkpoint.")
_WEIGHTS = flags.DEFINE_enum(
  "weights", "teacher", ["teacher", "student"], "The EMA teacher's weights or the student's."
)


def export(workdir: str, out: str, *, which: str = "latest", weights: str = "teacher") -> dict:
  """Writes the run's backbone to `out`; returns the {torch name: array} written."""
  if not out.endswith(".npz"):
    raise UserInputError(f"--out={out!r}: the file must end in .npz.")
  if os.path.exists(out):
    raise UserInputError(
      f"--out={out!r} exists; it is not replaced. Choose another name or remove it first."
    )
  config = workdir_lib.recorded_config(workdir)
  run = train.Run(config, workdir, training=False)
  try:
    state = run.restore_saved(which)
  finally:
    run.checkpointer.close()
    run.writer.close()
  variables = jax.device_get(
    state.teacher_variables() if weights == "teacher" else state.student_variables()
  )
  arrays = convert.flax_to_torch(
    variables["params"]["backbone"], variables["batch_stats"]["backbone"]
  )
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  np.savez(out, **arrays)
  step = int(jax.device_get(state.step))
  # model.width sets only the ResNets' channels; the ImageNet backbones have fixed widths
  described = config.model.backbone
  if described in names.RESNETS:
    described += f", width {config.model.width}"
  print(
    f"wrote {out}: the {weights} backbone ({described}) of {workdir} at step {step}, "
    f"{len(arrays)} arrays"
  )
  return arrays


def main(argv):
  del argv
  logs.set_up_console()
  try:
    export(_WORKDIR.value, _OUT.value, which=_WHICH.value, weights=_WEIGHTS.value)
  except UserInputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
