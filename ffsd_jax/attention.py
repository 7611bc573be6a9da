"""Attention maps, the normalised distance and the diversity shift (docs/method.md §2, §5).

These primitives are shared by the model (which needs the diversity-shifted feature as the input of a decoder's
eval-mode pass) and by the FFSD objective. Features are NHWC. All math is done in float32 whatever the compute dtype,
because the attention distances are O(1/N) and are scaled by weights from 1e-5 to 1e3 (docs/method.md §12.5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# PyTorch `F.normalize` default eps.
NORMALIZE_EPS = 1e-12


def attention_map(feature: jax.Array) -> jax.Array:
  """Spatial attention map A(X): the channel mean of X², flattened to (B, H*W) in float32."""
  feature = feature.astype(jnp.float32)
  return jnp.mean(jnp.square(feature), axis=-1).reshape(feature.shape[0], -1)


def _safe_norm(x: jax.Array) -> jax.Array:
  """max(‖x‖₂, 1e-12) over axis 1, with a finite gradient at x = 0 (unlike jnp.linalg.norm)."""
  return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=1, keepdims=True), NORMALIZE_EPS**2))


def l2_normalize(x: jax.Array) -> jax.Array:
  """Per-sample L2 normalisation n(v): flatten all but the batch axis, divide by max(‖v‖₂, 1e-12)."""
  x = x.astype(jnp.float32).reshape(x.shape[0], -1)
  return x / _safe_norm(x)


def normalized_distance(x: jax.Array, y: jax.Array) -> jax.Array:
  """Dist(x, y): mean over all B×(flattened size) elements of (n(x) − n(y))²."""
  return jnp.mean(jnp.square(l2_normalize(x) - l2_normalize(y)))


def diversity_shift(attention: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The shift rule of docs/method.md §5.1 on a raw attention map.

  Args:
    attention: raw attention map `a`, shape (B, N).

  Returns:
    `(target, a_hat, nu)`: the un-normalised shifted target (B, N), the unit-normalised map â (B, N) and the raw norm
    ν (B, 1). Above the threshold θ (the k-th smallest â, k = N // 3) the target is ν − â, below it â, and exactly at
    θ it is ν / 2 (`sign(0) = 0`).
  """
  attention = attention.astype(jnp.float32)
  num_positions = attention.shape[1]
  k = num_positions // 3
  if k < 1:
    raise ValueError(f'The diversity shift needs at least 3 spatial positions in the last tap, got {num_positions}.')
  nu = _safe_norm(attention)
  a_hat = attention / nu
  theta = jnp.sort(a_hat, axis=1)[:, k - 1:k]
  # The official code writes (ν/2 − â)·sign(â − θ) + ν/2. Selecting the three cases gives the same values without
  # the float32 cancellation of ν/2 − ν/2 below θ (ν ≫ â), so the bottom third is kept bit-exactly as §5.1 intends.
  target = jnp.where(a_hat > theta, nu - a_hat, jnp.where(a_hat < theta, a_hat, jnp.broadcast_to(nu / 2, a_hat.shape)))
  return target, a_hat, nu


def diversity_shifted_feature(feature: jax.Array) -> jax.Array:
  """Ỹ of docs/method.md §5.3: add (target − â)·ν / C to every channel at each spatial position.

  Args:
    feature: the previous student's last tap Y, NHWC. The caller detaches it.

  Returns:
    Ỹ in float32, same shape as `feature`.
  """
  batch, height, width, channels = feature.shape
  target, a_hat, nu = diversity_shift(attention_map(feature))
  shift = ((target - a_hat) * nu / channels).reshape(batch, height, width, 1)
  return feature.astype(jnp.float32) + shift
