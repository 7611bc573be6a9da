"""The functional train step with the real `FFSDModel` (tiny ResNet-8): stop-gradients, training, evaluation, errors.

Compilation dominates on CPU, so the model is initialised once (an 'rbg' key: its init compiles several times faster
than threefry's on CPU) and the DML / independent states are sliced from the FFSD tree, whose networks they share.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from ffsd_jax import methods, objective, train_state, train_step
from ffsd_jax.methods import ffsd as ffsd_method
from ffsd_jax.data.normalization import CIFAR100_MEAN_STD, normalize_images

BATCH = 16
CLASSES = 10
# Long epochs: the λ warm-up factor stays at its epoch-1 value during the few training steps (the warm-up itself is
# checked by setting state.step, which needs no recompilation).
STEPS_PER_EPOCH = 1000


def _config(method='ffsd', **overrides):
  config = default.get_config()
  config.model = 'resnet8_tiny'
  config.num_classes = CLASSES
  config.batch_size = BATCH
  config.method = method
  config.learning_rate = 0.1
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8),
          'label': rng.integers(0, CLASSES, BATCH).astype(np.int32)}


def _learnable_batch(seed=2):
  """Noise images brightened by 12·label, so that a few steps can raise the training accuracy well above chance."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, CLASSES, BATCH).astype(np.int32)
  noise = rng.integers(0, 256, (BATCH, 32, 32, 3))
  return {'image': np.clip(0.5 * noise + 12 * labels[:, None, None, None], 0, 255).astype(np.uint8), 'label': labels}


@pytest.fixture(scope='module')
def ffsd_state():
  config = _config()
  model = train_state.create_model(config)
  rng = jax.random.key(0, impl='rbg')
  init = jax.jit(lambda r: train_state.create_train_state(config, model, r, STEPS_PER_EPOCH))
  return config, model, init(rng)


def _state_for(method, ffsd_state):
  """A fresh state for `method` holding the subset of the FFSD networks that the method trains."""
  _, _, state = ffsd_state
  config = _config(method)
  model = train_state.create_model(config)
  abstract = jax.eval_shape(lambda r: train_state.create_train_state(config, model, r, STEPS_PER_EPOCH),
                            jax.random.key(0, impl='rbg'))
  params = {k: state.params[k] for k in abstract.params}
  batch_stats = {k: state.batch_stats[k] for k in abstract.batch_stats}
  assert jax.tree.structure(params) == jax.tree.structure(abstract.params)
  tx = train_state.create_optimizer(config, params, STEPS_PER_EPOCH)
  return config, model, train_state.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                               batch_stats=batch_stats, opt_state=tx.init(params), extra_state={},
                                               tx=tx)


def test_create_train_state(ffsd_state):
  config, model, state = ffsd_state
  assert sorted(state.params) == ['decoder_1', 'decoder_leader', 'fusion', 'leader', 'student_0', 'student_1',
                                  'trans_fusion']
  assert int(state.step) == 0
  # eval_shape (the loop's abstract state) agrees with the real one, leaf by leaf.
  abstract = jax.eval_shape(lambda r: train_state.create_train_state(config, model, r, STEPS_PER_EPOCH),
                            jax.random.key(0))
  for field in ('step', 'params', 'batch_stats', 'opt_state'):
    assert jax.tree.map(lambda a: (a.shape, a.dtype), getattr(abstract, field)) == jax.tree.map(
        lambda a: (a.shape, a.dtype), getattr(state, field)), field
  # One optimizer group per network; the trans-fusion head is trained with the leader.
  assert sorted(state.opt_state.inner_states) == ['decoder_1', 'decoder_leader', 'fusion', 'leader', 'student_0',
                                                  'student_1']
  with pytest.raises(ValueError, match='compute_dtype'):
    train_state.create_model(_config(compute_dtype='float16'))


def test_stop_gradients_give_each_group_its_own_gradient(ffsd_state):
  """∇_g(total) = ∇_g(L_g) for every group g, and ∇_h(L_g) = 0 for every other group h (docs/method.md §6, §7.3).

  λ_div = 1 so that the students' diversity and SD terms are visible in the gradients (docs/method.md §7.4).
  """
  config, model, state = ffsd_state
  method = methods.get_method(config)
  weights = objective.LossWeights(temperature=2.0, lambda_diversity=1.0, lambda_fusion=10.0,
                                  lambda_self_distillation=1000.0)
  batch = _batch(1)
  images = normalize_images(batch['image'], CIFAR100_MEAN_STD)
  groups = ['student_0', 'student_1', 'leader', 'fusion', 'decoder_1', 'decoder_leader']

  def losses(params):
    outputs, _ = model.apply({'params': params, 'batch_stats': state.batch_stats}, images, train=True,
                             mutable=['batch_stats'])
    result = ffsd_method.ffsd_objective(outputs, batch['label'], weights, 1.0)
    without_diversity = result.terms['student_1/ce'] + result.terms['student_1/kl']
    return jnp.stack([result.total] + [result.group_losses[g] for g in groups] + [without_diversity])

  jacobian = jax.jit(jax.jacrev(losses))(state.params)
  jacobian = jax.tree.map(np.asarray, jacobian)

  def grad_of(index, key):
    return jax.tree.map(lambda j: j[index], jacobian[key])

  for g_index, group in enumerate(groups, start=1):
    own_keys = [key for key in state.params if method.param_group(key) == group]
    for key in state.params:
      grad = grad_of(g_index, key)
      if key in own_keys:
        norm = np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(grad)))
        assert norm > 0, f'{group} gets no gradient on {key}'
        jax.tree.map(lambda total, own, k=key, g=group: np.testing.assert_allclose(
            total, own, rtol=1e-4, atol=1e-6 * norm, err_msg=f'total vs {g} loss on {k}'), grad_of(0, key), grad)
      else:
        for leaf in jax.tree.leaves(grad):
          assert np.all(leaf == 0), f'the {group} loss leaks a gradient into {key}'

  # At λ_div = 1 the diversity + SD terms are a large part of student 1's gradient, so the test above sees them.
  full = np.concatenate([x.ravel() for x in jax.tree.leaves(grad_of(groups.index('student_1') + 1, 'student_1'))])
  partial = np.concatenate([x.ravel() for x in jax.tree.leaves(grad_of(len(groups) + 1, 'student_1'))])
  assert np.linalg.norm(full - partial) > 0.1 * np.linalg.norm(partial)


@pytest.fixture(scope='module')
def trained(ffsd_state):
  """10 steps of each method on one fixed batch; returns {method: (final state, [metrics per step], step fn)}."""
  batch = _learnable_batch()
  results = {}
  for method in ('ffsd', 'dml', 'independent'):
    config, model, state = _state_for(method, ffsd_state)
    step_fn = train_step.jit_train_step(model, config, STEPS_PER_EPOCH, CIFAR100_MEAN_STD)
    history = []
    for _ in range(10):
      state, metrics = step_fn(state, batch)
      history.append(jax.device_get(metrics))
    results[method] = (state, history, step_fn)
  return results


@pytest.mark.parametrize('method', ['ffsd', 'dml', 'independent'])
def test_few_steps_reduce_loss_and_raise_accuracy(ffsd_state, trained, method):
  state, history, _ = trained[method]
  losses = [float(m['loss/total']) for m in history]
  assert losses[-1] < 0.8 * losses[0], losses
  watched = ['accuracy/student_0', 'accuracy/student_1'] if method == 'dml' else ['accuracy/leader']
  for name in watched:
    accuracy = [float(m[name]) for m in history]
    assert max(accuracy[-3:]) >= accuracy[0] + 0.25, (name, accuracy)
  assert int(state.step) == 10
  assert all(float(m['nonfinite']) == 0.0 for m in history)
  # Every network's running statistics moved (the decoders' through their train-mode pass).
  _, _, initial = ffsd_state
  for key in state.batch_stats:
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                         state.batch_stats[key], initial.batch_stats[key]))
    assert all(moved), key


def test_metric_names_and_in_step_schedules(trained):
  _, history, _ = trained['ffsd']
  names = set(history[0])
  expected = {
      'loss/total', 'lambda_scale', 'nonfinite', 'grad_norm', 'learning_rate/networks', 'learning_rate/decoders',
      'student_0/ce', 'student_0/kl', 'student_0/loss', 'student_1/ce', 'student_1/kl', 'student_1/diversity',
      'student_1/sd', 'student_1/loss', 'fusion/ce', 'fusion/kl', 'fusion/loss', 'leader/ce', 'leader/kl',
      'leader/fusion_attention', 'leader/trans_fusion', 'leader/sd', 'leader/loss', 'decoder_1/reconstruction',
      'decoder_1/loss', 'decoder_leader/reconstruction', 'decoder_leader/loss', 'accuracy/student_0',
      'accuracy/student_1', 'accuracy/leader', 'accuracy/fusion', 'accuracy/ensemble'}
  assert expected <= names, expected - names
  assert all(np.asarray(v).dtype == np.float32 and np.asarray(v).shape == () for v in history[0].values())
  assert float(history[0]['learning_rate/networks']) == pytest.approx(0.1)
  assert float(history[0]['learning_rate/decoders']) == pytest.approx(1e-3)
  # The λ warm-up and the lr schedule follow state.step inside the compiled step: epochs 1..6 and past 150.
  state, _, step_fn = trained['ffsd']
  for epoch in (1, 2, 3, 4, 5, 6, 151):
    step = (epoch - 1) * STEPS_PER_EPOCH + 7
    _, metrics = step_fn(state.replace(step=jnp.asarray(step, jnp.int32)), _batch(2))
    expected = np.exp(-5 * (1 - epoch / 5)**2) if epoch <= 5 else 1.0
    np.testing.assert_allclose(float(metrics['lambda_scale']), expected, rtol=1e-6)
    np.testing.assert_allclose(float(metrics['learning_rate/networks']), 0.1 if epoch <= 150 else 0.01, rtol=1e-6)
    np.testing.assert_allclose(float(metrics['learning_rate/decoders']), 1e-3 if epoch <= 150 else 1e-4, rtol=1e-6)
  # Decoder losses carry λ_sd·warm-up; the total is the sum of the group losses.
  m = history[3]
  np.testing.assert_allclose(m['decoder_1/loss'], 1000.0 * m['lambda_scale'] * m['decoder_1/reconstruction'],
                             rtol=1e-5)
  groups = ['student_0', 'student_1', 'fusion', 'leader', 'decoder_1', 'decoder_leader']
  np.testing.assert_allclose(m['loss/total'], sum(m[f'{g}/loss'] for g in groups), rtol=1e-5)
  dml_names = set(trained['dml'][1][0])
  assert 'accuracy/leader' not in dml_names and 'learning_rate/decoders' not in dml_names
  assert 'student_1/diversity' not in dml_names and 'student_1/kl' in dml_names
  assert 'leader/kl' not in set(trained['independent'][1][0])


def test_eval_steps_match_numpy(ffsd_state, trained):
  config, model, _ = ffsd_state
  state = trained['ffsd'][0]
  batch = _batch(3)
  batch['mask'] = np.arange(BATCH) < BATCH - 5
  sums = jax.jit(train_step.make_eval_step(model, config, CIFAR100_MEAN_STD))(state, batch)
  outputs = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                        normalize_images(batch['image'], CIFAR100_MEAN_STD), train=False)
  labels, mask = batch['label'], batch['mask']
  logits = {f'student_{i}': np.asarray(z) for i, z in enumerate(outputs['student_logits'])}
  logits['leader'] = np.asarray(outputs['leader_logits'])
  logits['fusion'] = np.asarray(outputs['fusion_logits'])
  logits['ensemble'] = (logits['student_0'] + logits['student_1']) / 2
  assert int(sums['count']) == BATCH - 5
  for name, z in logits.items():
    top1 = (z.argmax(-1) == labels) & mask
    top5 = np.array([labels[b] in np.argsort(-z[b])[:5] for b in range(BATCH)]) & mask
    assert int(sums[f'correct/{name}']) == top1.sum(), name
    assert int(sums[f'correct_top5/{name}']) == top5.sum(), name
    shifted = z - z.max(-1, keepdims=True)
    cross_entropy = np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(BATCH), labels]
    np.testing.assert_allclose(float(sums[f'cross_entropy/{name}']), cross_entropy[mask].sum(), rtol=1e-5,
                               err_msg=name)
  assert sorted(sums) == sorted(['count'] + [f'{kind}/{n}' for n in logits
                                             for kind in ('correct', 'correct_top5', 'cross_entropy')])
  # The leader alone, from its own variables only (nothing else is passed, so nothing else can run).
  leader_variables = {'params': state.params['leader'], 'batch_stats': state.batch_stats['leader']}
  leader_sums = jax.jit(train_step.make_leader_eval_step(config, CIFAR100_MEAN_STD))(leader_variables, batch)
  assert sorted(leader_sums) == ['correct/leader', 'correct_top5/leader', 'count', 'cross_entropy/leader']
  for key in leader_sums:
    np.testing.assert_allclose(float(leader_sums[key]), float(sums[key]), rtol=1e-5, err_msg=key)


def test_train_step_is_pure_and_traces_in_bfloat16(ffsd_state):
  _, _, state = ffsd_state
  config = _config(compute_dtype='bfloat16')
  model = train_state.create_model(config)
  step_fn = train_step.make_train_step(model, config, STEPS_PER_EPOCH, CIFAR100_MEAN_STD)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch())
  new_state, metrics = jax.eval_shape(step_fn, state, batch)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), new_state.params) == jax.tree.map(
      lambda a: (a.shape, a.dtype), state.params)
  assert all(m.dtype == jnp.float32 and m.shape == () for m in metrics.values())
  with pytest.raises(ValueError, match='valid choices: ffsd, dml, independent'):
    train_step.make_train_step(model, _config('kd'), STEPS_PER_EPOCH, CIFAR100_MEAN_STD)


def test_non_finite_loss_is_detected_and_named(trained):
  state, _, step_fn = trained['ffsd']
  # Poison the leader's classifier: only the leader's (and what reads its logits) terms go non-finite.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * jnp.inf if 'leader' == getattr(path[0], 'key', None) and x.ndim == 2 else x, state.params)
  _, metrics = step_fn(state.replace(params=params), _batch(4))
  metrics = jax.device_get(metrics)
  assert float(metrics['nonfinite']) == 1.0
  assert np.isfinite(metrics['student_0/ce']) and not np.isfinite(metrics['leader/ce'])
  with pytest.raises(FloatingPointError, match='leader/ce=nan') as error:
    train_step.check_finite(metrics)
  assert 'student_0/ce' not in str(error.value)
  train_step.check_finite({'loss/total': np.float32(1.0), 'nonfinite': np.float32(0.0)})
  with pytest.raises(FloatingPointError, match='nonfinite flag'):
    train_step.check_finite({'loss/total': np.float32(1.0), 'nonfinite': np.float32(0.5)})


def test_validate_batch_errors():
  batch = _batch()
  train_step.validate_batch(batch, num_classes=CLASSES, batch_size=BATCH)
  with pytest.raises(ValueError, match='holds 16 examples but the step expects 32'):
    train_step.validate_batch(batch, num_classes=CLASSES, batch_size=32)
  bad = dict(batch, label=np.where(np.arange(BATCH) == 3, CLASSES, batch['label']).astype(np.int32))
  with pytest.raises(ValueError, match=r'Labels must lie in \[0, 10\).*\[10\]'):
    train_step.validate_batch(bad, num_classes=CLASSES, batch_size=BATCH)
  with pytest.raises(ValueError, match=r'Labels must lie in \[0, 10\)'):
    train_step.validate_batch(dict(batch, label=-batch['label'] - 1), num_classes=CLASSES, batch_size=BATCH)
  with pytest.raises(ValueError, match='uint8'):
    train_step.validate_batch(dict(batch, image=batch['image'].astype(np.float32)), num_classes=CLASSES,
                              batch_size=BATCH)
  with pytest.raises(ValueError, match='int32'):
    train_step.validate_batch(dict(batch, label=batch['label'].astype(np.int64)), num_classes=CLASSES,
                              batch_size=BATCH)
  with pytest.raises(ValueError, match='NHWC'):
    train_step.validate_batch(dict(batch, image=batch['image'][..., 0]), num_classes=CLASSES, batch_size=BATCH)
  with pytest.raises(ValueError, match="no 'label'"):
    train_step.validate_batch({'image': batch['image']}, num_classes=CLASSES, batch_size=BATCH)
