"""A trained run as one self-contained model file, for prediction without the workdir.

  python -m s4jax.export --workdir=runs/demo --out=demo_model.npz
  python -m s4jax.predict --model_file=demo_model.npz --input=photos/ --output=masks/

The file is a NumPy `.npz` archive read without pickle: every parameter and BatchNorm
statistic of the teacher (default; `--model=student` for the student) under its path in the
variable tree (`params/backbone/conv1/kernel`, `batch_stats/...`), and one JSON entry
(`s4jax.json`) holding the run's config, class names, palette, step and origin. Nothing
else is needed to rebuild the network (`load` + `build_model`). By default the best
checkpoint is written (`--which=latest` for the newest one). An existing file is never
replaced.

`export_backbone.py` is different: it writes only the backbone, torch-named, as a starting
point for another run (`model.pretrained`).
"""

import dataclasses
import json
import os
import sys
import zipfile

import jax
import ml_collections
import numpy as np

from s4jax import logs
from s4jax import viz
from s4jax import workdir as workdir_lib
from s4jax.errors import ConfigError, DataError, UserInputError
from s4jax.losses import registry
from s4jax.models import segmenter

FORMAT = "s4jax-model"
VERSION = 1
META_KEY = "s4jax.json"
COLLECTIONS = ("params", "batch_stats")


@dataclasses.dataclass
class ModelBundle:
  """What prediction needs: the variables of one network and how to build and colour it."""

  variables: dict  # {"params": ..., "batch_stats": ...} of NumPy arrays
  config: ml_collections.ConfigDict
  class_names: tuple[str, ...]
  palette: np.ndarray  # uint8 [256, 3]
  info: dict  # where it came from: workdir, step, which, model

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


# ---- from a workdir -------------------------------------------------------------------------


def from_workdir(
  workdir: str, *, which: str = "best", model: str = "teacher", data_root: str | None = None
) -> ModelBundle:
  """The teacher or student of a run's best or latest checkpoint.

  Reads the run's dataset for its class names (`data_root` replaces `config.data.root` when
  the data lives elsewhere on this machine). Raises UserInputError with one clear message.
  """
  # Imported here: train pulls in the data pipelines, which loading a model file never needs.
  from s4jax import train  # pylint: disable=g-import-not-at-top

  if which not in ("best", "latest"):
    raise UserInputError(f"--which={which!r}: use best or latest.")
  if model not in ("teacher", "student"):
    raise UserInputError(f"--model={model!r}: use teacher or student.")
  if not os.path.isdir(workdir):
    raise UserInputError(
      f"--workdir={workdir!r} does not exist (give the directory a training run wrote)."
    )
  # Checked before Run: Run would create checkpoint folders in a directory that is no run.
  config = workdir_lib.recorded_config(workdir)
  if data_root:
    config.data.root = data_root  # an operational key: the recorded config still matches
  try:
    run = train.Run(config, workdir, training=False)
  except DataError as e:
    raise DataError(
      f"{e} (The run's dataset is read for its class names: give "
      "--data_root=DIR where it is on this machine, or predict from a file "
      "made by `python -m s4jax.export` where the data is.)"
    ) from None
  except ConfigError as e:
    if "number of devices" not in str(e):
      raise
    raise ConfigError(
      f"{e} (The run's config is checked against the {jax.device_count()} "
      "devices of this machine: make fewer visible, e.g. CUDA_VISIBLE_DEVICES=0, "
      "or export the model where it was trained.)"
    ) from None
  # restore_saved only needs the state's shapes: an abstract template skips compiling the
  # initialiser, which takes longer than the restore itself (tens of seconds on a CPU).
  concrete_initial_state = run.initial_state
  run.initial_state = lambda: jax.eval_shape(concrete_initial_state)
  try:
    state = run.restore_saved(which)
  finally:
    run.checkpointer.close()
    run.writer.close()
  chosen = state.teacher_variables() if model == "teacher" else state.student_variables()
  variables = jax.device_get(chosen)
  return ModelBundle(
    variables={c: variables[c] for c in COLLECTIONS},
    config=config,
    class_names=tuple(run.data.class_names),
    palette=viz.make_palette(run.data.num_classes),
    info={
      "workdir": os.path.abspath(workdir),
      "step": int(jax.device_get(state.step)),
      "which": which,
      "model": model,
    },
  )


# ---- the file -------------------------------------------------------------------------------


def _flatten(tree, prefix: str) -> dict[str, np.ndarray]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}/{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, name))
    else:
      out[name] = np.asarray(value)
  return out


def _unflatten(arrays: dict[str, np.ndarray]) -> dict:
  tree = {c: {} for c in COLLECTIONS}
  for name, value in arrays.items():
    *parents, leaf = name.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def save(bundle: ModelBundle, out: str) -> None:
  """Writes `bundle` to `out` (.npz); refuses to replace an existing file."""
  if not out.endswith(".npz"):
    raise UserInputError(f"--out={out!r}: the file must end in .npz.")
  if os.path.exists(out):
    raise UserInputError(
      f"--out={out!r} exists; it is not replaced. Choose another name or remove it first."
    )
  arrays = {}
  for collection in COLLECTIONS:
    arrays.update(_flatten(bundle.variables.get(collection, {}), collection))
  meta = {
    "format": FORMAT,
    "version": VERSION,
    "config": workdir_lib.config_as_dict(bundle.config),
    "class_names": list(bundle.class_names),
    "palette": np.asarray(bundle.palette, np.uint8).tolist(),
    **bundle.info,
  }
  arrays[META_KEY] = np.array(json.dumps(meta))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  # Written beside the target and renamed: an interrupted export leaves no half file there.
  tmp = out[: -len(".npz")] + ".partial.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, out)


def config_from_dict(values: dict, origin: str) -> ml_collections.ConfigDict:
  """The typed config of a model file (`workdir.config_from_dict`, UserInputError)."""
  return workdir_lib.config_from_dict(values, origin, UserInputError)


def load(path: str) -> ModelBundle:
  """Reads a file written by `save`; UserInputError naming the file if it is not one."""
  not_ours = (
    f"--model_file={path!r} is not a model file of s4jax (write one with "
    "`python -m s4jax.export --workdir=RUN --out=FILE.npz`)"
  )
  if not os.path.isfile(path):
    raise UserInputError(f"--model_file={path!r} does not exist.")
  try:
    with np.load(path, allow_pickle=False) as archive:
      if META_KEY not in archive.files:
        raise UserInputError(f"{not_ours}: it has no {META_KEY} entry.")
      meta = json.loads(str(archive[META_KEY]))
      arrays = {k: archive[k] for k in archive.files if k != META_KEY}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise UserInputError(f"{not_ours} ({type(e).__name__}: {e}).") from None
  if meta.get("format") != FORMAT:
    raise UserInputError(f"{not_ours}: its {META_KEY} names format {meta.get('format')!r}.")
  if int(meta.get("version", 0)) > VERSION:
    raise UserInputError(
      f"--model_file={path!r} is format version {meta['version']}; this "
      f"s4jax reads up to {VERSION}. Update s4jax."
    )
  config = config_from_dict(meta["config"], path)
  class_names = tuple(meta["class_names"])
  bundle = ModelBundle(
    variables=_unflatten(arrays),
    config=config,
    class_names=class_names,
    palette=np.asarray(meta["palette"], np.uint8),
    info={k: meta[k] for k in ("workdir", "step", "which", "model") if k in meta},
  )
  _check_shapes(bundle, path)
  return bundle


def build_model(bundle: ModelBundle):
  """The network of `bundle` (with the auxiliary heads its run trained, so the variable
  tree is the one saved)."""
  return segmenter.build_segmenter(
    bundle.config.model, bundle.num_classes, aux_heads=registry.required_heads(bundle.config)
  )


def _check_shapes(bundle: ModelBundle, path: str) -> None:
  """A damaged or hand-edited file fails here with the first differing array, not deep in
  a forward pass."""
  model = build_model(bundle)
  crop = int(bundle.config.data.crop_size)
  expected = jax.eval_shape(
    lambda: model.init(jax.random.key(0), np.zeros((1, crop, crop, 3), np.float32), train=False)
  )
  want = _shapes(expected, COLLECTIONS)
  have = _shapes(bundle.variables, COLLECTIONS)
  for name in sorted(set(want) | set(have)):
    if want.get(name) != have.get(name):
      raise UserInputError(
        f"--model_file={path!r} does not fit the network its config builds: {name} is "
        f"{have.get(name, 'missing')} in the file, {want.get(name, 'absent')} in the "
        "network. The file is damaged or from another version of s4jax."
      )


def _shapes(tree, collections) -> dict[str, tuple]:
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f"{prefix}/{key}")
      else:
        out[f"{prefix}/{key}"] = tuple(value.shape)

  for collection in collections:
    walk(dict(tree.get(collection, {})), collection)
  return out


# ---- command line -----------------------------------------------------------------------------


def export(
  workdir: str,
  out: str,
  *,
  which: str = "best",
  model: str = "teacher",
  data_root: str | None = None,
) -> ModelBundle:
  """Writes the run's model to `out`; returns what was written."""
  if not out.endswith(".npz"):  # checked first: no restore for a file that cannot be written
    raise UserInputError(f"--out={out!r}: the file must end in .npz.")
  if os.path.exists(out):
    raise UserInputError(
      f"--out={out!r} exists; it is not replaced. Choose another name or remove it first."
    )
  bundle = from_workdir(workdir, which=which, model=model, data_root=data_root)
  save(bundle, out)
  size = os.path.getsize(out) / 2**20
  print(
    f"wrote {out} ({size:.1f} MiB): the {model} of {workdir}, {which} checkpoint (step "
    f"{bundle.info['step']}), {bundle.config.model.backbone}, {bundle.num_classes} "
    "classes"
  )
  return bundle


def _define_flags():
  # Defined only when run as a program: tests and predict import this module beside others
  # that define --workdir.
  from absl import flags  # pylint: disable=g-import-not-at-top

  return {
    "workdir": flags.DEFINE_string("workdir", None, "Directory of the trained run."),
    "out": flags.DEFINE_string("out", None, "The .npz file to write."),
    "which": flags.DEFINE_enum("which", "best", ["best", "latest"], "Which checkpoint."),
    "model": flags.DEFINE_enum(
      "model", "teacher", ["teacher", "student"], "The EMA teacher's weights or the student's."
    ),
    "data_root": flags.DEFINE_string(
      "data_root",
      None,
      "Where the run's dataset is on this machine, if not at the "
      "recorded config.data.root (read for the class names).",
    ),
  }


def _fail(message: str) -> None:
  print(f"s4jax: error: {message}", file=sys.stderr)
  sys.exit(2)


def run():
  from absl import app  # pylint: disable=g-import-not-at-top

  values = _define_flags()

  def main(argv):
    logs.set_up_console()
    if len(argv) > 1:
      _fail(f"unexpected arguments {argv[1:]}; use --flag=value.")
    for name in ("workdir", "out"):
      if not values[name].value:
        _fail(f"--{name} is required, e.g. --workdir=runs/demo --out=demo_model.npz")
    try:
      export(
        values["workdir"].value,
        values["out"].value,
        which=values["which"].value,
        model=values["model"].value,
        data_root=values["data_root"].value,
      )
    except UserInputError as e:
      _fail(str(e))

  app.run(main)


if __name__ == "__main__":
  run()
