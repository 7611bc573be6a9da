"""OKDDip and MCL (ffsd_jax/methods/{okddip,mcl}.py): every loss term against NumPy written from the official code's
formulas (DefangChen/OKDDip train_GL.py, utils.py `KL_Loss`, models/model_cifar/resnet_GL.py; winycg/MCL
losses/cifar_sup_mcl_loss.py, main_cifar.py) on random inputs, OKDDip's live KL targets (its attention learns only
through them), MCL's detached soft targets, the anchors without a positive, the official MCL topologies, and the
deployed networks as complete backbones. The end-to-end runs (falling loss, --mode eval/export, exact resume) are
in tests/test_methods_newcomers.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffsd_jax import objective
from ffsd_jax.methods import mcl, okddip
from ffsd_jax.methods.multi_branch import NETWORK_GROUP
from ffsd_jax.models import create_backbone
from test_methods_newcomers import _ce, _config, _log_softmax  # NumPy CE / log-softmax; the tiny config
from test_sharding import fast_compilation  # pylint: disable=unused-import

CLASSES, BATCH = 10, 8


def _logits(seed: int, count: int, classes: int = CLASSES) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.normal(0.0, 2.0, (BATCH, classes)).astype(np.float32) for _ in range(count)]


def _softmax_rows(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _close(actual, expected, rtol=2e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def _branch_logits(logits: dict, count: int) -> list:
  return [logits[f'branch_{i}'] for i in range(count)]


# ----------------------------------------------------------------------------------------------------------------------
# OKDDip: NumPy from train_GL.py and utils.py.


def _okddip_kl(z, target, temperature):
  """utils.py `KL_Loss`: T²·KLDivLoss(batchmean)(log_softmax(z/T), softmax(target/T) + 1e-7)."""
  target = np.exp(_log_softmax(np.asarray(target, np.float64) / temperature)) + 1e-7
  return temperature**2 * np.sum(target * (np.log(target) - _log_softmax(np.asarray(z) / temperature))) / len(z)


def _okddip_numpy(peers, leader, attention, labels, temperature, alpha, consistency_weight):
  """train_GL.py `train`: loss and its parts, with pro = B×C×m and x_m = bmm(pro, attentionᵀ)."""
  pro = np.stack([np.asarray(z, np.float64) for z in peers], axis=-1)
  x_m = pro @ np.transpose(np.asarray(attention, np.float64), (0, 2, 1))
  loss_true = sum(_ce(pro[:, :, i], labels) for i in range(len(peers)))
  kls = [_okddip_kl(pro[:, :, i], x_m[:, :, i], temperature) for i in range(len(peers))]
  leader_kl = _okddip_kl(leader, pro.mean(axis=2), temperature)
  loss = loss_true + _ce(leader, labels) + alpha * consistency_weight * (sum(kls) + leader_kl)
  return loss, kls, leader_kl, x_m


def _random_attention(seed: int, peers: int) -> np.ndarray:
  return _softmax_rows(np.random.default_rng(seed).normal(0.0, 1.5, (BATCH, peers, peers))).astype(np.float32)


def test_okddip_attention_matches_numpy():
  """resnet_GL.py: energy = bmm(q, kᵀ) of the bias-free projections of the pooled features, softmax over keys."""
  rng = np.random.default_rng(0)
  pooled = [rng.normal(size=(BATCH, 16)).astype(np.float32) for _ in range(3)]
  module = okddip.PeerAttention(projection_dim=2)
  variables = module.init(jax.random.PRNGKey(0), [jnp.asarray(h) for h in pooled])
  assert set(variables['params']) == {'query', 'key'} and 'bias' not in variables['params']['query']
  weights = module.apply(variables, [jnp.asarray(h) for h in pooled])
  q = np.stack([h @ np.asarray(variables['params']['query']['kernel'], np.float64) for h in pooled], axis=1)
  k = np.stack([h @ np.asarray(variables['params']['key']['kernel'], np.float64) for h in pooled], axis=1)
  _close(weights, _softmax_rows(q @ np.transpose(k, (0, 2, 1))), rtol=1e-5)


def test_okddip_objective_matches_numpy():
  config = _config('okddip', 3)
  config.okddip_temperature, config.okddip_kl_weight, config.okddip_rampup_epochs = 3.0, 0.7, 4
  peers, (leader,) = _logits(1, 3), _logits(2, 1)
  attention, labels = _random_attention(3, 3), np.random.default_rng(4).integers(0, CLASSES, BATCH)
  step, steps_per_epoch = 5, 2  # 0-based epoch 2 of a 4-epoch ramp-up: exp(−5(1 − 2/4)²).
  weight = np.exp(-5.0 * (1.0 - 2 / 4) ** 2)
  outputs = {'branch_logits': tuple(jnp.asarray(z) for z in peers), 'leader_logits': jnp.asarray(leader),
             'attention_weights': jnp.asarray(attention)}
  result = okddip.OKDDip(config).objective(outputs, jnp.asarray(labels), jnp.int32(step), steps_per_epoch)
  loss, kls, leader_kl, x_m = _okddip_numpy(peers, leader, attention, labels, 3.0, 0.7, weight)
  targets = okddip.attention_targets([jnp.asarray(z) for z in peers], jnp.asarray(attention))
  for i in range(3):
    _close(targets[i], x_m[:, :, i])
    _close(result.terms[f'branch_{i}/ce'], _ce(peers[i], labels))
    _close(result.terms[f'branch_{i}/kl'], kls[i])
  _close(result.terms['leader/ce'], _ce(leader, labels))
  _close(result.terms['leader/kl'], leader_kl)
  _close(result.total, loss)
  _close(result.group_losses[NETWORK_GROUP], loss)
  _close(result.terms['lambda_scale'], weight, rtol=1e-6)
  _close(result.terms['attention/self_weight'], np.mean(np.diagonal(attention, axis1=1, axis2=2)))


def test_okddip_kl_keeps_the_official_epsilon():
  """With a peaked target (most target probabilities below 1e-7) and a close prediction, the + 1e-7 of `KL_Loss`
  makes a 23% difference: the value is the official one, not the exact KL."""
  rng = np.random.default_rng(16)
  target = rng.normal(0.0, 40.0, (BATCH, 100)).astype(np.float32)
  logits = (target + rng.normal(0.0, 0.5, target.shape)).astype(np.float32)
  value = okddip.kl_with_live_target(jnp.asarray(logits), jnp.asarray(target), 3.0)
  _close(value, _okddip_kl(logits, target, 3.0), rtol=5e-5)
  assert float(value) > 1.2 * float(objective.kl_divergence(jnp.asarray(logits), jnp.asarray(target), 3.0))


def _okddip_loss_jnp(peers, leader, attention, labels, temperature, scale):
  """The official loss in jnp with nothing detached, written apart from the module under test."""
  def kl(z, target):
    p = jax.nn.softmax(target / temperature, axis=-1) + 1e-7
    return temperature**2 * jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(z / temperature, axis=-1))) / z.shape[0]

  pro = jnp.stack(peers, axis=-1)
  x_m = jnp.einsum('bcj,bij->bci', pro, attention)
  total = sum(objective.cross_entropy(pro[:, :, i], labels) for i in range(len(peers)))
  group = sum(kl(pro[:, :, i], x_m[:, :, i]) for i in range(len(peers)))
  return total + objective.cross_entropy(leader, labels) + scale * (group + kl(leader, jnp.mean(pro, axis=2)))


def test_okddip_kl_targets_are_not_detached():
  """The gradient of the objective reaches the attention weights and flows into every peer through the targets, as
  the official code's (it never detaches); a detached target would give the attention no gradient at all."""
  config = _config('okddip', 3)
  config.okddip_rampup_epochs = 0
  method = okddip.OKDDip(config)
  peers = tuple(jnp.asarray(z) for z in _logits(5, 3))
  leader, attention = jnp.asarray(_logits(6, 1)[0]), jnp.asarray(_random_attention(7, 3))
  labels = jnp.asarray(np.random.default_rng(8).integers(0, CLASSES, BATCH))

  def total(p, l, a):
    return method.objective({'branch_logits': p, 'leader_logits': l, 'attention_weights': a}, labels, 0, 1).total

  grads = jax.grad(total, argnums=(0, 1, 2))(peers, leader, attention)
  expected = jax.grad(_okddip_loss_jnp, argnums=(0, 1, 2))(peers, leader, attention, labels, 3.0, 1.0)
  for actual, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    _close(actual, np.asarray(want, np.float64), rtol=1e-5, atol=1e-7)
  assert np.abs(np.asarray(grads[2])).min() > 0  # Every attention weight is trained.
  # The leader's target (the peers' mean) is live too: a peer's gradient is not that of its own terms alone.
  own = jax.grad(lambda z: objective.cross_entropy(z, labels) + okddip.kl_with_live_target(
      z, okddip.attention_targets((z, *peers[1:]), attention)[0], 3.0))(peers[0])
  assert not np.allclose(np.asarray(grads[0][0]), np.asarray(own), atol=1e-6)


def test_okddip_attention_learns_only_through_the_kl_terms_and_leader_is_deployed(fast_compilation):
  del fast_compilation
  config = _config('okddip', 2)
  method = okddip.OKDDip(config)
  model = method.build_model(jnp.float32)
  images = jax.random.normal(jax.random.PRNGKey(1), (BATCH, 32, 32, 3))
  labels = jnp.asarray(np.random.default_rng(9).integers(0, CLASSES, BATCH))
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(2), x, train=True))(images)
  params, batch_stats = variables['params'], variables['batch_stats']
  assert sorted(params) == ['attention', 'branch_0', 'branch_1', 'leader', 'trunk']
  assert params['attention']['query']['kernel'].shape == (16, 2)  # resnet8_tiny's 16 channels // 8.

  @jax.jit
  def losses(p):  # (total, the KL part with the ramp-up at 1, CE alone), one compilation.
    outputs, _ = method.apply_train(model, p, batch_stats, {}, images)
    result = method.objective(outputs, labels, 10**6, 1)
    ce = sum(v for k, v in result.terms.items() if k.endswith('/ce'))
    return jnp.stack([result.total, result.total - ce, ce])

  attention_grads = jax.jacrev(losses)(params)['attention']
  kl_grad = jax.tree.map(lambda g: g[1], attention_grads)
  assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(kl_grad))
  for total_grad, ce_grad, want in zip(jax.tree.leaves(jax.tree.map(lambda g: g[0], attention_grads)),
                                       jax.tree.leaves(jax.tree.map(lambda g: g[2], attention_grads)),
                                       jax.tree.leaves(kl_grad)):
    assert not np.any(np.asarray(ce_grad))
    _close(total_grad, np.asarray(want, np.float64), rtol=1e-5, atol=1e-8)

  outputs, new_stats = jax.jit(lambda p, x: method.apply_train(model, p, batch_stats, {}, x))(params, images)
  logits = jax.jit(lambda p, b, x: method.eval_logits(model, p, b, {}, x))(params, new_stats, images)
  _close(logits['ensemble'], np.mean([np.asarray(z, np.float64) for z in _branch_logits(logits, 2)], axis=0))
  deployed = method.deployed_variables(params, new_stats, {})
  alone, _ = create_backbone(config.model, CLASSES).apply(deployed, images, train=False)
  _close(alone, np.asarray(logits['leader'], np.float64), rtol=1e-5, atol=1e-6)
  assert method.deployed_network == 'leader' and outputs['attention_weights'].shape == (BATCH, 2, 2)



def test_okddip_config_checks():
  config = _config('okddip', 3)
  assert okddip.OKDDip(config).check_config() == []
  config.okddip_kl_weight, config.okddip_shared_stages, config.okddip_temperature = -1.0, 3, 0.0
  problems = okddip.OKDDip(config).check_config()
  assert len(problems) == 3
  assert any(p.startswith('config.okddip_kl_weight=-1.0') for p in problems)
  assert any(p.startswith('config.okddip_shared_stages=3') for p in problems)


# ----------------------------------------------------------------------------------------------------------------------
# MCL: NumPy from losses/cifar_sup_mcl_loss.py `SupMCL` and main_cifar.py.


def _kldiv(y_s, y_t, temperature):
  """cifar_sup_mcl_loss.py `KLDiv`: T²·kl_div(log_softmax(y_s/T), softmax(y_t/T), batchmean)."""
  log_t = _log_softmax(np.asarray(y_t, np.float64) / temperature)
  return temperature**2 * np.sum(np.exp(log_t) * (log_t - _log_softmax(np.asarray(y_s) / temperature))) / len(y_s)


def _anchor_terms(logit, intra_mask, diag_mask):
  """SupMCL's per-anchor mean_log_prob_pos (NaN where an anchor has no positive: 0/0)."""
  log_prob = logit - np.log((np.exp(logit) * diag_mask).sum(1, keepdims=True))
  with np.errstate(invalid='ignore', divide='ignore'):
    return (intra_mask * log_prob).sum(1) / intra_mask.sum(1)


def _sup_mcl_numpy(embeddings, labels, tau, temperature, reduce=np.nanmean):
  """SupMCL.forward in NumPy (float64): (vcl, soft_vcl, icl, soft_icl). `reduce` is np.mean for the official value,
  np.nanmean for this repository's (anchors without a positive left out)."""
  embeddings = [np.asarray(e, np.float64) for e in embeddings]
  labels = np.asarray(labels)[None, :]
  eye = np.eye(labels.shape[1])
  intra_mask, diag_mask = (labels == labels.T).astype(np.float64) - eye, 1.0 - eye
  number_net = len(embeddings)
  inter_logits, soft_icl = [], 0.0
  for i in range(number_net):
    for j in range(i + 1, number_net):
      cos_simi_ij = embeddings[i] @ embeddings[j].T / tau
      cos_simi_ji = embeddings[j] @ embeddings[i].T / tau
      inter_logits += [cos_simi_ij, cos_simi_ji]
      soft_icl += _kldiv(cos_simi_ij, cos_simi_ji, temperature) + _kldiv(cos_simi_ji, cos_simi_ij, temperature)
  icl = sum(-reduce(_anchor_terms(logit, intra_mask, diag_mask)) for logit in inter_logits)
  intra_logits = [e @ e.T / tau for e in embeddings]
  soft_vcl = sum(_kldiv(intra_logits[i], intra_logits[j], temperature)
                 for i in range(number_net) for j in range(number_net) if i != j)
  vcl = sum(-reduce(_anchor_terms(logit, intra_mask, diag_mask)) for logit in intra_logits)
  return vcl, soft_vcl, icl, soft_icl


def _embeddings(seed: int, count: int, dim: int = 6) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  raw = [rng.normal(size=(BATCH, dim)) for _ in range(count)]
  return [(e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32) for e in raw]


PAIRED_LABELS = np.array([3, 7, 1, 3, 7, 0, 1, 0])  # Two of each class: every anchor has one positive.


@pytest.mark.parametrize('num_networks', [2, 3])
def test_mcl_objective_matches_numpy(num_networks):
  config = _config('mcl', num_networks)
  config.mcl_contrast_temperature, config.mcl_temperature = 0.2, 2.5
  weights = (0.3, 0.7, 0.2, 1.3)
  for key, weight in zip(mcl.WEIGHT_KEYS, weights):
    config[key] = weight
  embeddings, logits = _embeddings(10, num_networks), _logits(11, num_networks)
  outputs = {'branch_logits': tuple(jnp.asarray(z) for z in logits),
             'embeddings': tuple(jnp.asarray(e) for e in embeddings)}
  result = mcl.MCL(config).objective(outputs, jnp.asarray(PAIRED_LABELS), jnp.int32(3), 2)
  terms = _sup_mcl_numpy(embeddings, PAIRED_LABELS, 0.2, 2.5, reduce=np.mean)  # The official values, defined here.
  for name, value in zip(('vcl', 'soft_vcl', 'icl', 'soft_icl'), terms):
    _close(result.terms[f'mcl/{name}'], value)
  ce = [_ce(z, PAIRED_LABELS) for z in logits]
  for i, value in enumerate(ce):
    _close(result.terms[f'branch_{i}/ce'], value)
  _close(result.total, sum(ce) + sum(w * t for w, t in zip(weights, terms)))
  assert float(result.terms['mcl/anchor_positive_rate']) == 1.0 and float(result.terms['lambda_scale']) == 1.0


def test_mcl_anchor_without_positive_is_left_out_of_the_mean():
  """The official 0/0 makes such a batch's loss NaN; here those anchors are left out, and a batch without any
  positive contributes 0 with finite gradients."""
  labels = np.array([3, 7, 1, 3, 9, 0, 1, 5])  # Anchors 1, 4, 5 and 7 have no positive.
  embeddings = _embeddings(12, 2)
  official = _sup_mcl_numpy(embeddings, labels, 0.1, 3.0, reduce=np.mean)
  assert np.isnan(official[0]) and np.isnan(official[2])
  expected = _sup_mcl_numpy(embeddings, labels, 0.1, 3.0, reduce=np.nanmean)
  terms = mcl.mcl_contrastive_terms([jnp.asarray(e) for e in embeddings], jnp.asarray(labels), 0.1, 3.0)
  for name, value in zip(('vcl', 'soft_vcl', 'icl', 'soft_icl'), expected):
    _close(terms[f'mcl/{name}'], value)
  assert float(mcl.mcl_losses(_logits(13, 2), embeddings, jnp.asarray(labels), 0.1, 3.0, (1, 1, 1, 1))[1][
      'mcl/anchor_positive_rate']) == 0.5

  distinct = jnp.arange(BATCH)
  assert float(mcl.supervised_contrastive(jnp.asarray(embeddings[0] @ embeddings[1].T), mcl.positive_mask(distinct))) \
      == 0.0
  grads = jax.grad(lambda es: sum(mcl.mcl_contrastive_terms(es, distinct, 0.1, 3.0).values()))(
      tuple(jnp.asarray(e) for e in embeddings))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_mcl_soft_targets_pass_no_gradient_and_contrastive_terms_train_both_sides():
  embeddings = tuple(jnp.asarray(e) for e in _embeddings(14, 3))
  labels, tau, temperature = jnp.asarray(PAIRED_LABELS), 0.1, 3.0
  fixed = {(i, j): embeddings[i] @ embeddings[j].T / tau for i in range(3) for j in range(3)}
  pairs = [(i, j) for i in range(3) for j in range(3) if i != j]

  def held(es):  # The soft terms with every target a constant.
    soft_vcl = sum(objective.kl_divergence(es[i] @ es[i].T / tau, fixed[j, j], temperature) for i, j in pairs)
    soft_icl = sum(objective.kl_divergence(es[i] @ es[j].T / tau, fixed[j, i], temperature) for i, j in pairs)
    return soft_vcl, soft_icl

  for index, name in enumerate(('mcl/soft_vcl', 'mcl/soft_icl')):
    actual = jax.grad(lambda es, n=name: mcl.mcl_contrastive_terms(es, labels, tau, temperature)[n])(embeddings)
    expected = jax.grad(lambda es, k=index: held(es)[k])(embeddings)
    for a, e in zip(actual, expected):  # Entries up to ~7: float32 rounding of the row sums is ~1e-6.
      _close(a, np.asarray(e, np.float64), rtol=1e-5, atol=1e-6)
  # ICL between networks 0 and 1 alone trains both of them (no detach), network 2 not at all.
  icl_01 = jax.grad(lambda es: mcl.supervised_contrastive(es[0] @ es[1].T / tau, mcl.positive_mask(labels)))(
      embeddings)
  assert np.abs(np.asarray(icl_01[0])).max() > 0 and np.abs(np.asarray(icl_01[1])).max() > 0
  assert not np.any(np.asarray(icl_01[2]))


def test_mcl_embedding_head_matches_numpy():
  """cifar_sup_mcl_loss.py `Embed`: Linear, ReLU, Linear, x / ‖x‖₂."""
  head = mcl.EmbeddingHead(embedding_dim=5)
  pooled = jnp.asarray(np.random.default_rng(15).normal(size=(BATCH, 16)).astype(np.float32))
  variables = head.init(jax.random.PRNGKey(3), pooled)
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), variables['params'])
  hidden = np.maximum(np.asarray(pooled, np.float64) @ p['fc1']['kernel'] + p['fc1']['bias'], 0.0)
  out = hidden @ p['fc2']['kernel'] + p['fc2']['bias']
  _close(head.apply(variables, pooled), out / np.linalg.norm(out, axis=1, keepdims=True), rtol=1e-5)


@pytest.mark.parametrize('num_networks, trunk_stages', [(2, 0), (3, 1)])
def test_mcl_topology_follows_the_official_code_and_deploys_network_0(num_networks, trunk_stages, fast_compilation):
  """models/resnet.py: `ResNet_n` (independent networks) for 2 networks, else `ResNet_b` (stem and first stage
  shared); network 0, trunk included, runs alone as one complete backbone."""
  del fast_compilation
  config = _config('mcl', num_networks)
  method = mcl.MCL(config)
  assert method.shared_stages() == trunk_stages
  model = method.build_model(jnp.float32)
  images = jax.random.normal(jax.random.PRNGKey(4), (BATCH, 32, 32, 3))
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(5), x, train=True))(images)
  names = [f'branch_{i}' for i in range(num_networks)] + [f'embed_{i}' for i in range(num_networks)]
  assert sorted(variables['params']) == sorted(names + (['trunk'] if trunk_stages else []))
  if trunk_stages:  # The stem and stage 0 (layer1) only.
    assert sorted(variables['params']['trunk']) == ['bn1', 'conv1', 'layer1_0']
  assert variables['params']['embed_0']['fc1']['kernel'].shape == (16, 128)
  outputs, batch_stats = jax.jit(lambda v, x: method.apply_train(model, v['params'], v['batch_stats'], {}, x))(
      variables, images)
  norms = np.linalg.norm(np.asarray(outputs['embeddings'][1]), axis=1)
  _close(norms, np.ones(BATCH), rtol=1e-5)
  logits = jax.jit(lambda p, b, x: method.eval_logits(model, p, b, {}, x))(variables['params'], batch_stats, images)
  assert sorted(logits) == sorted([f'branch_{i}' for i in range(num_networks)] + ['ensemble'])
  deployed = method.deployed_variables(variables['params'], batch_stats, {})
  backbone = create_backbone(config.model, CLASSES)
  reference = jax.eval_shape(lambda x: backbone.init(jax.random.PRNGKey(0), x, train=False), images)
  assert jax.tree.structure(reference) == jax.tree.structure(deployed)
  alone, _ = backbone.apply(deployed, images, train=False)
  _close(alone, np.asarray(logits['branch_0'], np.float64), rtol=1e-5, atol=1e-6)


def test_mcl_config_checks():
  config = _config('mcl', 2)
  assert mcl.MCL(config).check_config() == []
  config.mcl_shared_stages = 0
  assert mcl.MCL(config).check_config() == [] and mcl.MCL(config).shared_stages() == 0
  config.num_students = 4
  assert mcl.MCL(config).shared_stages() == 0  # An explicit value overrides the official rule.
  config.mcl_shared_stages, config.mcl_embedding_dim, config.mcl_icl_weight = 3, 0, -0.1
  config.mcl_contrast_temperature = 0.0
  problems = mcl.MCL(config).check_config()
  assert [p.split('=')[0] for p in problems] == ['config.mcl_shared_stages', 'config.mcl_embedding_dim',
                                                 'config.mcl_contrast_temperature', 'config.mcl_icl_weight']
