"""Per-channel normalisation constants (docs/method.md §9), applied on the device to uint8 images."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# (mean, std) in [0, 1] units, as in the reference's torchvision Normalize.
CIFAR100_MEAN_STD = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
CIFAR10_MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

MEAN_STD = {
    'cifar100': CIFAR100_MEAN_STD,
    'cifar10': CIFAR10_MEAN_STD,
    'imagenet': IMAGENET_MEAN_STD,
}


def get_mean_std(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Returns the (mean, std) pair registered under `name` ('cifar100', 'cifar10' or 'imagenet')."""
  if name not in MEAN_STD:
    raise ValueError(f'Unknown normalisation {name!r}; valid choices: {sorted(MEAN_STD)}.')
  return MEAN_STD[name]


def normalize_images(images: jax.Array, mean_std: tuple[tuple[float, ...], tuple[float, ...]],
                     dtype=jnp.float32) -> jax.Array:
  """uint8 NHWC pixels -> (x / 255 − mean) / std, in `dtype` (computed in float32)."""
  mean, std = (jnp.asarray(v, jnp.float32) for v in mean_std)
  return ((images.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)
