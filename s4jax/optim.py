"""The optax optimizer built from `config.optim`.

SGD as in UniMatch (torch.optim.SGD semantics): weight decay is added to the gradient before
momentum, the backbone and the head have separate learning rates (head x multiplier), and the
rate follows a per-step poly decay lr * (1 - t/T) ** power.
"""

import jax
import optax


def lr_schedule(optim_config, total_steps: int):
  """Backbone learning rate as a function of the step."""
  return optax.polynomial_schedule(
      init_value=optim_config.lr, end_value=0.0, power=optim_config.poly_power,
      transition_steps=total_steps)


def param_group_labels(params):
  """'backbone' for the encoder's parameters, 'head' for everything else (decoder, aux heads)."""
  return {name: jax.tree.map(lambda _, n=name: "backbone" if n == "backbone" else "head", sub)
          for name, sub in params.items()}


def make_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
  schedule = lr_schedule(optim_config, total_steps)

  def sgd_group(multiplier):
    # torch SGD: d = g + wd * p; buf = m * buf + d; p -= lr * buf.
    return optax.chain(
        optax.add_decayed_weights(optim_config.weight_decay),
        optax.sgd(lambda step: schedule(step) * multiplier, momentum=optim_config.momentum))

  return optax.multi_transform(
      {"backbone": sgd_group(1.0), "head": sgd_group(optim_config.head_lr_multiplier)},
      param_group_labels)
