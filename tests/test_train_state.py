"""Learning-rate schedules and per-group optimizers against hand-written NumPy PyTorch rules (docs/method.md §8)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from ffsd_jax import methods, train_state


def _config(**overrides):
  config = default.get_config()
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def test_cifar_schedules_at_boundaries():
  spe = 391
  schedules = train_state.learning_rate_schedules(_config(), spe)
  steps = np.array([0, 150 * spe - 1, 150 * spe, 225 * spe - 1, 225 * spe, 299 * spe - 1])
  networks = np.asarray(jax.jit(jax.vmap(schedules['networks']))(steps))
  decoders = np.asarray(jax.jit(jax.vmap(schedules['decoders']))(steps))
  np.testing.assert_allclose(networks, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
  np.testing.assert_allclose(decoders, [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5], rtol=1e-6)
  # Boundaries follow steps_per_epoch (390 with drop-last), not a constant.
  other = train_state.learning_rate_schedules(_config(), 390)['networks']
  np.testing.assert_allclose([float(other(150 * 390 - 1)), float(other(150 * 390))], [0.1, 0.01], rtol=1e-6)


def test_imagenet_schedule_matches_reference_rule():
  spe = 10
  config = _config(lr_schedule='imagenet', lr_boundaries=(30, 60, 80), num_epochs=89)
  schedules = train_state.learning_rate_schedules(config, spe)
  steps = np.arange(89 * spe)
  networks = np.asarray(jax.jit(jax.vmap(schedules['networks']))(steps))
  decoders = np.asarray(jax.jit(jax.vmap(schedules['decoders']))(steps))
  expected_networks, expected_decoders = [], []
  for step in steps:
    epoch, within = step // spe + 1, step % spe  # The reference's 1-based epoch and its iteration index.
    lr = 0.1 * 0.1**(epoch // 30 + (epoch >= 80))
    if epoch < 5:
      lr *= (1 + within + epoch * spe) / (5 * spe)
    expected_networks.append(lr)
    # MultiStepLR([30, 60, 80]) stepped after every epoch: epoch e uses last_epoch = e − 1.
    expected_decoders.append(1e-3 * 0.1**sum(epoch - 1 >= b for b in (30, 60, 80)))
  np.testing.assert_allclose(networks, expected_networks, rtol=1e-5)
  np.testing.assert_allclose(decoders, expected_decoders, rtol=1e-5)
  np.testing.assert_allclose(networks[0], 0.1 * 11 / 50, rtol=1e-6)  # ≈0.2× at the first step.
  np.testing.assert_allclose(networks[4 * spe - 1], 0.1, rtol=1e-6)  # 1.0× on the last step of epoch 4.


def test_cosine_schedule_matches_mcl_adjust_lr():
  """MCL's utils.adjust_lr(lr_type='cosine'), called at the start of every 0-based epoch of `--epochs`."""
  spe, epochs = 7, 13
  config = _config(lr_schedule='cosine', num_epochs=epochs, lr_boundaries=(5, 9))  # Boundaries do not enter.
  schedules = train_state.learning_rate_schedules(config, spe)
  steps = np.random.default_rng(0).integers(0, epochs * spe, 40)
  networks = np.asarray(jax.jit(jax.vmap(schedules['networks']))(steps))
  expected = [0.1 * 0.5 * (1.0 + np.cos(np.pi * (step // spe) / epochs)) for step in steps]
  np.testing.assert_allclose(networks, expected, rtol=1e-5)
  ends = np.asarray(jax.vmap(schedules['networks'])(np.array([0, spe - 1, spe, epochs * spe - 1])))
  np.testing.assert_allclose(ends, [0.1, 0.1, 0.1 * 0.5 * (1 + np.cos(np.pi / epochs)),
                                    0.1 * 0.5 * (1 + np.cos(np.pi * (epochs - 1) / epochs))], rtol=1e-5)


def test_bad_schedule_config():
  with pytest.raises(ValueError, match="valid choices: \\['cifar', 'imagenet', 'cosine'\\]"):
    train_state.learning_rate_schedules(_config(lr_schedule='linear'), 10)
  with pytest.raises(ValueError, match='increasing'):
    train_state.learning_rate_schedules(_config(lr_boundaries=(225, 150)), 10)
  with pytest.raises(ValueError, match='steps_per_epoch'):
    train_state.learning_rate_schedules(_config(), 0)


def _np_sgd_step(p, g, buf, lr, wd, momentum=0.9):
  """torch.optim.SGD(nesterov=True, dampening=0, weight_decay=wd).step() for one tensor."""
  d_p = g + wd * p
  buf = d_p.copy() if buf is None else momentum * buf + d_p
  d_p = d_p + momentum * buf
  return p - lr * d_p, buf


def _np_adam_step(p, g, state, lr, wd, t, b1=0.9, b2=0.999, eps=1e-8):
  """torch.optim.Adam(weight_decay=wd).step() for one tensor (coupled L2), t = 1-based step."""
  m, v = state
  g = g + wd * p
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g * g
  denom = np.sqrt(v) / np.sqrt(1 - b2**t) + eps
  return p - lr / (1 - b1**t) * m / denom, (m, v)


def test_optimizer_groups_reproduce_pytorch_updates():
  rng = np.random.default_rng(0)
  keys = ['student_0', 'student_1', 'leader', 'trans_fusion', 'fusion', 'decoder_1', 'decoder_leader']
  params = {k: {'kernel': rng.normal(size=(3, 4)).astype(np.float32), 'bias': rng.normal(size=(4,)).astype(
      np.float32)} for k in keys}
  # Large decays so that a wrong group (1e-4 vs 1e-5) or decoupled decay would show; a boundary after step 2.
  config = _config(weight_decay=0.03, fusion_weight_decay=0.002, decoder_weight_decay=0.01, lr_boundaries=(2,),
                   learning_rate=0.1, decoder_learning_rate=0.01)
  tx = train_state.create_optimizer(config, params, steps_per_epoch=1)
  opt_state = tx.init(params)
  labels = train_state.param_labels(methods.get_method(config), params)
  assert labels['trans_fusion']['kernel'] == 'leader' and labels['decoder_1']['bias'] == 'decoder_1'

  @jax.jit
  def update(p, g, s):
    updates, s = tx.update(g, s, p)
    return jax.tree.map(jnp.add, p, updates), s

  expected = jax.tree.map(lambda x: x.astype(np.float64), params)
  np_state = {k: {n: None for n in params[k]} for k in keys}
  jax_params = params
  for t in range(1, 4):
    grads = {k: {n: rng.normal(size=v.shape).astype(np.float32) for n, v in params[k].items()} for k in keys}
    jax_params, opt_state = update(jax_params, grads, opt_state)
    for key in keys:
      for name in params[key]:
        p, g = expected[key][name], grads[key][name].astype(np.float64)
        if key.startswith('decoder_'):
          lr = 0.01 * (0.1 if t - 1 >= 2 else 1.0)
          state = np_state[key][name] or (np.zeros_like(p), np.zeros_like(p))
          expected[key][name], np_state[key][name] = _np_adam_step(p, g, state, lr, 0.01, t)
        else:
          lr = 0.1 * (0.1 if t - 1 >= 2 else 1.0)
          wd = 0.002 if key == 'fusion' else 0.03
          expected[key][name], np_state[key][name] = _np_sgd_step(p, g, np_state[key][name], lr, wd)
    for key in keys:
      for name in params[key]:
        np.testing.assert_allclose(np.asarray(jax_params[key][name]), expected[key][name], rtol=2e-5, atol=2e-6,
                                   err_msg=f'{key}/{name} after step {t}')


def test_the_method_decides_the_loss_groups():
  params = {key: {'w': np.ones(2, np.float32)} for key in ('trans_fusion', 'gate', 'branch_1')}
  ffsd = methods.get_method(_config())
  # FFSD trains its trans-fusion head with the leader; any other key (a newcomer's gate or branch) is its own group.
  assert train_state.param_labels(ffsd, params) == {'trans_fusion': {'w': 'leader'}, 'gate': {'w': 'gate'},
                                                     'branch_1': {'w': 'branch_1'}}
  assert train_state.group_schedules(_config(), {'decoder_1': {}, 'student_0': {}}) == ('decoders', 'networks')
  assert train_state.group_schedules(_config(method='dml'), {'student_0': {}}) == ('networks',)
