"""The optax optimizer built from `config.optim`.

`sgd`: as in UniMatch (torch.optim.SGD semantics): weight decay is added to the gradient
before momentum. `adamw`: decoupled weight decay (torch.optim.AdamW semantics, as UniMatch V2
uses with `weight_decay=0.01`). Either way the backbone and the head have separate learning
rates (head x multiplier), and the rate follows a per-step poly decay lr * (1 - t/T) ** power.
"""

import jax
import optax


def lr_schedule(optim_config, total_steps: int):
  """Backbone learning rate as a function of the step."""
  return optax.polynomial_schedule(
    init_value=optim_config.lr,
    end_value=0.0,
    power=optim_config.poly_power,
    transition_steps=total_steps,
  )


def param_group_labels(params):
  """'backbone' for the encoder's parameters, 'head' for everything else (decoder, aux heads)."""
  return {
    name: jax.tree.map(lambda _, n=name: "backbone" if n == "backbone" else "head", sub)
    for name, sub in params.items()
  }


def make_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
  schedule = lr_schedule(optim_config, total_steps)

  def group(multiplier):
    rate = lambda step: schedule(step) * multiplier  # noqa: E731
    if optim_config.name == "adamw":
      # torch AdamW: p -= lr * (adam_update + wd * p); optax.adamw scales wd by lr alike.
      return optax.adamw(
        rate,
        b1=optim_config.momentum,
        b2=optim_config.adam_b2,
        weight_decay=optim_config.weight_decay,
      )
    # torch SGD: d = g + wd * p; buf = m * buf + d; p -= lr * buf.
    return optax.chain(
      optax.add_decayed_weights(optim_config.weight_decay),
      optax.sgd(rate, momentum=optim_config.momentum),
    )

  return optax.multi_transform(
    {"backbone": group(1.0), "head": group(optim_config.head_lr_multiplier)}, param_group_labels
  )
