"""KDCL, ONE and PCL (ffsd_jax/methods/{kdcl,one,pcl}.py): loss terms against NumPy written from the papers'
equations, gradient isolation where each method detaches, deployed variables as complete backbones, PCL's EMA, and
short end-to-end runs (the loss falls, --mode eval and --mode export give the deployed network, PCL resumes exactly).
The end-to-end runs also cover OKDDip and MCL, whose loss-level tests are in tests/test_methods_okddip_mcl.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from ffsd_jax import evaluation
from ffsd_jax import export
from ffsd_jax import inference
from ffsd_jax import methods
from ffsd_jax import metric_writers
from ffsd_jax import objective
from ffsd_jax import train_loop
from ffsd_jax import train_state as train_state_lib
from ffsd_jax.data.normalization import normalize_images
from ffsd_jax.methods import kdcl, multi_branch, one, pcl
from ffsd_jax.models import create_backbone
from test_sharding import fast_compilation, tiny_config  # pylint: disable=unused-import
from test_train_loop import signal_at_batch

CLASSES, BATCH = 10, 6


def _config(method: str, num_students: int):
  config = get_config()
  config.model = 'resnet8_tiny'
  config.num_classes = CLASSES
  config.method = method
  config.num_students = num_students
  return config


def _logits(seed: int, count: int) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.normal(0.0, 2.0, (BATCH, CLASSES)).astype(np.float32) for _ in range(count)]


def _labels(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, CLASSES, BATCH).astype(np.int32)


# NumPy references, written from the papers' equations (float64).


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _ce(z, labels):
  return -np.mean(_log_softmax(z)[np.arange(len(labels)), labels])


def _kl(z, target, temperature):
  """T²·KL(softmax(target/T) ‖ softmax(z/T)), summed over classes, averaged over the batch."""
  target_log = _log_softmax(np.asarray(target, np.float64) / temperature)
  return temperature**2 * np.mean(np.sum(np.exp(target_log) * (target_log - _log_softmax(np.asarray(z) / temperature)),
                                         axis=-1))


def _close(actual, expected, rtol=2e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def _assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6):
  actual_leaves, actual_def = jax.tree.flatten(actual)
  expected_leaves, expected_def = jax.tree.flatten(expected)
  assert actual_def == expected_def
  for a, e in zip(actual_leaves, expected_leaves):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------------------------------
# KDCL.


def test_kdcl_teachers_match_numpy():
  logits, labels = _logits(0, 3), _labels(1)
  rows = np.arange(BATCH)
  # MinLogit: z_t[b, j] = min_i (z_i[b, j] − z_i[b, y_b]).
  expected = np.min([z - z[rows, labels][:, None] for z in logits], axis=0)
  _close(kdcl.minlogit_teacher([jnp.asarray(z) for z in logits], jnp.asarray(labels)), expected)
  # Naive: per example, the logits of the network with the lowest cross-entropy on it.
  per_example_ce = np.stack([-_log_softmax(z)[rows, labels] for z in logits])  # (m, B)
  expected = np.stack([logits[k][b] for b, k in enumerate(per_example_ce.argmin(axis=0))])
  assert len(set(per_example_ce.argmin(axis=0).tolist())) > 1  # The choice really is per example.
  _close(kdcl.naive_teacher([jnp.asarray(z) for z in logits], jnp.asarray(labels)), expected)


@pytest.mark.parametrize('teacher', kdcl.TEACHERS)
def test_kdcl_objective_matches_numpy(teacher):
  config = _config('kdcl', 3)
  config.kdcl_teacher, config.kdcl_kl_weight, config.kdcl_temperature = teacher, 0.7, 2.0
  logits, labels = _logits(2, 3), _labels(3)
  result = kdcl.KDCL(config).objective({'student_logits': tuple(jnp.asarray(z) for z in logits)},
                                        jnp.asarray(labels), jnp.int32(5), 4)
  functions = {'minlogit': kdcl.minlogit_teacher, 'naive': kdcl.naive_teacher}
  target = np.asarray(functions[teacher]([jnp.asarray(z) for z in logits], jnp.asarray(labels)), np.float64)
  total = 0.0
  for i, z in enumerate(logits):
    ce, kl = _ce(z, labels), _kl(z, target, 2.0)
    _close(result.terms[f'student_{i}/ce'], ce)
    _close(result.terms[f'student_{i}/kl'], kl)
    _close(result.group_losses[f'student_{i}'], ce + 0.7 * kl)
    total += ce + 0.7 * kl
  _close(result.total, total)
  assert float(result.terms['lambda_scale']) == 1.0


@pytest.mark.parametrize('teacher', kdcl.TEACHERS)
def test_kdcl_teacher_passes_no_gradient(teacher):
  """Each network's gradient is that of its own loss with the ensemble teacher held constant."""
  config = _config('kdcl', 3)
  config.kdcl_teacher = teacher
  method = kdcl.KDCL(config)
  logits, labels = [jnp.asarray(z) for z in _logits(4, 3)], jnp.asarray(_labels(5))
  grads = jax.grad(lambda zs: method.objective({'student_logits': zs}, labels, 0, 1).total)(tuple(logits))
  fixed = kdcl.TEACHER_FUNCTIONS[teacher](logits, labels)
  for i, z in enumerate(logits):
    own = jax.grad(lambda x: objective.cross_entropy(x, labels) + config.kdcl_kl_weight *
                   objective.kl_divergence(x, fixed, config.kdcl_temperature))(z)
    _close(grads[i], np.asarray(own, np.float64), rtol=1e-5, atol=1e-7)


def test_kdcl_deploys_student_0_as_a_complete_backbone(fast_compilation):
  config = _config('kdcl', 2)
  method = kdcl.KDCL(config)
  model = method.build_model(jnp.float32)
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(1), x, train=True))(images)
  logits = method.eval_logits(model, variables['params'], variables['batch_stats'], {}, images)
  deployed = method.deployed_variables(variables['params'], variables['batch_stats'], {})
  alone, _ = create_backbone(config.model, CLASSES).apply(deployed, images, train=False)
  _close(alone, np.asarray(logits['student_0'], np.float64), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# ONE.


def test_rampup_weight_matches_official_sigmoid_rampup():
  steps_per_epoch = 7
  for step in (0, 6, 7, 40 * 7 + 3, 79 * 7, 80 * 7, 300 * 7):
    epoch = min(step // steps_per_epoch, 80)  # cifar_one.py: sigmoid_rampup(epoch, 80), epoch 0-based.
    _close(multi_branch.rampup_weight(step, steps_per_epoch, 80), np.exp(-5.0 * (1.0 - epoch / 80) ** 2), rtol=1e-6)
  assert float(multi_branch.rampup_weight(0, steps_per_epoch, 0)) == 1.0


def test_one_teacher_and_objective_match_numpy():
  config = _config('one', 3)
  config.one_temperature, config.one_rampup_epochs = 3.0, 4
  logits, labels = _logits(6, 3), _labels(7)
  scores = np.random.default_rng(8).normal(size=(BATCH, 3))
  gate = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
  teacher = sum(gate[:, i:i + 1] * logits[i] for i in range(3))  # z_e = Σ_i g_i·z_i
  _close(one.gated_ensemble([jnp.asarray(z) for z in logits], jnp.asarray(gate, jnp.float32)), teacher)

  outputs = {'branch_logits': tuple(jnp.asarray(z) for z in logits),
             'teacher_logits': jnp.asarray(teacher, jnp.float32)}
  step, steps_per_epoch = 5, 2  # 0-based epoch 2 of a 4-epoch ramp-up.
  result = one.ONE(config).objective(outputs, jnp.asarray(labels), jnp.int32(step), steps_per_epoch)
  weight = np.exp(-5.0 * (1.0 - 2 / 4) ** 2)
  expected = _ce(teacher, labels)
  _close(result.terms['teacher/ce'], _ce(teacher, labels))
  for i, z in enumerate(logits):
    _close(result.terms[f'branch_{i}/ce'], _ce(z, labels))
    _close(result.terms[f'branch_{i}/kl'], _kl(z, teacher, 3.0))
    expected += _ce(z, labels) + weight * _kl(z, teacher, 3.0)
  _close(result.total, expected)
  _close(result.group_losses[multi_branch.NETWORK_GROUP], expected)
  _close(result.terms['lambda_scale'], weight, rtol=1e-6)


def test_one_teacher_learns_only_from_its_cross_entropy():
  """d L / d z_e is the gradient of CE(z_e) alone; each branch's is CE + w·KL with the teacher held constant."""
  config = _config('one', 3)
  method = one.ONE(config)
  logits, labels = [jnp.asarray(z) for z in _logits(9, 3)], jnp.asarray(_labels(10))
  teacher = jnp.asarray(_logits(11, 1)[0])
  step, steps_per_epoch = 3, 1
  weight = multi_branch.rampup_weight(step, steps_per_epoch, config.one_rampup_epochs)

  def total(branches, teacher_logits):
    return method.objective({'branch_logits': branches, 'teacher_logits': teacher_logits}, labels, step,
                            steps_per_epoch).total

  branch_grads, teacher_grad = jax.grad(total, argnums=(0, 1))(tuple(logits), teacher)
  _close(teacher_grad, np.asarray(jax.grad(objective.cross_entropy)(teacher, labels), np.float64), atol=1e-7)
  for i, z in enumerate(logits):
    own = jax.grad(lambda x: objective.cross_entropy(x, labels) + weight * objective.kl_divergence(
        x, teacher, config.one_temperature))(z)
    _close(branch_grads[i], np.asarray(own, np.float64), atol=1e-7)


def test_one_gate_matches_numpy():
  """GAP → Linear → batch norm (batch statistics in train mode) → ReLU → softmax over branches."""
  gate = one.BranchGate(3)
  features = jax.random.normal(jax.random.PRNGKey(2), (BATCH, 4, 4, 8))
  variables = gate.init(jax.random.PRNGKey(3), features, train=True)
  params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(4), x.shape), variables['params'])
  weights, _ = gate.apply({'params': params, 'batch_stats': variables['batch_stats']}, features, train=True,
                          mutable=['batch_stats'])
  pooled = np.asarray(features, np.float64).mean(axis=(1, 2))
  scores = pooled @ np.asarray(params['fc']['kernel']) + np.asarray(params['fc']['bias'])
  normed = (scores - scores.mean(0)) / np.sqrt(scores.var(0) + 1e-5)  # Biased batch variance, eps 1e-5.
  normed = np.maximum(normed * np.asarray(params['bn']['scale']) + np.asarray(params['bn']['bias']), 0.0)
  expected = np.exp(normed) / np.exp(normed).sum(axis=1, keepdims=True)
  _close(weights, expected, rtol=1e-5, atol=1e-6)


def test_one_deploys_trunk_and_branch_0_as_a_complete_backbone(fast_compilation):
  config = _config('one', 3)
  method = one.ONE(config)
  model = method.build_model(jnp.float32)
  images = jax.random.normal(jax.random.PRNGKey(5), (4, 32, 32, 3))
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(6), x, train=True))(images)
  assert sorted(variables['params']) == ['branch_0', 'branch_1', 'branch_2', 'gate', 'trunk']
  # One train-mode step of running statistics, so that eval mode does not see the initial (0, 1) statistics.
  outputs, batch_stats = jax.jit(lambda v, x: method.apply_train(model, v['params'], v['batch_stats'], {}, x))(
      variables, images)
  _close(outputs['teacher_logits'], np.asarray(one.gated_ensemble(outputs['branch_logits'], outputs['gate_weights'])))
  logits = jax.jit(lambda p, b, x: method.eval_logits(model, p, b, {}, x))(variables['params'], batch_stats, images)
  deployed = method.deployed_variables(variables['params'], batch_stats, {})
  backbone = create_backbone(config.model, CLASSES)
  reference = jax.eval_shape(lambda x: backbone.init(jax.random.PRNGKey(0), x, train=False), images)
  assert jax.tree.structure(reference) == jax.tree.structure(deployed)
  alone, _ = jax.jit(lambda v, x: backbone.apply(v, x, train=False))(deployed, images)
  _close(alone, np.asarray(logits['branch_0'], np.float64), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# PCL.


def test_pcl_objective_matches_numpy():
  config = _config('pcl', 3)
  config.pcl_temperature, config.pcl_rampup_epochs = 3.0, 5
  peers, temporal_means = _logits(12, 3), _logits(13, 3)
  ensemble, labels = _logits(14, 1)[0], _labels(15)
  outputs = {'branch_logits': tuple(jnp.asarray(z) for z in peers), 'ensemble_logits': jnp.asarray(ensemble),
             'temporal_mean_logits': tuple(jnp.asarray(z) for z in temporal_means)}
  step, steps_per_epoch = 9, 3  # 0-based epoch 3 of a 5-epoch ramp-up.
  result = pcl.PCL(config).objective(outputs, jnp.asarray(labels), jnp.int32(step), steps_per_epoch)
  weight = np.exp(-5.0 * (1.0 - 3 / 5) ** 2)
  expected = _ce(ensemble, labels)  # CE of the peer ensemble teacher.
  _close(result.terms['peer_ensemble/ce'], expected)
  for j, z in enumerate(peers):
    # L_pe: T²·KL(ensemble ‖ peer j); L_pm: mean over the other peers' temporal means of T²·KL(z̃_l ‖ peer j).
    pe = _kl(z, ensemble, 3.0)
    pm = np.mean([_kl(z, temporal_means[l], 3.0) for l in range(3) if l != j])
    _close(result.terms[f'branch_{j}/ce'], _ce(z, labels))
    _close(result.terms[f'branch_{j}/pe_kl'], pe)
    _close(result.terms[f'branch_{j}/pm_kl'], pm)
    expected += _ce(z, labels) + pe + weight * pm
  _close(result.total, expected)
  _close(result.terms['lambda_scale'], weight, rtol=1e-6)


def test_pcl_teachers_pass_no_gradient_through_the_kl_terms():
  config = _config('pcl', 3)
  config.pcl_rampup_epochs = 0
  method = pcl.PCL(config)
  peers = tuple(jnp.asarray(z) for z in _logits(16, 3))
  temporal_means = tuple(jnp.asarray(z) for z in _logits(17, 3))
  ensemble, labels = jnp.asarray(_logits(18, 1)[0]), jnp.asarray(_labels(19))

  def total(branches, ensemble_logits, means):
    return method.objective({'branch_logits': branches, 'ensemble_logits': ensemble_logits,
                             'temporal_mean_logits': means}, labels, 0, 1).total

  peer_grads, ensemble_grad, mean_grads = jax.grad(total, argnums=(0, 1, 2))(peers, ensemble, temporal_means)
  _close(ensemble_grad, np.asarray(jax.grad(objective.cross_entropy)(ensemble, labels), np.float64), atol=1e-7)
  for grad in mean_grads:
    assert not np.any(np.asarray(grad))
  for j, z in enumerate(peers):
    own = jax.grad(lambda x: objective.cross_entropy(x, labels) + objective.kl_divergence(
        x, ensemble, config.pcl_temperature) + pcl.peer_mean_kl(x, temporal_means, j, config.pcl_temperature))(z)
    _close(peer_grads[j], np.asarray(own, np.float64), atol=1e-7)


def test_pcl_ema_update_matches_numpy():
  rng = np.random.default_rng(20)
  mean = {'params': {'trunk': {'w': rng.normal(size=(3, 4)).astype(np.float32)}},
          'batch_stats': {'trunk': {'mean': rng.normal(size=(4,)).astype(np.float32)}}}
  live = jax.tree.map(lambda x: (x + rng.normal(size=x.shape)).astype(np.float32), mean)
  for step, alpha in ((1, 0.0), (4, 0.75), (5000, 0.999)):  # α = min(1 − 1/t, 0.999)
    updated = pcl.ema_update(jax.tree.map(jnp.asarray, mean), jax.tree.map(jnp.asarray, live), jnp.int32(step), 0.999)
    expected = jax.tree.map(lambda m, v, a=alpha: a * m.astype(np.float64) + (1 - a) * v.astype(np.float64), mean,
                            live)
    _assert_trees_close(updated, expected, rtol=1e-6, atol=1e-6)


def test_pcl_temporal_means_are_extra_state_and_deploy_as_a_backbone(fast_compilation):
  config = _config('pcl', 3)
  method = pcl.PCL(config)
  model = method.build_model(jnp.float32)
  images = jax.random.normal(jax.random.PRNGKey(7), (4, 32, 32, 3))
  labels = jnp.asarray(_labels(21)[:4])
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(8), x, train=True))(images)
  params, batch_stats = variables['params'], variables['batch_stats']
  assert sorted(params) == ['branch_0', 'branch_1', 'branch_2', 'peer_ensemble', 'trunk']
  extra = method.init_extra_state(params, batch_stats)
  assert sorted(extra['params']) == sorted(extra['batch_stats']) == ['branch_0', 'branch_1', 'branch_2', 'trunk']

  # The ensemble classifier's gradient is that of its own cross-entropy (the KL terms detach it); one jacobian gives
  # both, so the model compiles once.
  def losses(p):
    outputs, _ = method.apply_train(model, p, batch_stats, extra, images)
    result = method.objective(outputs, labels, 0, 1)
    return jnp.stack([result.total, result.terms['peer_ensemble/ce']])

  head = jax.jit(jax.jacrev(losses))(params)['peer_ensemble']
  _assert_trees_close(jax.tree.map(lambda g: g[0], head), jax.tree.map(lambda g: g[1], head))

  # A fake second update (α = 0.5) moves the temporal means away from the live peers.
  moved = jax.tree.map(lambda x: x + 0.05 * jnp.sign(x), params)
  step_outputs, moved_stats = jax.jit(lambda p, x: method.apply_train(model, p, batch_stats, extra, x))(moved, images)
  # The temporal means keep the running statistics of their own train-mode pass, not those of the live peers.
  _, own_stats = method.temporal_mean_model(model).apply(dict(extra), images, train=True, mutable=['batch_stats'])
  extra = method.update_extra_state(extra, moved, moved_stats, jnp.int32(2), step_outputs)
  _assert_trees_close(extra['params']['trunk'],
                      jax.tree.map(lambda a, b: 0.5 * (a + b), params['trunk'], moved['trunk']))
  _assert_trees_close(extra['batch_stats'], own_stats['batch_stats'])
  assert not np.allclose(np.asarray(extra['batch_stats']['trunk']['bn1']['mean']),
                         np.asarray(moved_stats['trunk']['bn1']['mean']))

  @jax.jit
  def forward(p, b, e, x):
    return method.apply_train(model, p, b, e, x)[0], method.eval_logits(model, p, b, e, x)

  train_outputs, logits = forward(moved, moved_stats, extra, images)
  assert not np.allclose(np.asarray(logits['temporal_mean_0']), np.asarray(logits['branch_0']))
  deployed = method.deployed_variables(moved, moved_stats, extra)
  backbone = create_backbone(config.model, CLASSES)
  alone, _ = backbone.apply(deployed, images, train=False)
  _close(alone, np.asarray(logits['temporal_mean_0'], np.float64), rtol=1e-5, atol=1e-6)
  # In training the peer mean teachers run the same variables in train mode (batch statistics).
  (alone_train, _), _ = backbone.apply(deployed, images, train=True, mutable=['batch_stats'])
  _close(alone_train, np.asarray(train_outputs['temporal_mean_logits'][0], np.float64), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# End to end: tiny synthetic runs through the training loop (8 steps, 4 per epoch: evaluations at steps 4 and 8).

RUN_STEPS, STOP_STEP = 8, 3
# MCL with 3 networks shares the stem and first stage (the official rule for more than 2 networks).
STUDENTS = {'kdcl': 2, 'one': 3, 'pcl': 3, 'okddip': 2, 'mcl': 3}


def _run_config(method: str):
  # MCL trains with its official per-epoch cosine learning rate and class-balanced batches (2 images of 8 classes),
  # so its run and resume cover those too.
  official = {'lr_schedule': 'cosine', 'batch_images_per_class': 2} if method == 'mcl' else {}
  return tiny_config(method=method, num_students=STUDENTS[method], max_steps=RUN_STEPS, **official)


def _train(method: str, tmp_path_factory) -> tuple[str, object, dict]:
  workdir = tmp_path_factory.mktemp(f'{method}_run')
  return method, workdir, train_loop.train_and_evaluate(_run_config(method), str(workdir))


@pytest.fixture(scope='module', params=sorted(STUDENTS))
def newcomer_run(request, tmp_path_factory, fast_compilation):
  """(method, workdir, summary) of a straight run of each method."""
  del fast_compilation
  return _train(request.param, tmp_path_factory)


def test_newcomer_run_lowers_the_loss_and_tracks_its_deployed_network(newcomer_run):
  method, workdir, summary = newcomer_run
  deployed = methods.method_class(method).deployed_network
  assert summary['step'] == RUN_STEPS and summary['network'] == deployed
  records = metric_writers.read_metrics(str(workdir))
  losses = [r['loss/total'] for r in records if 'loss/total' in r]
  assert len(losses) == RUN_STEPS // 2 and all(np.isfinite(losses))
  assert losses[-1] < losses[0]
  if method == 'mcl':  # With class-balanced batches every anchor has a positive (deviations.md, "Newcomer methods").
    assert [r['mcl/anchor_positive_rate'] for r in records if 'loss/total' in r] == [1.0] * (RUN_STEPS // 2)
  evals = [r for r in records if f'eval/top1/{deployed}' in r]
  assert len(evals) == 2
  assert summary['best_leader_top1'] == evals[-1][f'eval/best_top1/{deployed}']


def test_newcomer_eval_and_export_run_the_deployed_network(newcomer_run, tmp_path):
  method, workdir, _ = newcomer_run
  config = _run_config(method)
  deployed = methods.method_class(method).deployed_network
  last = [r for r in metric_writers.read_metrics(str(workdir)) if f'eval/top1/{deployed}' in r][-1]
  assert evaluation.evaluate(config, str(workdir), checkpoint='latest')['top1'] == last[f'eval/top1/{deployed}']

  export_dir = export.export_leader(config, str(workdir), str(tmp_path / 'export'), checkpoint='latest')
  images = np.random.default_rng(2).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  state = inference.restore_for_inference(config, str(workdir), 'latest')[0]
  model = train_state_lib.create_model(config)
  normalized = normalize_images(images, ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)))
  expected = methods.get_method(config).eval_logits(model, state.params, state.batch_stats, state.extra_state,
                                                    normalized)[deployed]
  _close(export.load_leader(export_dir)(images), np.asarray(expected, np.float64), rtol=1e-5, atol=1e-5)


def test_newcomer_resume_is_exact(newcomer_run, tmp_path, monkeypatch):
  """Stopped by SIGTERM after step 3 and resumed: the same records, parameters, optimizer and extra state (PCL's
  temporal means) as the straight run."""
  method, straight_dir, _ = newcomer_run
  workdir = tmp_path / 'resumed'
  with monkeypatch.context() as patch:
    signal_at_batch(patch, STOP_STEP)
    assert train_loop.train_and_evaluate(_run_config(method), str(workdir))['step'] == STOP_STEP
  assert train_loop.train_and_evaluate(_run_config(method), str(workdir))['step'] == RUN_STEPS
  timing = metric_writers.TIMING_KEYS
  assert ([{k: v for k, v in r.items() if k not in timing} for r in metric_writers.read_metrics(str(workdir))] ==
          [{k: v for k, v in r.items() if k not in timing} for r in metric_writers.read_metrics(str(straight_dir))])
  resumed = inference.restore_for_inference(_run_config(method), str(workdir), 'latest')[0]
  straight = inference.restore_for_inference(_run_config(method), str(straight_dir), 'latest')[0]
  assert bool(jax.tree.leaves(straight.extra_state)) == (method == 'pcl')
  for a, b in zip(jax.tree.leaves((resumed.params, resumed.extra_state, resumed.opt_state)),
                  jax.tree.leaves((straight.params, straight.extra_state, straight.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
