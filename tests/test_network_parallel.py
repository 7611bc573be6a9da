"""Networks on devices of their own (ffsd_jax/network_parallel.py, ffsd_jax/network_stack.py) on simulated CPU devices.

Every mesh shape must train what one device trains: a few steps of FFSD, DML and KDCL on (data × networks) meshes
equal the 1-device steps within float32 noise (losses, parameters, batch statistics and optimizer state); runs resume
across mesh shapes; eval, export and conversion of a networks-parallel checkpoint give the 1-device logits; per-device
batch norm equals the mean of the shards' own steps; and the config refuses what cannot run, in one line.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

from ffsd_jax import compiled_stats
from ffsd_jax import config_checks
from ffsd_jax import evaluation
from ffsd_jax import export
from ffsd_jax import methods
from ffsd_jax import network_stack
from ffsd_jax import official
from ffsd_jax import program as program_lib
from ffsd_jax import run_setup
from ffsd_jax import sharding
from ffsd_jax import train_loop
from test_sharding import tiny_config

BATCH = 24  # Splits over 1, 2, 3 and 6 data shards.
STEPS = 2


@pytest.fixture(autouse=True, scope='module')
def fast_compilation():
  """XLA without most optimisations, on both sides of every comparison (compiling dominates on 2 cores)."""
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


def _batch(seed: int = 0, size: int = BATCH) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  # Each pair of images has its own brightness band, so per-shard batch statistics differ from global ones.
  offsets = 24 * (np.arange(size) // 2)[:, None, None, None]
  return {'image': (rng.integers(0, 80, (size, 32, 32, 3)) + offsets).astype(np.uint8),
          'label': rng.integers(0, 10, (size,), dtype=np.int32)}


def _train(config, devices, batches):
  """The canonical state and the summed metrics after one training-program step per batch.

  Compiled with XLA's optimisations, as the loop compiles it: without them, float32 sums in another order differ by
  up to 0.15% on batch-norm biases whose gradients cancel heavily (with them, everything agrees to 1e-5).
  """
  jax.config.update('jax_disable_most_optimizations', False)
  try:
    program = program_lib.build(run_setup.build(config, devices=devices))
    state, sums = program.init_state(), program.metric_sums()
    for batch in batches:
      state, sums = program.train_step(state, sums, program.global_batch(batch))
    return jax.device_get(program.to_canonical(state)), jax.device_get(sums), program
  finally:
    jax.config.update('jax_disable_most_optimizations', True)


def _assert_states_close(actual, expected, rtol=1e-4, atol=1e-6):
  for name in ('params', 'batch_stats', 'opt_state'):
    flat_expected = jax.tree_util.tree_leaves_with_path(getattr(expected, name))
    flat_actual = jax.tree_util.tree_leaves_with_path(getattr(actual, name))
    assert [jax.tree_util.keystr(p) for p, _ in flat_actual] == [jax.tree_util.keystr(p) for p, _ in flat_expected]
    for (path, a), (_, b) in zip(flat_actual, flat_expected):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol,
                                 err_msg=f'{name}{jax.tree_util.keystr(path)}')


_REFERENCES = {}


def _reference(method: str, num_students: int):
  """The 1-device run of `STEPS` steps (computed once per method and student count)."""
  key = (method, num_students)
  if key not in _REFERENCES:
    config = tiny_config(method=method, num_students=num_students, batch_size=BATCH)
    _REFERENCES[key] = _train(config, jax.devices()[:1], [_batch(i) for i in range(STEPS)])[:2]
  return _REFERENCES[key]


@pytest.mark.parametrize('method, num_students, data, networks', [
    ('ffsd', 2, 1, 3), ('ffsd', 2, 2, 3), ('dml', 3, 2, 3), ('kdcl', 3, 1, 3)])
def test_mesh_shapes_train_what_one_device_trains(method, num_students, data, networks):
  """(data 6, networks 1), the batch split, trains inside `mesh_runs` and is compared there."""
  expected_state, expected_metrics = _reference(method, num_students)
  config = tiny_config(method=method, num_students=num_students, batch_size=BATCH, network_parallelism=networks)
  state, metrics, program = _train(config, jax.devices()[:data * networks], [_batch(i) for i in range(STEPS)])
  assert dict(program.mesh.shape) == {'data': data, 'networks': networks}
  if networks > 1:  # The stacked networks live one per device group, the heads everywhere.
    leaf = program.abstract_state.params[network_stack.STACK_KEY]['conv1']['kernel']
    assert leaf.shape[0] == num_students + (method == 'ffsd')
    assert leaf.sharding.spec == jax.sharding.PartitionSpec('networks')
  if data == 1:
    # Only the outputs the objective needs cross devices (FFSD: the logits and the taps, 4 all-gathers; KDCL: the
    # logits), and no batch-norm statistics: the one all-reduce is the gradient-norm metric.
    jax.config.update('jax_disable_most_optimizations', False)
    try:
      collectives = compiled_stats.collectives(program.lower().compile())
    finally:
      jax.config.update('jax_disable_most_optimizations', True)
    assert (collectives['all-reduce'], collectives['all-gather']) == (1, 4 if method == 'ffsd' else 1), collectives
  _assert_states_close(state, expected_state)
  # The steps changed the parameters, so agreement is not trivial.
  assert int(state.step) == STEPS
  assert set(metrics) == set(expected_metrics)
  for name in expected_metrics:
    np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_per_device_batch_norm_is_the_mean_of_the_shards_own_steps():
  """'device' statistics on 2 data shards (DML): losses, running statistics and (plain SGD, first step) parameters are
  the means of two 1-device steps on each half of the batch; the shards' own statistics, no global ones."""
  batch = _batch(5)
  halves = [{k: v[:BATCH // 2] for k, v in batch.items()}, {k: v[BATCH // 2:] for k, v in batch.items()}]
  per_shard = [_train(tiny_config(method='dml', batch_size=BATCH // 2), jax.devices()[:1], [half]) for half in halves]
  state, metrics, _ = _train(tiny_config(method='dml', batch_size=BATCH, batch_norm_statistics='device'),
                             jax.devices()[:2], [batch])
  global_state, _, _ = _train(tiny_config(method='dml', batch_size=BATCH), jax.devices()[:1], [batch])
  for name in ('params', 'batch_stats'):
    mean = jax.tree.map(lambda a, b: (np.asarray(a, np.float64) + b) / 2, getattr(per_shard[0][0], name),
                        getattr(per_shard[1][0], name))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(getattr(state, name)), jax.tree.leaves(mean)):
      np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  for name in ('student_0/ce', 'student_1/kl', 'loss/total'):
    np.testing.assert_allclose(metrics[name], (per_shard[0][1][name] + per_shard[1][1][name]) / 2, rtol=1e-5)
  # Not the global statistics: the running variance misses the variance between the shards (their means are the
  # global mean, as the halves have equal sizes).
  running_variance = lambda s: np.asarray(s.batch_stats['student_1']['bn1']['var'])
  assert np.abs(running_variance(state) - running_variance(global_state)).max() > 1e-3


def test_stacking_round_trip_is_exact_and_keeps_each_networks_optimizer_state():
  setup = run_setup.build(tiny_config(network_parallelism=3), devices=jax.devices()[:3])
  program = program_lib.build(setup)
  stack = network_stack.NetworkStack.for_method(setup.method)
  assert stack.names == ('student_0', 'student_1', 'leader')
  rng = np.random.default_rng(1)
  canonical = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), setup.abstract_state)
  stacked_tx = program.abstract_state.tx
  stacked = stack.stack_state(canonical, stacked_tx)
  trace = lambda state, group, key: state.opt_state.inner_states[group].inner_state[1][0].trace[key]
  for i, name in enumerate(stack.names):
    np.testing.assert_array_equal(trace(stacked, 'networks', 'networks')['conv1']['kernel'][i],
                                  trace(canonical, name, name)['conv1']['kernel'])
  np.testing.assert_array_equal(trace(stacked, 'leader', 'trans_fusion')['conv1']['kernel'],
                                trace(canonical, 'leader', 'trans_fusion')['conv1']['kernel'])
  back = stack.unstack_state(stacked, setup.abstract_state.tx)
  assert jax.tree.structure(back) == jax.tree.structure(canonical)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(canonical)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _setup(devices: int, networks: int = 1, **overrides):
  """A 6-step FFSD run (2 steps per epoch; a checkpoint at its end) whose train steps are those of the step tests
  above (same config and meshes), so their compilations are shared."""
  config = tiny_config(**{'max_steps': 6, 'checkpoint_every_steps': 6, 'network_parallelism': networks,
                          'batch_size': BATCH, **overrides})
  return run_setup.build(config, devices=jax.devices()[:devices])


def _records(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _assert_records_close(actual, expected):
  """Every training record, and every evaluation of the straight run (a run stopped early evaluates at its end too),
  equal within float32 noise."""
  kind = lambda record: 'eval' if any(k.startswith('eval/') for k in record) else 'train'
  by_step = {(r['step'], kind(r)): r for r in actual}
  assert [(r['step'], kind(r)) for r in actual if kind(r) == 'train'] == [
      (r['step'], 'train') for r in expected if kind(r) == 'train']
  for b in expected:
    a = by_step[(b['step'], kind(b))]
    assert set(a) == set(b)
    for key, value in b.items():
      if isinstance(value, float) and not key.startswith(('time', 'timing', 'steps_per', 'images_per', 'data_wait')):
        np.testing.assert_allclose(a[key], value, rtol=2e-4, atol=1e-6, err_msg=f'step {b["step"]} {key}')


@pytest.fixture(scope='module')
def mesh_runs(tmp_path_factory):
  """Two 6-step FFSD runs: on 1 device; and on (data 1, networks 3) to step 2, resumed on (data 6, networks 1, the
  batch split) to step 4, resumed on (data 2, networks 3) to step 6. Compiled with XLA's optimisations, as `_train`.
  """
  root = tmp_path_factory.mktemp('mesh_runs')
  straight, across = str(root / 'straight'), str(root / 'across')
  jax.config.update('jax_disable_most_optimizations', False)
  try:
    train_loop.train_and_evaluate(_setup(1), straight)
    train_loop.train_and_evaluate(_setup(3, 3, max_steps=2), across)
    train_loop.train_and_evaluate(_setup(6, 1, max_steps=4), across)
    train_loop.train_and_evaluate(_setup(6, 3), across)
  finally:
    jax.config.update('jax_disable_most_optimizations', True)
  return straight, across


def test_runs_resume_across_mesh_shapes(mesh_runs):
  straight, across = mesh_runs
  expected = _records(straight)
  assert {r['step'] for r in expected} == {2, 4, 6}
  _assert_records_close(_records(across), expected)
  with open(os.path.join(across, 'summary.json')) as f, open(os.path.join(straight, 'summary.json')) as g:
    summary, straight_summary = json.load(f), json.load(g)
  assert summary['step'] == straight_summary['step'] == 6
  np.testing.assert_allclose(summary['last_leader_top1'], straight_summary['last_leader_top1'])


def test_eval_export_and_conversion_of_a_networks_parallel_checkpoint(mesh_runs, tmp_path):
  """The last checkpoint of `across` was saved by a (data 2, networks 3) run: evaluated on a networks-split mesh and
  exported, it gives the logits of the 1-device run's."""
  straight, networks_parallel = mesh_runs
  one_device, parallel = _setup(1), _setup(3, 3)
  results = {}
  for name, workdir, setup in (('straight', straight, one_device), ('parallel', networks_parallel, parallel)):
    jax.config.update('jax_disable_most_optimizations', False)
    try:
      results[name] = evaluation.evaluate(setup, workdir, checkpoint='latest')
    finally:
      jax.config.update('jax_disable_most_optimizations', True)
    export_dir = export.export_leader(setup, workdir, str(tmp_path / name), checkpoint='latest')
    images = _batch(9)['image']
    results[name]['logits'] = np.asarray(export.load_leader(export_dir)(images))
  straight_result, parallel_result = results['straight'], results['parallel']
  assert straight_result['step'] == parallel_result['step'] == 6
  np.testing.assert_allclose(parallel_result['loss'], straight_result['loss'], rtol=1e-4)
  assert parallel_result['top1'] == straight_result['top1']
  np.testing.assert_allclose(parallel_result['logits'], straight_result['logits'], rtol=1e-4, atol=1e-5)


def test_official_conversion_of_a_stacked_state(tmp_path):
  """Both directions on a (data 1, networks 3) resnet20 state: its official-format leader and trans-fusion head,
  brought back to the per-network layout, are the 1-device state's, bit for bit; and an official checkpoint loaded
  with `init_leader_from` (as a fresh run does, before stacking) lands in the stacked leader's slot."""
  setup = run_setup.build(tiny_config(model='resnet20', network_parallelism=3), devices=jax.devices()[:3])
  program = program_lib.build(setup)
  canonical = jax.device_get(sharding.init_replicated(setup.init_fn, setup.mesh))
  stacked = program.init_state()
  assert stacked.params[network_stack.STACK_KEY]['conv1']['kernel'].shape[0] == 3
  leader = lambda state: {'params': state.params['leader'], 'batch_stats': state.batch_stats['leader']}
  trans = lambda state: {'params': state.params['trans_fusion'], 'batch_stats': state.batch_stats['trans_fusion']}
  back = jax.device_get(program.to_canonical(stacked))
  expected = official.to_official(leader(canonical), 'resnet20', trans(canonical))
  converted = official.to_official(leader(back), 'resnet20', trans(back))
  assert list(converted) == list(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(converted[key], value, err_msg=key)

  other = jax.tree.map(lambda x: np.asarray(x) + 0.5, leader(canonical))  # A leader unlike the fresh one.
  written = official.write_official(str(tmp_path / 'other'), other, 'resnet20', trans(canonical))
  state = official.init_leader_from(sharding.init_replicated(setup.init_fn, setup.mesh), written[0], 'resnet20',
                                    setup.config.num_classes, setup.config.num_students)
  stacked = jax.device_get(program.from_canonical(state))
  index = network_stack.NetworkStack.for_method(setup.method).names.index('leader')
  for collection in ('params', 'batch_stats'):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(getattr(stacked, collection)[network_stack.STACK_KEY]),
                            jax.tree.leaves(other[collection])):
      np.testing.assert_array_equal(np.asarray(a)[index], b, err_msg=jax.tree_util.keystr(path))


def test_the_config_refuses_what_cannot_split_in_one_line():
  problems = config_checks.config_problems(tiny_config(network_parallelism=2))
  assert problems == ["config.network_parallelism=2: must divide the 3 networks of method 'ffsd' (student_0, "
                      'student_1, leader); valid values: 1, 3.']
  refusal = methods.method_class('one').network_parallel_refusal
  assert config_checks.config_problems(tiny_config(method='one', network_parallelism=3)) == [
      f"config.network_parallelism=3: method 'one' cannot split its networks over devices ({refusal}); set "
      '--config.network_parallelism=1.']
  assert len(config_checks.config_problems(tiny_config(method='pcl', batch_norm_statistics='device'))) == 1
  with pytest.raises(config_checks.ConfigError, match=r'^config.network_parallelism=3 does not divide the 4 devices '
                     r'\(devices = data × networks\); values that fit the devices and the 3 networks: 1.$'):
    run_setup.build(tiny_config(network_parallelism=3), devices=jax.devices()[:4])
  with pytest.raises(config_checks.ConfigError, match='not divisible by the number of data shards'):
    run_setup.build(tiny_config(network_parallelism=3, batch_size=BATCH + 1), devices=jax.devices()[:6])


def test_a_checkpoint_holds_the_per_network_layout(mesh_runs):
  """On disk, a networks-parallel run's checkpoint has the 1-device keys (docs/architecture.md)."""
  _, networks_parallel = mesh_runs
  with open(os.path.join(networks_parallel, 'config.json')) as f:
    assert json.load(f)['network_parallelism'] == 3
  restored = evaluation.inference.restore_for_inference(_setup(1), networks_parallel, 'latest')
  assert network_stack.STACK_KEY not in restored.state.params
  assert {'student_0', 'student_1', 'leader', 'fusion'} <= set(restored.state.params)
  shutil.rmtree(os.path.join(networks_parallel, 'export'), ignore_errors=True)
