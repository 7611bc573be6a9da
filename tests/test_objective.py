"""The FFSD loss functions against independent NumPy implementations written from docs/method.md §2, §5 and §6."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from ffsd_jax import attention, methods, objective
from ffsd_jax.methods import ffsd as ffsd_method

# ----------------------------------------------------------------------------------------------------------------------
# NumPy reference implementations, written from docs/method.md (float64, explicit loops where it is element-wise).


def np_attention(feature):
  """A(X): channel mean of X² for NHWC, flattened to (B, H·W)."""
  feature = np.asarray(feature, np.float64)
  return (feature**2).mean(axis=-1).reshape(feature.shape[0], -1)


def np_normalize(v):
  v = np.asarray(v, np.float64).reshape(len(v), -1)
  return v / np.maximum(np.sqrt((v**2).sum(axis=1, keepdims=True)), 1e-12)


def np_dist(x, y):
  return float(((np_normalize(x) - np_normalize(y))**2).mean())


def np_shift(a):
  """The rule of §5.1, element by element."""
  a = np.asarray(a, np.float64)
  batch, n = a.shape
  k = n // 3
  target = np.empty_like(a)
  a_hat = np.empty_like(a)
  nu = np.empty(batch)
  for b in range(batch):
    nu[b] = np.sqrt((a[b]**2).sum())
    a_hat[b] = a[b] / max(nu[b], 1e-12)
    theta = np.sort(a_hat[b])[k - 1]
    for p in range(n):
      if a_hat[b, p] > theta:
        target[b, p] = nu[b] - a_hat[b, p]
      elif a_hat[b, p] < theta:
        target[b, p] = a_hat[b, p]
      else:
        target[b, p] = nu[b] / 2
  return target, a_hat, nu


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_ce(logits, labels):
  return float(-np_log_softmax(logits)[np.arange(len(labels)), labels].mean())


def np_kl(logits, target_logits, temperature):
  """T² · KLDivLoss(batchmean)(log_softmax(z/T), softmax(z_t/T))."""
  p = np.exp(np_log_softmax(np.asarray(target_logits) / temperature))
  log_q = np_log_softmax(np.asarray(logits) / temperature)
  return float(temperature**2 * (p * (np.log(p) - log_q)).sum() / len(logits))


def np_diversity_loss(feature, previous_feature):
  target, _, _ = np_shift(np_attention(previous_feature))
  return float(((np_normalize(np_attention(feature)) - target)**2).mean())


def np_attention_sd(taps, targets):
  return sum(np_dist(np_attention(t), np_attention(d)) for t, d in zip(taps[:-1], targets))


def np_reconstruction(reconstructions, taps):
  return sum(np_dist(r, t) + np_dist(np_attention(r), np_attention(t)) for r, t in zip(reconstructions, taps[:-1]))


def np_warmup(epoch, warmup_epochs=5):
  return np.exp(-5 * (1 - epoch / warmup_epochs)**2) if epoch <= warmup_epochs else 1.0


def close(actual, expected, rtol=2e-5, atol=1e-7):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------------------------------
# Primitives.


def test_attention_map_and_distance_match_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
  y = rng.normal(size=(3, 4, 5, 6)).astype(np.float32) * 3
  close(attention.attention_map(x), np_attention(x))
  # Dist on attention maps (H·W) and on raw features (C·H·W).
  close(attention.normalized_distance(attention.attention_map(x), attention.attention_map(y)),
        np_dist(np_attention(x), np_attention(y)))
  close(attention.normalized_distance(x, y), np_dist(x, y))
  # A bfloat16 feature still gives float32 loss math.
  assert attention.attention_map(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.float32


def test_normalize_eps_and_finite_gradient_at_zero():
  v = np.zeros((2, 5), np.float32)
  v[1] = [3.0, 4.0, 0.0, 0.0, 0.0]
  close(attention.l2_normalize(v), np_normalize(v))
  grad = jax.grad(lambda u: jnp.sum(attention.l2_normalize(u)**2))(jnp.asarray(v))
  assert np.all(np.isfinite(np.asarray(grad)))


def _tied_feature(rng, batch=2, height=4, width=6, channels=4, num_tied=3):
  """Integer-valued features (exact squares and means) where `num_tied` positions share the k-th smallest A value."""
  n = height * width
  k = n // 3
  features = np.empty((batch, n, channels), np.float32)
  for b in range(batch):
    # Distinct per-position levels, then copy one channel vector to `num_tied` positions around rank k−1.
    vectors = rng.integers(-4, 5, size=(n, channels)).astype(np.float32)
    vectors[:, 0] = np.arange(1, n + 1) * 5  # Distinct attention per position (the first channel dominates).
    order = rng.permutation(n)
    vectors = vectors[order]
    ranks = np.argsort(np.argsort((vectors**2).mean(axis=1)))
    tied_positions = np.where((ranks >= k - 2) & (ranks < k - 2 + num_tied))[0]
    vectors[tied_positions] = vectors[tied_positions[0]]
    features[b] = vectors
  return features.reshape(batch, height, width, channels), k


def test_diversity_shift_with_ties_at_threshold():
  feature, k = _tied_feature(np.random.default_rng(1))
  a = np_attention(feature)
  expected_target, expected_a_hat, expected_nu = np_shift(a)
  target, a_hat, nu = attention.diversity_shift(attention.attention_map(feature))
  close(target, expected_target)
  close(a_hat, expected_a_hat)
  close(nu[:, 0], expected_nu)
  # The construction really has 3 positions exactly at θ, each set to ν/2, and k−2 positions strictly below.
  for b in range(feature.shape[0]):
    theta = np.sort(expected_a_hat[b])[k - 1]
    assert (expected_a_hat[b] == theta).sum() == 3
    a_hat_b = np.asarray(a_hat[b])
    at_theta = a_hat_b == np.sort(a_hat_b)[k - 1]
    assert at_theta.sum() == 3
    close(np.asarray(target[b])[at_theta], np.full(3, expected_nu[b] / 2))
    assert (expected_a_hat[b] < theta).sum() == k - 2
  # Un-normalised: the target is dominated by ν (≫ 1), not a unit vector.
  assert np.all(np.linalg.norm(np.asarray(target), axis=1) > 2.0)


def test_diversity_shift_random_and_too_small_map():
  rng = np.random.default_rng(2)
  a = rng.uniform(0.1, 3.0, size=(4, 64)).astype(np.float32)
  close(attention.diversity_shift(a)[0], np_shift(a)[0])
  with pytest.raises(ValueError, match='at least 3 spatial positions'):
    attention.diversity_shift(jnp.ones((2, 2)))


def test_diversity_shifted_feature_matches_numpy():
  for feature in (_tied_feature(np.random.default_rng(3))[0],
                  np.random.default_rng(4).normal(size=(2, 8, 8, 5)).astype(np.float32)):
    batch, height, width, channels = feature.shape
    target, a_hat, nu = np_shift(np_attention(feature))
    expected = feature + ((target - a_hat) * nu[:, None] / channels).reshape(batch, height, width, 1)
    close(attention.diversity_shifted_feature(feature), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Losses.


def test_cross_entropy_and_kl_match_numpy():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(6, 10)).astype(np.float32) * 3
  target_logits = rng.normal(size=(6, 10)).astype(np.float32) * 3
  labels = rng.integers(0, 10, size=6).astype(np.int32)
  close(objective.cross_entropy(logits, labels), np_ce(logits, labels))
  for temperature in (1.0, 2.0, 3.0):
    close(objective.kl_divergence(logits, target_logits, temperature), np_kl(logits, target_logits, temperature))
  # bfloat16 logits: float32 math.
  assert objective.kl_divergence(jnp.asarray(logits, jnp.bfloat16), target_logits, 2.0).dtype == jnp.float32
  # The target side is detached.
  grad_target = jax.grad(lambda t: objective.kl_divergence(logits, t, 2.0))(jnp.asarray(target_logits))
  assert np.all(np.asarray(grad_target) == 0)
  # An underflowing target probability gives a finite KL (0·log 0 = 0).
  extreme = np.array([[200.0, -200.0, 0.0]], np.float32)
  assert np.isfinite(float(objective.kl_divergence(np.ones((1, 3), np.float32), extreme, 1.0)))


def test_diversity_loss_matches_numpy_and_detaches_previous():
  rng = np.random.default_rng(6)
  feature = rng.normal(size=(3, 8, 8, 4)).astype(np.float32)
  previous, _ = _tied_feature(rng, batch=3, height=8, width=8, channels=4)
  close(objective.diversity_loss(feature, previous), np_diversity_loss(feature, previous), rtol=1e-5)
  grad_previous = jax.grad(lambda p: objective.diversity_loss(feature, p))(jnp.asarray(previous))
  assert np.all(np.asarray(grad_previous) == 0)


def test_self_distillation_and_reconstruction_losses_match_numpy():
  rng = np.random.default_rng(7)
  shapes = [(2, 8, 8, 4), (2, 4, 4, 8), (2, 2, 2, 16)]
  taps = [rng.normal(size=s).astype(np.float32) for s in shapes]
  decoder_outputs = [rng.normal(size=s).astype(np.float32) for s in shapes[:-1]]
  close(objective.attention_self_distillation_loss(taps, decoder_outputs), np_attention_sd(taps, decoder_outputs))
  close(objective.reconstruction_loss(decoder_outputs, taps), np_reconstruction(decoder_outputs, taps))
  # The SD targets and the reconstruction targets are detached.
  grad = jax.grad(lambda d: objective.attention_self_distillation_loss(taps, d))(decoder_outputs)
  assert all(np.all(np.asarray(g) == 0) for g in grad)
  grad = jax.grad(lambda t: objective.reconstruction_loss(decoder_outputs, t))(taps)
  assert all(np.all(np.asarray(g) == 0) for g in grad)
  with pytest.raises(ValueError, match='per tap except the last'):
    objective.reconstruction_loss(decoder_outputs[:1], taps)


def test_lambda_warmup_factors():
  factors = [float(objective.lambda_warmup_factor(e)) for e in range(1, 8)]
  np.testing.assert_allclose(factors, [0.0408, 0.1653, 0.4493, 0.8187, 1.0, 1.0, 1.0], atol=5e-5)
  steps_per_epoch = 7
  steps = np.arange(0, 6 * steps_per_epoch + 3)
  scales = np.asarray(jax.jit(lambda s: objective.lambda_scale(s, steps_per_epoch))(steps))
  expected = [np_warmup(s // steps_per_epoch + 1) for s in steps]
  np.testing.assert_allclose(scales, expected, rtol=1e-6)
  # Constant within an epoch, changes exactly at the epoch boundary.
  assert scales[6] == scales[0] and scales[7] != scales[6]
  assert float(objective.lambda_scale(3, 7, warmup_epochs=0)) == 1.0


# ----------------------------------------------------------------------------------------------------------------------
# Whole objectives on a synthetic output dict.


def _synthetic_outputs(rng, num_students=3, batch=4, classes=7):
  shapes = [(batch, 8, 8, 3), (batch, 4, 4, 6), (batch, 2, 2, 12)]
  c_last = shapes[-1][-1]

  def taps():
    return tuple(rng.normal(size=s).astype(np.float32) for s in shapes)

  def decoder():
    return tuple(rng.normal(size=s).astype(np.float32) for s in shapes[:-1])

  student_taps = tuple(taps() for _ in range(num_students))
  return {
      'student_logits': tuple(rng.normal(size=(batch, classes)).astype(np.float32) * 2 for _ in range(num_students)),
      'student_taps': student_taps,
      'leader_logits': rng.normal(size=(batch, classes)).astype(np.float32) * 2,
      'leader_taps': taps(),
      'trans_fusion': rng.normal(size=(batch, 2, 2, c_last * num_students)).astype(np.float32),
      'fusion_input': np.concatenate([t[-1] for t in student_taps], axis=-1),
      'fused': rng.normal(size=shapes[-1]).astype(np.float32),
      'fusion_logits': rng.normal(size=(batch, classes)).astype(np.float32) * 2,
      'student_sd_targets': tuple(decoder() for _ in range(num_students - 1)),
      'leader_sd_targets': decoder(),
      'student_reconstructions': tuple(decoder() for _ in range(num_students - 1)),
      'leader_reconstructions': decoder(),
  }


def np_ffsd(outputs, labels, temperature, lambda_div, lambda_f, lambda_sd, warmup):
  """The group losses of §6.1–§6.4 written out."""
  lambda_div, lambda_f, lambda_sd = lambda_div * warmup, lambda_f * warmup, lambda_sd * warmup
  z = outputs['student_logits']
  taps = outputs['student_taps']
  m = len(z)
  groups = {}
  for i in range(m):
    loss = np_ce(z[i], labels) + sum(np_kl(z[i], z[j], temperature) for j in range(m) if j != i) / (m - 1)
    if i >= 1:
      loss += lambda_div * np_diversity_loss(taps[i][-1], taps[i - 1][-1])
      loss += lambda_div * np_attention_sd(taps[i], outputs['student_sd_targets'][i - 1])
    groups[f'student_{i}'] = loss
  z_bar = np.mean(np.stack(z), axis=0)
  groups['fusion'] = np_ce(outputs['fusion_logits'], labels) + np_kl(outputs['fusion_logits'], z_bar, temperature)
  leader_taps = outputs['leader_taps']
  groups['leader'] = (np_ce(outputs['leader_logits'], labels)
                      + np_kl(outputs['leader_logits'], outputs['fusion_logits'], temperature)
                      + lambda_f * np_dist(np_attention(leader_taps[-1]), np_attention(outputs['fused']))
                      + lambda_f * np_dist(np_attention(outputs['trans_fusion']), np_attention(outputs['fusion_input']))
                      + lambda_f * np_attention_sd(leader_taps, outputs['leader_sd_targets']))
  for i in range(1, m):
    groups[f'decoder_{i}'] = lambda_sd * np_reconstruction(outputs['student_reconstructions'][i - 1], taps[i])
  groups['decoder_leader'] = lambda_sd * np_reconstruction(outputs['leader_reconstructions'], leader_taps)
  return groups


@pytest.mark.parametrize('num_students', [2, 3])
def test_ffsd_objective_matches_numpy(num_students):
  rng = np.random.default_rng(8 + num_students)
  outputs = _synthetic_outputs(rng, num_students=num_students)
  labels = rng.integers(0, 7, size=4).astype(np.int32)
  weights = objective.LossWeights(temperature=2.0, lambda_diversity=0.3, lambda_fusion=10.0,
                                  lambda_self_distillation=1000.0)
  warmup = 0.1653
  result = ffsd_method.ffsd_objective(outputs, labels, weights, warmup)
  expected = np_ffsd(outputs, labels, 2.0, 0.3, 10.0, 1000.0, warmup)
  assert sorted(result.group_losses) == sorted(expected)
  for group, value in expected.items():
    close(result.group_losses[group], value, rtol=3e-5)
    close(result.terms[f'{group}/loss'], value, rtol=3e-5)
  close(result.total, sum(expected.values()), rtol=3e-5)
  close(result.terms['loss/total'], sum(expected.values()), rtol=3e-5)
  # A few raw terms (before λ).
  close(result.terms['leader/trans_fusion'],
        np_dist(np_attention(outputs['trans_fusion']), np_attention(outputs['fusion_input'])))
  close(result.terms['student_1/diversity'],
        np_diversity_loss(outputs['student_taps'][1][-1], outputs['student_taps'][0][-1]), rtol=1e-5)
  close(result.terms['decoder_leader/reconstruction'],
        np_reconstruction(outputs['leader_reconstructions'], outputs['leader_taps']))
  assert 'student_0/diversity' not in result.terms and 'student_0/sd' not in result.terms
  assert all(v.dtype == jnp.float32 and v.shape == () for v in result.terms.values())


def test_dml_and_independent_objectives_match_numpy():
  rng = np.random.default_rng(11)
  outputs = _synthetic_outputs(rng, num_students=3)
  labels = rng.integers(0, 7, size=4).astype(np.int32)
  z = outputs['student_logits']

  def method_objective(name, method_outputs):
    config = default.get_config()
    config.method = name
    return methods.get_method(config).objective(method_outputs, labels, step=7, steps_per_epoch=10)

  dml = method_objective('dml', {'student_logits': z})
  for i in range(3):
    expected = np_ce(z[i], labels) + sum(np_kl(z[i], z[j], 2.0) for j in range(3) if j != i) / 2
    close(dml.group_losses[f'student_{i}'], expected)
  assert sorted(dml.group_losses) == ['student_0', 'student_1', 'student_2']
  independent = method_objective('independent', {'student_logits': z, 'leader_logits': outputs['leader_logits']})
  assert sorted(independent.group_losses) == ['leader', 'student_0', 'student_1', 'student_2']
  close(independent.group_losses['leader'], np_ce(outputs['leader_logits'], labels))
  close(independent.total, sum(np_ce(l, labels) for l in z) + np_ce(outputs['leader_logits'], labels))
  # Neither scales a term by the λ warm-up, but both report its factor (step 7 of 10: epoch 1 of 5).
  close(dml.terms['lambda_scale'], np.exp(-5 * (1 - 1 / 5)**2))
  with pytest.raises(ValueError, match='Unknown method .kd.; valid choices: ffsd, dml, independent'):
    methods.method_class('kd')
  with pytest.raises(ValueError, match='num_students >= 2'):
    method_objective('dml', {'student_logits': z[:1]})
