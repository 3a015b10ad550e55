"""The train state: one pytree holding everything a step reads and writes.

The model's apply function and the optimizer are not in it (they are code, not data): the
step closes over them. Keeping the state pure data lets orbax save it as it is and lets
`jax.jit` shard and donate it.
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from s4jax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates done so far
  params: Any  # student parameters
  batch_stats: Any  # student BatchNorm statistics
  opt_state: optax.OptState
  ema_params: Any  # EMA teacher (docs/methods.md §0)
  ema_batch_stats: Any
  aux: Any  # non-trainable objective state (e.g. prototypes); {} if none

  def student_variables(self):
    return {"params": self.params, "batch_stats": self.batch_stats}

  def teacher_variables(self):
    return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}


def init_state(model, tx, rng, image_shape, aux=None) -> TrainState:
  """Initialises parameters from `rng` with a dummy batch of `image_shape` (N, H, W, 3)."""
  variables = model.init(rng, jnp.zeros(image_shape, jnp.float32), train=False)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=tx.init(params),
    # The teacher starts as a copy of the student (the EMA warm-up makes d_0 = 0 anyway).
    ema_params=jax.tree.map(jnp.copy, params),
    ema_batch_stats=jax.tree.map(jnp.copy, batch_stats),
    aux={} if aux is None else aux,
  )


def init_on_mesh(model, tx, mesh, image_shape, seed: int, aux=None) -> TrainState:
  """`init_state` compiled straight onto the mesh's replicated sharding (no host copy)."""
  init = jax.jit(
    functools.partial(init_state, model, tx, image_shape=image_shape, aux=aux),
    out_shardings=sharding.replicated(mesh),
  )
  return init(jax.random.key(seed))


def ema_decay_at(step, decay):
  """d_t = min(1 - 1/(t+1), d): a short warm-up so the teacher is not stuck at init.

  `step` is the number of updates done, counting the one just applied minus one, i.e. the
  first update (t = 0) copies the student.
  """
  t = jnp.asarray(step, jnp.float32)
  return jnp.minimum(1.0 - 1.0 / (t + 1.0), decay)


def ema_update(teacher, student, decay_t):
  """teacher <- d_t * teacher + (1 - d_t) * student, leaf by leaf."""
  return jax.tree.map(lambda t, s: decay_t * t + (1.0 - decay_t) * s, teacher, student)
