"""s4jax: semi-supervised semantic segmentation in JAX/Flax."""

__version__ = "0.1.0"
