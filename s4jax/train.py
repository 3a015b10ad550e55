"""The training loop: build, restore or initialise, step, log, evaluate, checkpoint.

The loop itself holds no maths: losses and updates live in `step.py`, evaluation maths in
`evaluate.py`. Everything here runs the same on one CPU, 8 simulated devices or a TPU slice;
only process 0 writes logs, images and config records.
"""

import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from s4jax import augment
from s4jax import checkpointing
from s4jax import config_schema
from s4jax import evaluate
from s4jax import logs
from s4jax import optim
from s4jax import sharding
from s4jax import state as state_lib
from s4jax import step as step_lib
from s4jax import viz
from s4jax import workdir as workdir_lib
from s4jax.data import datasets
from s4jax.data import pipeline
from s4jax.errors import ConfigError, NonFiniteLossError, UserInputError
from s4jax.losses import registry
from s4jax.models import convert
from s4jax.models import segmenter


class Run:
  """Everything a run builds once: mesh, data, model, compiled steps, state, checkpoints."""

  def __init__(self, config, workdir: str, *, overwrite: bool = False, training: bool = True):
    """`training=False` (evaluation) builds no training streams and writes no config record."""
    self.config = config
    self.workdir = workdir
    self.mesh = sharding.make_mesh()
    self.process_index = jax.process_index()
    self.process_count = jax.process_count()
    config_schema.validate(config, num_devices=self.mesh.size, process_count=self.process_count)
    self.is_writer = self.process_index == 0
    status = workdir_lib.prepare(workdir, config, overwrite=overwrite, is_writer=self.is_writer,
                                 record=training)
    if status.startswith("moved:"):
      logging.info("Moved the previous run in %s to %s", workdir, status.split(":", 1)[1])

    self.data = datasets.build(config.data)
    self.model = segmenter.build_segmenter(config.model, self.data.num_classes,
                                           aux_heads=registry.required_heads(config))
    self.tx = optim.make_optimizer(config.optim, config.total_steps)
    self.lr_schedule = optim.lr_schedule(config.optim, config.total_steps)

    self.semi_supervised = config.method != "supervised"
    self.unlabelled_batch_size = config_schema.unlabelled_batch_size(config)
    self.iterators = self._training_streams(config) if training else {}
    stream_names = ("labelled", "unlabelled") if self.semi_supervised else ("labelled",)
    self.checkpointer = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints,
                                                   iterator_names=stream_names)
    self.train_step = step_lib.make_train_step(
        self.model, self.tx, config, self.mesh,
        background_classes=self.data.background_classes)
    self.eval_step = step_lib.make_eval_step(self.model, config, self.data.num_classes,
                                             self.mesh)
    self.predict = step_lib.make_predict_fn(self.model, self.mesh)
    self.writer = logs.MetricWriter(workdir, enabled=self.is_writer)
    self.param_norm = jax.jit(optax.tree.norm)
    self._visualise = None  # compiled on first use by objective_grids

  def _training_streams(self, config) -> dict:
    """The labelled (and unlabelled) training iterators of this process."""
    if self.semi_supervised and len(self.data.unlabelled_indices) == 0:
      raise ConfigError(
          f"config.method={config.method!r} needs unlabelled images, but the unlabelled set is "
          f"empty (config.data.labelled_fraction={config.data.labelled_fraction}). Lower the "
          "labelled fraction, give an unlabelled list, or use --config.method=supervised.")
    stream = functools.partial(
        pipeline.make_train_iterator, self.data.train_source, crop_size=config.data.crop_size,
        seed=config.seed, scale_range=tuple(config.data.scale_range),
        process_index=self.process_index, process_count=self.process_count,
        num_workers=config.data.num_workers)
    iterators = {"labelled": stream(
        self.data.labelled_indices, batch_size=config.batch_size // self.process_count,
        kind="labelled")}
    if self.semi_supervised:
      iterators["unlabelled"] = stream(
          self.data.unlabelled_indices,
          batch_size=self.unlabelled_batch_size // self.process_count, kind="unlabelled")
      local = self.unlabelled_batch_size // self.mesh.size
      if local % 2:
        logging.warning(
            "%d unlabelled images per device: CutMix pairs example 2i with 2i+1 on each device, "
            "so the last one mixes with itself. An even number per device avoids this.", local)
    return iterators

  def initial_state(self):
    crop = self.config.data.crop_size
    return state_lib.init_on_mesh(self.model, self.tx, self.mesh, (1, crop, crop, 3),
                                  self.config.seed,
                                  aux=registry.init_aux(self.config, self.data.num_classes))

  def restore_or_init(self):
    """The latest checkpoint of this workdir (iterators restored in place) or a fresh state."""
    state = self.initial_state()
    restored = self.checkpointer.restore_latest(state, self.iterators)
    if restored is not None:
      return restored
    return self.with_pretrained_backbone(state)

  def with_pretrained_backbone(self, state):
    """`state` with student and teacher backbones from `config.model.pretrained` (if set)."""
    path = self.config.model.pretrained
    if not path:
      return state
    params, batch_stats = convert.load_backbone(path, jax.device_get(state.params),
                                                jax.device_get(state.batch_stats))
    put = lambda tree: jax.device_put(tree, sharding.replicated(self.mesh))  # noqa: E731
    logging.info("Backbone initialised from %s.", path)
    # The optimizer state holds zeros/moments of the same shapes: it needs no change.
    return state.replace(params=put(params), batch_stats=put(batch_stats),
                         ema_params=put(params), ema_batch_stats=put(batch_stats))

  def restore_saved(self, which: str = "latest"):
    """The state of the best or latest checkpoint, without the data iterators (for
    evaluation and export). Raises UserInputError if the workdir has no such checkpoint."""
    template = self.initial_state()
    state = (self.checkpointer.restore_best(template) if which == "best"
             else self.checkpointer.restore_latest(template, {}))
    if state is None:
      raise UserInputError(
          f"No {which} checkpoint in {self.workdir}; train first with --mode=train.")
    return state

  def next_batch(self) -> dict:
    """The labelled batch, plus the unlabelled one under `u_*` keys (semi-supervised)."""
    local = dict(next(self.iterators["labelled"]))
    if self.semi_supervised:
      unlabelled = next(self.iterators["unlabelled"])
      local["u_image"] = unlabelled["image"]
      local["u_valid"] = unlabelled["valid"]
      if "mask" in unlabelled and self.data.unlabelled_has_masks:
        local["u_mask"] = unlabelled["mask"]  # diagnostics only, never a training target
    return sharding.host_to_global(local, self.mesh)

  def epoch(self, step: int) -> float:
    """Passes over the unlabelled set (semi-supervised) or the labelled set so far."""
    if self.semi_supervised:
      return step * self.unlabelled_batch_size / len(self.data.unlabelled_indices)
    return step * self.config.batch_size / len(self.data.labelled_indices)

  # ---- evaluation ------------------------------------------------------------------------
  def eval_batches(self):
    return pipeline.make_eval_batches(
        self.data.val_source, global_batch_size=self.config.eval.batch_size,
        process_index=self.process_index, process_count=self.process_count, pad_multiple=32,
        pad_to=self.config.eval.pad_to)

  def evaluate(self, state) -> tuple[dict, dict]:
    """mIoU of student and teacher over the whole validation set.

    Returns the flat metrics to log and the full scores per model ("student", "teacher").
    """
    confusions = {"student": None, "teacher": None}
    variables = {"student": state.student_variables(), "teacher": state.teacher_variables()}
    for local in self.eval_batches():
      batch = sharding.host_to_global(local, self.mesh)
      for who in confusions:
        conf = self.eval_step(variables[who], batch["image"], batch["mask"])
        confusions[who] = conf if confusions[who] is None else confusions[who] + conf
    results, all_scores = {}, {}
    for who, conf in confusions.items():
      scores = all_scores[who] = evaluate.iou_from_confusion(np.asarray(conf))
      results[f"eval/{who}_miou"] = scores["miou"]
      results[f"eval/{who}_pixel_accuracy"] = scores["pixel_accuracy"]
      for name, iou in zip(self.data.class_names, scores["iou"]):
        results[f"eval/{who}_iou/{name}"] = iou
    return results, all_scores

  def first_eval_batch(self) -> dict:
    """The first validation batch as global arrays (the images the grids show)."""
    return sharding.host_to_global(next(iter(self.eval_batches())), self.mesh)

  def prediction_grid(self, state, batch) -> np.ndarray | None:
    """image | ground truth | student | teacher for the first validation images."""
    count = self.config.num_visualised
    if count == 0:
      return None
    preds = {who: multihost_utils.process_allgather(self.predict(v, batch["image"]), tiled=True)
             for who, v in (("student", state.student_variables()),
                            ("teacher", state.teacher_variables()))}
    images = multihost_utils.process_allgather(batch["image"], tiled=True)
    masks = multihost_utils.process_allgather(batch["mask"], tiled=True)
    palette = viz.make_palette(self.data.num_classes)
    rows = []
    for i in range(min(count, images.shape[0])):
      if np.all(masks[i] == 255):
        break  # dummy padding rows of a short last batch
      rows.append([images[i], viz.colorize(masks[i], palette),
                   viz.colorize(preds["student"][i], palette),
                   viz.colorize(preds["teacher"][i], palette)])
    return viz.image_grid(rows) if rows else None

  def objective_grids(self, state, batch, step: int) -> dict[str, np.ndarray]:
    """Each enabled objective's own pictures (e.g. input | masked input | reconstruction) of
    the first validation images, by the student; {name: grid}."""
    count = self.config.num_visualised
    visual = [(o, cfg) for o, cfg in registry.enabled(self.config) if o.visualise is not None]
    if count == 0 or not visual:
      return {}
    if self._visualise is None:
      def panels(variables, images, masks, rng):
        out = {}
        for objective, cfg in visual:
          out.update(objective.visualise(self.model, variables, augment.normalize_uint8(images),
                                         masks, rng, cfg))
        return {k: augment.denormalize_to_uint8(v) for k, v in out.items()}
      self._visualise = jax.jit(panels)
    rng = jax.random.fold_in(jax.random.key(self.config.seed), step)
    out = self._visualise(state.student_variables(), batch["image"], batch["mask"], rng)
    masks = multihost_utils.process_allgather(batch["mask"], tiled=True)
    grids = {}
    for name, value in out.items():
      value = multihost_utils.process_allgather(value, tiled=True)
      rows = [list(value[i]) for i in range(min(count, value.shape[0]))
              if not np.all(masks[i] == 255)]
      if rows:
        grids[name] = viz.image_grid(rows)
    return grids


def _kept(last_saved, workdir) -> str:
  if last_saved is None:
    return "no checkpoint had been saved yet."
  return (f"the last good checkpoint (step {last_saved}) is kept in "
          f"{os.path.join(workdir, 'checkpoints')}.")


def _fetch_mean(sums: dict, count: int) -> dict:
  """Means of the summed step metrics; confusion matrices become the mIoU they give."""
  means = {}
  for key, value in jax.device_get(sums).items():
    if key.endswith("_confusion"):
      means[key[:-len("_confusion")] + "_miou"] = evaluate.iou_from_confusion(
          np.asarray(value, np.int64))["miou"]
    else:
      means[key] = float(value) / count
  return means


def train_and_evaluate(config, workdir: str, *, overwrite: bool = False,
                       stop_after: int | None = None) -> dict:
  """Trains to `config.total_steps`, resuming if the workdir has a checkpoint.

  `stop_after` ends this invocation early at that step (with a checkpoint), e.g. to fit a
  time-limited session; running again continues. Returns the last evaluation metrics, the
  best record ("best") and the final state ("state").
  """
  run = Run(config, workdir, overwrite=overwrite)
  state = run.restore_or_init()
  start_step = int(jax.device_get(state.step))
  total = config.total_steps if stop_after is None else min(stop_after, config.total_steps)
  if start_step:
    logging.info("Resuming %s from step %d.", workdir, start_step)
  logging.info("Training %s: %d labelled images, %d classes, %d devices, steps %d..%d.",
               config.model.backbone, len(run.data.labelled_indices), run.data.num_classes,
               run.mesh.size, start_step, total)

  progress = logs.Progress(total, start_step)
  sums, count = None, 0
  last_saved = run.checkpointer.latest_step()
  final_eval, final_scores = {}, {}
  for step in range(start_step, total):
    state, metrics = run.train_step(state, run.next_batch())
    # Running sums stay on device: no host sync on the steps between logs.
    sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
    count += 1
    done = step + 1
    is_last = done == total
    should_log = done % config.log_every == 0 or is_last
    should_ckpt = done % config.checkpoint_every == 0 or is_last
    should_eval = done % config.eval_every == 0 or done == config.total_steps
    if should_log or should_ckpt or should_eval:
      means = _fetch_mean(sums, count)
      sums, count = None, 0
      if not all(math.isfinite(v) for k, v in means.items() if k.startswith("train/loss")):
        run.checkpointer.wait()
        raise NonFiniteLossError(
            f"A loss became NaN or infinite between steps {done - config.log_every} and "
            f"{done} ({', '.join(f'{k}={v}' for k, v in means.items())}). Training stopped; "
            f"{_kept(last_saved, workdir)} Lower optim.lr, or check the data.")
      means["train/lr"] = float(run.lr_schedule(step))
      means["train/epoch"] = run.epoch(done)
      speed = progress.update(done)
      if speed["steps_per_sec"] is not None:  # unknown at the first log of an invocation
        means["train/steps_per_sec"] = speed["steps_per_sec"]
      run.writer.write_scalars(done, means)
      logging.info("%s", progress.format_line(done, means, lr=means["train/lr"]))
    if should_eval:
      t0 = time.monotonic()
      final_eval, final_scores = run.evaluate(state)
      final_eval["eval/seconds"] = time.monotonic() - t0
      run.writer.write_scalars(done, final_eval)
      name = config.eval.best_metric
      if run.checkpointer.save_best(done, state, name, final_eval[name]):
        final_eval["eval/is_best"] = 1.0
      logging.info("eval @%d: student mIoU %.2f, teacher mIoU %.2f (%.1fs)", done,
                   100 * final_eval["eval/student_miou"], 100 * final_eval["eval/teacher_miou"],
                   final_eval["eval/seconds"])
      shown = run.first_eval_batch() if config.num_visualised else None
      grids = run.objective_grids(state, shown, done)
      grid = run.prediction_grid(state, shown)
      if grid is not None:
        grids["predictions"] = grid
      if grids:
        run.writer.write_images(done, grids)
      progress.update(done)  # keep evaluation time out of the steps/s figure
    if should_ckpt:
      # The losses can be finite while the update that followed them overflowed.
      if not math.isfinite(float(run.param_norm(state.params))):
        run.checkpointer.wait()
        raise NonFiniteLossError(
            f"The parameters became NaN or infinite at step {done}. Training stopped; "
            f"{_kept(last_saved, workdir)} Lower optim.lr, or check the data.")
      run.checkpointer.save(done, state, run.iterators)
      last_saved = done
  run.checkpointer.wait()
  run.writer.flush()
  skipped = run.data.skipped_summary()
  if skipped:
    logging.warning("%s", skipped)
  best = run.checkpointer.best_record()
  if final_eval:
    logging.info("Final: student mIoU %.2f, teacher mIoU %.2f; best %s %.2f at step %s.",
                 100 * final_eval["eval/student_miou"], 100 * final_eval["eval/teacher_miou"],
                 best["metric"] if best else "-", 100 * best["value"] if best else float("nan"),
                 best["step"] if best else "-")
    logging.info("Per-class IoU (teacher):\n%s",
                 evaluate.format_iou_table(final_scores["teacher"], run.data.class_names))
  run.writer.close()
  run.checkpointer.close()
  return {**final_eval, "best": best, "state": state}


def evaluate_only(config, workdir: str, *, which: str = "best") -> dict:
  """Evaluates the best (or latest) checkpoint of `workdir` without training."""
  run = Run(config, workdir, training=False)
  state = run.restore_saved(which)
  results, scores = run.evaluate(state)
  logging.info("Per-class IoU (teacher):\n%s",
               evaluate.format_iou_table(scores["teacher"], run.data.class_names))
  step = int(jax.device_get(state.step))
  logging.info("eval of the %s checkpoint (step %d): student mIoU %.2f, teacher mIoU %.2f",
               which, step, 100 * results["eval/student_miou"],
               100 * results["eval/teacher_miou"])
  run.writer.close()
  run.checkpointer.close()
  return results
