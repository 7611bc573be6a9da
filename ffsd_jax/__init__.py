"""ffsd_jax: FFSD (feature fusion and self-distillation online knowledge distillation) in JAX/Flax."""

__version__ = '0.1.0'
