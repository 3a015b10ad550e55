"""The training loop: build, restore or initialise, step, log, evaluate, checkpoint.

The loop itself holds no maths: losses and updates live in `step.py`, evaluation maths in
`evaluate.py`. Everything here runs the same on one CPU, 8 simulated devices or a TPU slice;
only process 0 writes logs, images and config records.
"""

import functools
import math
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import parameter_overview
from jax.experimental import multihost_utils

from s4jax import augment
from s4jax import checkpointing
from s4jax import config_schema
from s4jax import errors
from s4jax import evaluate
from s4jax import logs
from s4jax import optim
from s4jax import sharding
from s4jax import state as state_lib
from s4jax import step as step_lib
from s4jax import viz
from s4jax import workdir as workdir_lib
from s4jax.data import check
from s4jax.data import datasets
from s4jax.data import pipeline
from s4jax.errors import ConfigError, NonFiniteLossError, UserInputError
from s4jax.losses import registry
from s4jax.models import convert
from s4jax.models import segmenter


class Run:
  """Everything a run builds once: mesh, data, model, compiled steps, state, checkpoints."""

  def __init__(self, config, workdir: str, *, overwrite: bool = False, training: bool = True):
    """`training=False` (evaluation, export) builds no training streams and changes nothing in
    the workdir. The config record is written by `record_config`, once the run has started."""
    self.config = config
    self.workdir = workdir
    self.training = training
    self.mesh = sharding.make_mesh()
    self.process_index = jax.process_index()
    self.process_count = jax.process_count()
    config_schema.validate(config, num_devices=self.mesh.size, process_count=self.process_count)
    self.is_writer = self.process_index == 0
    if training:
      status = workdir_lib.prepare(workdir, config, overwrite=overwrite, is_writer=self.is_writer)
      if status.startswith("moved:"):
        logging.info("Moved the previous run in %s to %s", workdir, status.split(":", 1)[1])
    else:
      workdir_lib.check_for_evaluation(workdir, config)

    self.data = datasets.build(config.data)
    # The config as given (recorded in the workdir and compared on resume) and the one the run
    # uses, with total_steps derived from total_epochs once the data sizes are known.
    self.given_config = config
    self.config = config = config_schema.resolve_total_steps(
      config, len(self.data.labelled_indices), len(self.data.unlabelled_indices)
    )
    if config.total_epochs:
      logging.info("total_epochs=%d: %d steps.", config.total_epochs, config.total_steps)
    self.model = segmenter.build_segmenter(
      config.model, self.data.num_classes, aux_heads=registry.required_heads(config)
    )
    self.tx = optim.make_optimizer(config.optim, config.total_steps)
    self.lr_schedule = optim.lr_schedule(config.optim, config.total_steps)

    self.semi_supervised = config.method != "supervised"
    self.unlabelled_batch_size = config_schema.unlabelled_batch_size(config)
    self.iterators = self._training_streams(config) if training else {}
    stream_names = ("labelled", "unlabelled") if self.semi_supervised else ("labelled",)
    self.checkpointer = checkpointing.Checkpointer(
      workdir, keep=config.keep_checkpoints, iterator_names=stream_names, read_only=not training
    )
    self.train_step = step_lib.make_train_step(
      self.model, self.tx, config, self.mesh, background_classes=self.data.background_classes
    )
    self.eval_step = step_lib.make_eval_step(self.model, config, self.data.num_classes, self.mesh)
    self.predict = step_lib.make_predict_fn(self.model, self.mesh, config)
    self.writer = logs.MetricWriter(workdir, enabled=self.is_writer and training)
    self.param_norm = jax.jit(optax.tree.norm)
    self._visualise = None  # compiled on first use by objective_grids
    self._eval_batches = None  # built on first use by eval_batches

  def _training_streams(self, config) -> dict:
    """The labelled (and unlabelled) training iterators of this process."""
    if self.semi_supervised and len(self.data.unlabelled_indices) == 0:
      raise ConfigError(
        f"config.method={config.method!r} needs unlabelled images, but the unlabelled set is "
        f"empty (config.data.labelled_fraction={config.data.labelled_fraction}). Lower the "
        "labelled fraction, give an unlabelled list, or use --config.method=supervised."
      )
    stream = functools.partial(
      pipeline.make_train_iterator,
      self.data.train_source,
      crop_size=config.data.crop_size,
      seed=config.seed,
      scale_range=tuple(config.data.scale_range),
      process_index=self.process_index,
      process_count=self.process_count,
      num_workers=config.data.num_workers,
    )
    iterators = {
      "labelled": stream(
        self.data.labelled_indices,
        batch_size=config.batch_size // self.process_count,
        kind="labelled",
      )
    }
    if self.semi_supervised:
      iterators["unlabelled"] = stream(
        self.data.unlabelled_indices,
        batch_size=self.unlabelled_batch_size // self.process_count,
        kind="unlabelled",
      )
      if self.unlabelled_batch_size == 1:
        logging.warning("One unlabelled image per step: CutMix has no partner to paste from.")
    return iterators

  def initial_state(self):
    crop = self.config.data.crop_size
    return state_lib.init_on_mesh(
      self.model,
      self.tx,
      self.mesh,
      (1, crop, crop, 3),
      self.config.seed,
      aux=registry.init_aux(
        self.config, self.data.num_classes, segmenter.feature_widths(self.model)
      ),
    )

  def restore_or_init(self):
    """The newest intact checkpoint of this workdir (iterators restored in place) or a fresh
    state. Damaged checkpoints are moved to damaged/ with a warning (so the resumed run can
    save those steps again), as is a damaged best/."""
    state = self.initial_state()
    restored = self.checkpointer.restore_latest(state, self.iterators, set_aside_damaged=True)
    self.checkpointer.set_aside_damaged_best()
    if restored is not None:
      return restored
    return self.with_pretrained_backbone(state)

  def record_config(self) -> None:
    """Writes the workdir's config record: called once data and state are built, so that a
    start that fails leaves none (the corrected command is then not "a different run")."""
    if self.is_writer:
      workdir_lib.record(self.workdir, self.given_config)

  def record_parameters(self, state) -> None:
    """Writes <workdir>/parameters.txt, a table of the student's parameters (module path,
    shape, dtype, count; clu.parameter_overview, as big_vision logs it) and logs the total."""
    params = jax.eval_shape(lambda p: p, state.params)
    count = parameter_overview.count_parameters(params)
    logging.info(
      "The student has %s parameters (table: %s).",
      f"{count:,}",
      os.path.join(self.workdir, "parameters.txt"),
    )
    if self.is_writer:
      table = parameter_overview.get_parameter_overview(params, include_stats=False)
      with open(os.path.join(self.workdir, "parameters.txt"), "w") as f:
        f.write(table + "\n")
      # TensorBoard's Text tab: what was trained, beside its curves (markdown code blocks).
      step = int(jax.device_get(state.step))
      self.writer.write_text(step, "config", "```\n" + str(self.config) + "\n```")
      self.writer.write_text(step, "parameters", "```\n" + table + "\n```")

  def check_files(self) -> None:
    """`data.check_files`: every example of the training and validation sets read once."""
    if not self.config.data.check_files:
      return
    if self.config.data.name == "shapes":
      logging.info("data.check_files: the shapes dataset is generated; no files to check.")
      return
    check.check_sources(
      [("training set", self.data.train_source), ("validation set", self.data.val_source)],
      on_bad_example=self.config.data.on_bad_example,
      process_index=self.process_index,
      process_count=self.process_count,
    )
    skipped = self.data.skipped_summary()
    if skipped:
      logging.warning("data.check_files: %s", skipped)

  def close(self, *, after_error: bool = False) -> None:
    """Waits until every checkpoint save is complete on disk, then closes the writers.

    After an error (`after_error`) a failure here is logged rather than raised, so the error
    that stopped the run stays the one reported.
    """
    try:
      self.checkpointer.close()
    except Exception as e:  # pylint: disable=broad-except
      if not after_error:
        raise
      logging.error("Could not finish the checkpoint save in flight: %s: %s", type(e).__name__, e)
    finally:
      self.writer.close()

  def with_pretrained_backbone(self, state):
    """`state` with student and teacher backbones from `config.model.pretrained` (if set)."""
    path = self.config.model.pretrained
    if not path:
      return state
    params, batch_stats = convert.load_backbone(
      path, jax.device_get(state.params), jax.device_get(state.batch_stats)
    )
    put = lambda tree: jax.device_put(tree, sharding.replicated(self.mesh))  # noqa: E731
    logging.info("Backbone initialised from %s.", path)
    # The optimizer state holds zeros/moments of the same shapes: it needs no change.
    return state.replace(
      params=put(params),
      batch_stats=put(batch_stats),
      ema_params=put(params),
      ema_batch_stats=put(batch_stats),
    )

  def restore_saved(self, which="latest"):
    """The state of the best, the latest or a given step's checkpoint (`which`: "best",
    "latest" or an int), without the data iterators (evaluation and export). Raises
    UserInputError naming what there is instead if the workdir has no such checkpoint."""
    steps = self.checkpointer.all_steps()
    best = self.checkpointer.best_step()
    if not steps and best is None:
      raise UserInputError(f"{self.workdir} has no checkpoint yet; train first with --mode=train.")
    listed = f"checkpoints of steps {', '.join(map(str, steps))}" if steps else "no checkpoints"
    if which == "best" and best is None:
      raise UserInputError(
        f"{self.workdir} has no best checkpoint yet (best/ is written at the first "
        f"evaluation; the run has {listed}). Use --which=latest or --which=STEP."
      )
    if which not in ("best", "latest") and int(which) not in steps:
      raise UserInputError(
        f"{self.workdir} has no checkpoint of step {which}; it has {listed}"
        + (f" and the best one (step {best}, --which=best)" if best is not None else "")
        + "."
      )
    template = self.initial_state()
    if which == "best":
      return self.checkpointer.restore_best(template)
    if which == "latest":
      state = self.checkpointer.restore_latest(template, {})
      if state is None:
        raise UserInputError(
          f"{self.workdir} has no latest checkpoint (only the best one); use --which=best."
        )
      return state
    return self.checkpointer.restore_step(int(which), template)

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
    """The validation set in batches of one image size each (exact whole-image protocol);
    built once, so the sizes are read once per run."""
    if self._eval_batches is None:
      self._eval_batches = pipeline.make_eval_batches(
        self.data.val_source,
        global_batch_size=self.config.eval.batch_size,
        process_index=self.process_index,
        process_count=self.process_count,
      )
      logging.info(
        "Validation: %d images in %d batches of %d distinct sizes (the eval step "
        "compiles once per size).",
        len(self.data.val_source),
        len(self._eval_batches),
        self._eval_batches.num_shapes,
      )
    return self._eval_batches

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
    preds = {
      who: multihost_utils.process_allgather(self.predict(v, batch["image"]), tiled=True)
      for who, v in (("student", state.student_variables()), ("teacher", state.teacher_variables()))
    }
    images = multihost_utils.process_allgather(batch["image"], tiled=True)
    masks = multihost_utils.process_allgather(batch["mask"], tiled=True)
    return viz.prediction_grid(
      images,
      masks,
      [preds["student"], preds["teacher"]],
      viz.make_palette(self.data.num_classes),
      max_rows=count,
    )

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
          out.update(
            objective.visualise(
              self.model, variables, augment.normalize_uint8(images), masks, rng, cfg
            )
          )
        return {k: augment.denormalize_to_uint8(v) for k, v in out.items()}

      self._visualise = jax.jit(panels)
    rng = jax.random.fold_in(jax.random.key(self.config.seed), step)
    # The objectives' aux state rides along under "aux" (e.g. CSS's prototypes for its
    # representation-space prediction); flax ignores the extra collection.
    variables = {**state.student_variables(), "aux": state.aux}
    out = self._visualise(variables, batch["image"], batch["mask"], rng)
    masks = multihost_utils.process_allgather(batch["mask"], tiled=True)
    grids = {}
    for name, value in out.items():
      value = multihost_utils.process_allgather(value, tiled=True)
      rows = [
        list(value[i]) for i in range(min(count, value.shape[0])) if not np.all(masks[i] == 255)
      ]
      if rows:
        grids[name] = viz.image_grid(rows)
    return grids


# A multi-process run agrees every this many steps on whether a process got a stop signal (a
# small all-gather that makes the host wait for the step in flight); one process checks its
# own flag every step, for free.
STOP_CHECK_EVERY = 5


class _StopSignals:
  """SIGTERM (preemption: TPU VMs, spot instances, SLURM) and SIGINT (Ctrl-C) ask the loop to
  finish the current step, save it and stop. A second Ctrl-C quits without saving
  (KeyboardInterrupt), still after the saves in flight. Handlers are installed only in the
  main thread (Python allows no other) and the previous ones are restored on exit."""

  NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}

  def __init__(self):
    self.received = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in self.NAMES:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.received is not None:
      if signum == signal.SIGINT:
        raise KeyboardInterrupt
      return
    self.received = signum
    again = " (Ctrl-C again quits without saving)" if signum == signal.SIGINT else ""
    logging.warning("%s: finishing the current step, then saving it%s.", self.NAMES[signum], again)

  def agreed(self, steps_done_here: int, process_count: int) -> int | None:
    """The signal to stop on, the same on every process; None to go on."""
    if process_count == 1:
      return self.received
    if steps_done_here % STOP_CHECK_EVERY:
      return None
    local = np.asarray([self.received or 0], np.int32)
    everyone = np.asarray(multihost_utils.process_allgather(local)).reshape(-1)
    received = [int(s) for s in everyone if s]
    return received[0] if received else None


def _kept(last_saved, workdir) -> str:
  if last_saved is None:
    return "no checkpoint had been saved yet."
  return (
    f"the checkpoint of step {last_saved}, saved before then, is kept in "
    f"{os.path.join(workdir, 'checkpoints')}."
  )


def _check_stop_after(stop_after) -> None:
  if stop_after is None:
    return
  if isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1:
    raise ConfigError(
      f"--stop_after={stop_after} is not valid: give the step to stop at (an "
      "integer >= 1; the run saves there), or leave it out."
    )


def _fetch_mean(sums: dict, count: int) -> dict:
  """Means of the summed step metrics; confusion matrices become the mIoU they give."""
  means = {}
  for key, value in jax.device_get(sums).items():
    if key.endswith("_confusion"):
      means[key[: -len("_confusion")] + "_miou"] = evaluate.iou_from_confusion(
        np.asarray(value, np.int64)
      )["miou"]
    else:
      means[key] = float(value) / count
  return means


def train_and_evaluate(
  config, workdir: str, *, overwrite: bool = False, stop_after: int | None = None
) -> dict:
  """Trains to `config.total_steps`, resuming if the workdir has a checkpoint.

  `stop_after` ends this invocation early at that step (with a checkpoint), e.g. to fit a
  time-limited session; running again continues. Returns the last evaluation metrics, the
  best record ("best"), the final state ("state"), the run's length ("total_steps", derived
  from total_epochs if given) and, when it stopped before it, the step it stopped at
  ("stopped_at").

  SIGTERM or SIGINT: the current step is finished and saved (model and data iterators) and
  errors.Stopped is raised once the save is complete on disk. Every way out (an error, a
  signal, a NaN) first waits for the checkpoint saves in flight.
  """
  _check_stop_after(stop_after)
  with _StopSignals() as signals:
    run = Run(config, workdir, overwrite=overwrite)
    try:
      results = _train(run, signals, stop_after)
    except KeyboardInterrupt:
      latest = run.checkpointer.latest_step()
      run.close(after_error=True)
      kept = (
        "no checkpoint had been saved yet"
        if latest is None
        else f"the latest checkpoint is step {latest}"
      )
      raise errors.Stopped(
        f"interrupted by a second Ctrl-C, without saving the current step "
        f"({kept}); rerun the same command to continue.",
        130,
      ) from None
    except BaseException:
      run.close(after_error=True)
      raise
    run.close()
  return results


def _stopped(run, state, step: int, signum: int, last_saved) -> errors.Stopped:
  """Saves `state` (after `step` steps) unless it is saved already; the exception to raise."""
  name = _StopSignals.NAMES[signum]
  total = run.config.total_steps
  if step == 0:
    return errors.Stopped(
      f"stopped by {name} before the first step; nothing to save. Rerun the same command to start.",
      128 + signum,
    )
  if last_saved != step:
    if not math.isfinite(float(run.param_norm(state.params))):
      raise NonFiniteLossError(
        f"Stopped by {name} at step {step}, but the parameters are NaN or infinite, so they "
        f"were not saved; {_kept(last_saved, run.workdir)} Lower optim.lr, or check the data."
      )
    run.checkpointer.save(step, state, run.iterators)
  run.checkpointer.wait()
  return errors.Stopped(
    f"stopped by {name}: saved step {step} of {total}; rerun the same command to continue.",
    128 + signum,
  )


def _train(run, signals, stop_after) -> dict:
  config, workdir = run.config, run.workdir
  run.check_files()
  state = run.restore_or_init()
  start_step = int(jax.device_get(state.step))
  run.writer.resume_from(start_step)
  run.record_config()
  run.record_parameters(state)
  total = config.total_steps if stop_after is None else min(stop_after, config.total_steps)
  if start_step:
    logging.info("Resuming %s from step %d.", workdir, start_step)
  if stop_after is not None and start_step >= stop_after and start_step < config.total_steps:
    logging.info(
      "The run is at step %d already, past --stop_after=%d: nothing to do.", start_step, stop_after
    )
    return {
      "best": run.checkpointer.best_record(),
      "state": state,
      "stopped_at": start_step,
      "total_steps": config.total_steps,
    }
  logging.info(
    "Training %s: %d labelled images, %d classes, %d devices, steps %d..%d.",
    config.model.backbone,
    len(run.data.labelled_indices),
    run.data.num_classes,
    run.mesh.size,
    start_step,
    total,
  )

  progress = logs.Progress(total, start_step)
  sums, count = None, 0
  last_saved = run.checkpointer.latest_step()
  final_eval, final_scores = {}, {}
  for step in range(start_step, total):
    signum = signals.agreed(step - start_step, run.process_count)
    if signum is not None:
      raise _stopped(run, state, step, signum, last_saved)
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
      first = done - count
      means = _fetch_mean(sums, count)
      sums, count = None, 0
      if not all(math.isfinite(v) for k, v in means.items() if k.startswith("train/loss")):
        after_resume = (
          f" That is right after resuming from step {start_step}: if the run "
          "was fine before, that checkpoint may be damaged."
          if start_step and first == start_step
          else ""
        )
        raise NonFiniteLossError(
          f"A loss became NaN or infinite between steps {first} and {done} "
          f"({', '.join(f'{k}={v}' for k, v in means.items())}). Training stopped; "
          f"{_kept(last_saved, workdir)} Lower optim.lr, or check the data.{after_resume}"
        )
      means["train/lr"] = float(run.lr_schedule(step))
      means["train/epoch"] = run.epoch(done)
      speed = progress.update(done)
      if speed["steps_per_sec"] is not None:  # unknown at the first log of an invocation
        means["train/steps_per_sec"] = speed["steps_per_sec"]
      run.writer.write_scalars(done, means)
      logging.info(
        "%s", progress.format_line(done, logs.console_scalars(means), lr=means["train/lr"])
      )
    if should_eval:
      t0 = time.monotonic()
      final_eval, final_scores = run.evaluate(state)
      final_eval["eval/seconds"] = time.monotonic() - t0
      run.writer.write_scalars(done, final_eval)
      name = config.eval.best_metric
      if run.checkpointer.save_best(done, state, name, final_eval[name]):
        final_eval["eval/is_best"] = 1.0
      logging.info(
        "eval @%d: student mIoU %.2f, teacher mIoU %.2f (%.1fs)",
        done,
        100 * final_eval["eval/student_miou"],
        100 * final_eval["eval/teacher_miou"],
        final_eval["eval/seconds"],
      )
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
        raise NonFiniteLossError(
          f"The parameters became NaN or infinite at step {done}. Training stopped; "
          f"{_kept(last_saved, workdir)} Lower optim.lr, or check the data."
        )
      run.checkpointer.save(done, state, run.iterators)
      last_saved = done
  run.checkpointer.wait()
  run.writer.flush()
  skipped = run.data.skipped_summary()
  if skipped:
    logging.warning("%s", skipped)
  best = run.checkpointer.best_record()
  if final_eval:
    logging.info(
      "Final: student mIoU %.2f, teacher mIoU %.2f; best %s %.2f at step %s.",
      100 * final_eval["eval/student_miou"],
      100 * final_eval["eval/teacher_miou"],
      best["metric"] if best else "-",
      100 * best["value"] if best else float("nan"),
      best["step"] if best else "-",
    )
    logging.info(
      "Per-class IoU (teacher):\n%s",
      evaluate.format_iou_table(final_scores["teacher"], run.data.class_names),
    )
  results = {**final_eval, "best": best, "state": state, "total_steps": config.total_steps}
  if total < config.total_steps:
    results["stopped_at"] = total
  return results


def evaluate_only(config, workdir: str, *, which="best") -> dict:
  """Evaluates the best, the latest or a given step's checkpoint of `workdir` (`which`:
  "best", "latest" or an int) without training. The config may differ from the run's in
  what evaluation uses (`data.val_list`, `data.num_val`, `eval.*`); nothing in the workdir
  changes."""
  run = Run(config, workdir, training=False)
  try:
    state = run.restore_saved(which)
    results, scores = run.evaluate(state)
  finally:
    run.close(after_error=True)
  logging.info(
    "Per-class IoU (teacher):\n%s",
    evaluate.format_iou_table(scores["teacher"], run.data.class_names),
  )
  step = int(jax.device_get(state.step))
  what = f"the {which} checkpoint" if which in ("best", "latest") else "the checkpoint"
  logging.info(
    "eval of %s (step %d) on %d validation images: student mIoU %.2f, teacher mIoU %.2f",
    what,
    step,
    len(run.data.val_source),
    100 * results["eval/student_miou"],
    100 * results["eval/teacher_miou"],
  )
  return results
