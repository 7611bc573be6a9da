"""Official FFSD checkpoints (SJLeo/FFSD) <-> ffsd_jax leaders: key names, layouts, safe reading, export, init.

The official key names and shapes come from `tests/data/official/leader_keys.json`, dumped from the official code's
own models (`create_model(opt, leader=True, trans_fusion_info=(C, 2))`), not from this project's naming. The tests
without torch read a committed torch-written fixture; the tests with torch (skipped without it) load the converted
weights into PyTorch modules written here with the official module structure and compare eval-mode logits on real
CIFAR-100 / ImageNet images.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest

from ffsd_jax import evaluation
from ffsd_jax import export
from ffsd_jax import models
from ffsd_jax import official
from ffsd_jax.data.normalization import CIFAR100_MEAN_STD, IMAGENET_MEAN_STD

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / 'tests' / 'data' / 'official'
SHARED_DATA = REPO_ROOT.parent / 'shared' / 'data'
OFFICIAL = json.loads((DATA / 'leader_keys.json').read_text())['architectures']
PROJECT_NAME = {cfg: name for name, cfg in official.OFFICIAL_CFG.items()}
EXPORT_METADATA_KEYS = {'model', 'network', 'num_classes', 'image_size', 'mean_std', 'compute_dtype', 'dataset', 'step',
                        'checkpoint', 'params_sha256', 'params_bytes'}


def random_variables(template, seed: int):
  """Float32 values of the template's shapes: He-normal kernels, BN stats near their trained ranges (var > 0)."""
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    name = path[-1].key
    shape = leaf.shape
    if name == 'kernel':
      fan_out = shape[-1] * (shape[0] * shape[1] if len(shape) == 4 else 1)
      scale = np.sqrt(2.0 / fan_out) if len(shape) == 4 else 1 / np.sqrt(shape[0])
      return (rng.standard_normal(shape) * scale).astype(np.float32)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return (rng.standard_normal(shape) * 0.1).astype(np.float32)

  return jax.tree_util.tree_map_with_path(value, template)


def leader_and_head(model: str, seed: int = 0, num_students: int = 2):
  spec = models.get_spec(model)
  templates = official._templates  # pylint: disable=protected-access
  leader_t, head_t = templates(spec.name, spec.default_num_classes, num_students)
  return random_variables(leader_t, seed), random_variables(head_t, seed + 1)


def assert_trees_identical(a, b):
  flat_a, flat_b = dict(official._flatten(a)), dict(official._flatten(b))  # pylint: disable=protected-access
  assert set(flat_a) == set(flat_b)
  for path in flat_a:
    x, y = np.asarray(flat_a[path]), np.asarray(flat_b[path])
    assert x.dtype == y.dtype == np.float32 and x.shape == y.shape, path
    assert x.tobytes() == y.tobytes(), path  # bit-identical


# ----------------------------------------------------------------------------------------------------------------------
# Key names, layouts and round trips (no torch).


@pytest.mark.parametrize('cfg', sorted(OFFICIAL))
def test_official_keys_equal_the_official_models(cfg):
  keys = official.official_keys(PROJECT_NAME[cfg])
  assert {k: list(v) for k, v in keys.items()} == OFFICIAL[cfg]['keys']


@pytest.mark.parametrize('cfg', sorted(OFFICIAL))
def test_round_trip_is_bit_identical(cfg):
  model = PROJECT_NAME[cfg]
  leader, head = leader_and_head(model, seed=len(cfg))
  state = official.to_official(leader, model, head, num_batches_tracked=391)
  assert {k: list(v.shape) for k, v in state.items()} == OFFICIAL[cfg]['keys']
  counters = [k for k in state if k.endswith('num_batches_tracked')]
  assert counters and all(state[k].dtype == np.int64 and int(state[k]) == 391 for k in counters)
  back_leader, back_head = official.from_official(state, model)
  assert_trees_identical(leader, back_leader)
  assert_trees_identical(head, back_head)


def test_layouts_are_the_pytorch_ones():
  leader, head = leader_and_head('resnet32')
  state = official.to_official(leader, 'resnet32', head)
  kernel = np.asarray(leader['params']['layer2_0']['conv1']['kernel'])  # (3, 3, 16, 32) HWIO
  assert np.array_equal(state['layer2.0.conv1.weight'][5, 7, 2, 0], kernel[2, 0, 7, 5])
  dense = np.asarray(leader['params']['fc']['kernel'])  # (64, 100) (in, out)
  assert np.array_equal(state['fc.weight'][99, 3], dense[3, 99])
  depthwise = np.asarray(head['params']['conv1']['kernel'])  # (3, 3, 1, 64)
  assert state['trans_fusion_module.conv1.weight'].shape == (64, 1, 3, 3)
  assert np.array_equal(state['trans_fusion_module.conv1.weight'][10, 0, 1, 2], depthwise[1, 2, 0, 10])
  assert np.array_equal(state['layer3.0.downsample.1.running_var'],
                        np.asarray(leader['batch_stats']['layer3_0']['shortcut_bn']['var']))


def test_module_prefix_and_student_files_are_accepted():
  leader, head = leader_and_head('wrn16_2')
  state = official.to_official(leader, 'wrn16_2', head)
  parallel = collections.OrderedDict((f'module.{k}', v) for k, v in state.items())
  back_leader, back_head = official.from_official(parallel, 'wideresnet1602')
  assert_trees_identical(leader, back_leader)
  assert_trees_identical(head, back_head)
  half = {k: v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v for k, v in state.items()}
  back_leader, _ = official.from_official(half, 'wrn16_2')  # a bfloat16 checkpoint is widened to float32
  assert np.array_equal(back_leader['params']['fc']['kernel'],
                        np.asarray(leader['params']['fc']['kernel']).astype(ml_dtypes.bfloat16).astype(np.float32))
  student = official.to_official(leader, 'wrn16_2')  # What the official trainer saves for a student: no head.
  back_leader, back_head = official.from_official(student, 'wrn16_2')
  assert_trees_identical(leader, back_leader)
  assert back_head is None
  with pytest.raises(official.OfficialFormatError, match=r'no trans_fusion_module\.\* keys'):
    official.from_official(student, 'wrn16_2', require_trans_fusion=True)


def test_num_students_is_read_from_the_head():
  leader, head = leader_and_head('resnet20', num_students=3)
  state = official.to_official(leader, 'resnet20', head)
  assert state['trans_fusion_module.conv1_1.weight'].shape == (192, 64, 1, 1)
  _, back_head = official.from_official(state, 'resnet20')
  assert_trees_identical(head, back_head)
  with pytest.raises(official.OfficialFormatError,
                     match=r'trans_fusion_module\.conv1_1\.weight has shape \(192, 64, 1, 1\), '
                           r'expected \(128, 64, 1, 1\)'):
    official.from_official(state, 'resnet20', num_students=2)


# ----------------------------------------------------------------------------------------------------------------------
# Reading and writing files without torch.


@pytest.mark.parametrize('name', ['torch_saved_tiny.pth', 'torch_saved_tiny_legacy.pth'])
def test_reads_a_torch_written_file_without_torch(name):
  obj = official.read_pth(str(DATA / name))
  assert (obj['epoch'], obj['cfg'], obj['index']) == (7, 'resnet32', 'leader')
  weight = obj['weight']
  base = np.arange(60, dtype=np.float32).reshape(3, 4, 5) / np.float32(7)
  assert list(weight) == ['module.conv.weight', 'module.fc.weight', 'module.half', 'module.bf16', 'module.double',
                          'module.bn.num_batches_tracked', 'module.int32', 'module.mask']
  assert weight['module.conv.weight'].dtype == np.float32 and np.array_equal(weight['module.conv.weight'], base)
  assert weight['module.fc.weight'].shape == (4, 3) and np.array_equal(weight['module.fc.weight'], base[:, :, 1].T)
  assert np.array_equal(weight['module.half'], np.arange(6, dtype=np.float16) / np.float16(3))
  assert weight['module.bf16'].dtype == ml_dtypes.bfloat16
  assert np.array_equal(weight['module.bf16'], (np.arange(4, dtype=np.float32) / 3).astype(ml_dtypes.bfloat16))
  assert np.array_equal(weight['module.double'], np.arange(3, dtype=np.float64) / 3)
  assert weight['module.bn.num_batches_tracked'].shape == () and int(weight['module.bn.num_batches_tracked']) == 12345
  assert weight['module.int32'].tolist() == [1, -2, 3] and weight['module.mask'].tolist() == [True, False]


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_written_files_read_back_identically(tmp_path, suffix):
  leader, head = leader_and_head('densenet40')
  files = official.write_official(str(tmp_path / f'modelleader_best{suffix}'), leader, 'densenet', head, epoch=299,
                                  step=116610)
  assert sorted(os.path.basename(f) for f in files) == ['modelleader_best.pth', 'modelleader_best.safetensors']
  path = [f for f in files if f.endswith(suffix)][0]
  _assert_official_file(path, 'densenet40', epoch=299, counter=('bn.num_batches_tracked', 116610), leader=leader,
                        head=head)


def _assert_official_file(path: str, model: str, *, epoch: int, counter: tuple[str, int], leader, head) -> None:
  """The official checkpoint at `path` holds {'weight', 'epoch', 'cfg', 'index'} with the official key set and
  shapes, the BN step counter, and exactly `leader` and `head`."""
  cfg = official.OFFICIAL_CFG[model]
  state, info = official.read_official_checkpoint(path)
  assert info == {'epoch': epoch, 'cfg': cfg, 'index': 'leader'}
  assert {k: list(v.shape) for k, v in state.items()} == OFFICIAL[cfg]['keys']
  assert int(state[counter[0]]) == counter[1]
  back_leader, back_head = official.from_official(state, model)
  assert_trees_identical(leader, back_leader)
  assert_trees_identical(head, back_head)


def _config(model: str, dataset: str = 'cifar100'):
  from configs.default import get_config  # pylint: disable=g-import-not-at-top
  config = get_config()
  config.model = model
  if dataset == 'imagenet2012':
    config.dataset, config.num_classes, config.image_size = 'imagenet2012', 1000, 224
  return config


def test_convert_to_export_and_load_leader(tmp_path):
  from ffsd_jax.export import load_leader  # pylint: disable=g-import-not-at-top
  leader, head = leader_and_head('resnet20', seed=3)
  source = tmp_path / 'modelleader_best.pth'
  official.save_pth(str(source), {'weight': official.to_official(leader, 'resnet20', head), 'epoch': 123,
                                  'cfg': 'resnet20', 'index': 'leader'})
  out = official.convert_official_to_export(str(source), _config('resnet20'), str(tmp_path / 'export'))
  metadata = json.loads((tmp_path / 'export' / 'leader.json').read_text())
  assert set(metadata) == EXPORT_METADATA_KEYS | {'official', 'portable', 'files'}  # The portable leader too.
  assert metadata['official'] == {'file': str(source), 'sha256': official.file_sha256(str(source)), 'epoch': 123,
                                  'cfg': 'resnet20', 'index': 'leader', 'num_students': 2}
  assert (metadata['model'], metadata['num_classes'], metadata['image_size']) == ('resnet20', 100, 32)
  assert metadata['mean_std'] == [list(CIFAR100_MEAN_STD[0]), list(CIFAR100_MEAN_STD[1])]
  _, exported = export.read_export(out)
  assert_trees_identical(leader, exported)
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), np.uint8)
  from ffsd_jax.data.normalization import normalize_images  # pylint: disable=g-import-not-at-top
  backbone = models.create_backbone('resnet20', 100)
  # The same jitted computation as load_leader's, on the original variables (eager op-by-op runs differ in the ulps).
  expected = jax.jit(lambda v, x: backbone.apply(v, normalize_images(x, CIFAR100_MEAN_STD), train=False)[0])(
      leader, images)
  np.testing.assert_array_equal(np.asarray(load_leader(out)(images)), np.asarray(expected))


def test_script_round_trip(tmp_path):
  """scripts/convert_official.py both ways; its .pth output converts back to the same export bytes."""
  leader, head = leader_and_head('resnet20', seed=4)
  source = tmp_path / 'in.safetensors'
  official.save_safetensors(str(source), official.to_official(leader, 'resnet20', head),
                            {'epoch': 5, 'cfg': 'resnet20'})
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  script = [sys.executable, str(REPO_ROOT / 'scripts' / 'convert_official.py')]
  run = lambda *args: subprocess.run(script + list(args), env=env, capture_output=True, text=True, check=False)
  result = run('--config', str(REPO_ROOT / 'configs' / 'cifar100_resnet20.py'), '--checkpoint', str(source),
               '--out', str(tmp_path / 'a'))
  assert result.returncode == 0, result.stderr
  result = run('--to_official', '--export', str(tmp_path / 'a'), '--out', str(tmp_path / 'back'))
  assert result.returncode == 0, result.stderr
  state, info = official.read_official_checkpoint(str(tmp_path / 'back.pth'))
  assert info == {'epoch': 5, 'cfg': 'resnet20', 'index': 'leader'}
  assert not any(k.startswith('trans_fusion_module.') for k in state)  # An export holds no head.
  assert_trees_identical(leader, official.from_official(state, 'resnet20')[0])


def test_export_official_from_workdir(tmp_path, monkeypatch, caplog):
  """`--mode export --format=pytorch`: the checkpoint's leader and head, its epoch and step (restore faked here)."""
  import types  # pylint: disable=g-import-not-at-top
  from ffsd_jax import inference, methods  # pylint: disable=g-import-not-at-top
  leader, head = leader_and_head('resnet56', seed=5)
  on_device = lambda tree: jax.tree.map(jax.numpy.asarray, tree)
  state = types.SimpleNamespace(params=on_device({'leader': leader['params'], 'trans_fusion': head['params']}),
                                batch_stats=on_device({'leader': leader['batch_stats'],
                                                       'trans_fusion': head['batch_stats']}), extra_state={})
  config = _config('resnet56')
  setup = types.SimpleNamespace(config=config, method=methods.get_method(config), deployed_network='leader',
                                steps_per_epoch=50_000 // 128)
  restored = lambda config, workdir, checkpoint: inference.RestoredRun(
      state, 3 * 390 + 17, f'{workdir}/checkpoints_best/1187', setup)
  monkeypatch.setattr(inference, 'restore_for_inference', restored)
  with caplog.at_level('INFO'):
    written = official.export_official_from_workdir(_config('resnet56'), str(tmp_path))
  assert written == [str(tmp_path / 'export' / 'modelleader_best.safetensors'),
                     str(tmp_path / 'export' / 'modelleader_best.pth')]
  _assert_official_file(written[1], 'resnet56', epoch=3, counter=('layer3.8.bn2.num_batches_tracked', 1187),
                        leader=leader, head=head)
  # It says what it wrote (the PyTorch export used to print nothing on success).
  assert any(r.getMessage() == f'Wrote leader (resnet56, step 1187) in the official format: {", ".join(written)}.'
             for r in caplog.records), [r.getMessage() for r in caplog.records]


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs: each fails naming the problem, and writes nothing.


def _convert_fails(tmp_path, source, model, match, dataset='cifar100'):
  out = tmp_path / 'out'
  with pytest.raises(official.OfficialFormatError, match=match):
    official.convert_official_to_export(str(source), _config(model, dataset), str(out))
  assert not out.exists()


def _official_file(tmp_path, model, state=None, name='modelleader_best.pth'):
  if state is None:
    leader, head = leader_and_head(model)
    state = official.to_official(leader, model, head)
  path = tmp_path / name
  official.save_pth(str(path), {'weight': state, 'epoch': 1, 'cfg': official.OFFICIAL_CFG[models.get_spec(model).name],
                                'index': 'leader'})
  return path


def test_another_architecture_is_named(tmp_path):
  _convert_fails(tmp_path, _official_file(tmp_path, 'resnet20'), 'resnet32',
                 r"cfg='resnet20'\): The checkpoint is not an official resnet32 \(resnet32\) leader: its keys "
                 r"look like the official resnet20 \(resnet20\); use a config with model='resnet20'\. Details: 60 "
                 r"missing key\(s\): layer1\.3\.bn1\.bias")
  _convert_fails(tmp_path, _official_file(tmp_path, 'wrn16_2'), 'densenet40',
                 r'its keys look like the official wideresnet1602 \(wrn16_2\).*'
                 r'unused key\(s\): bn1\.bias, bn1\.num_batches_tracked')


def test_extra_missing_and_misshapen_keys_are_named(tmp_path):
  leader, head = leader_and_head('resnet32')
  state = official.to_official(leader, 'resnet32', head)
  extra = collections.OrderedDict(state, **{'layer3.4.conv3.weight': np.zeros((64, 64, 1, 1), np.float32)})
  _convert_fails(tmp_path, _official_file(tmp_path, 'resnet32', extra), 'resnet32',
                 r'1 unused key\(s\): layer3\.4\.conv3\.weight\.')
  missing = collections.OrderedDict((k, v) for k, v in state.items() if k != 'layer2.1.bn2.running_var')
  _convert_fails(tmp_path, _official_file(tmp_path, 'resnet32', missing), 'resnet32',
                 r'1 missing key\(s\): layer2\.1\.bn2\.running_var\.')
  cifar10 = collections.OrderedDict(state, **{'fc.weight': np.zeros((10, 64), np.float32)})
  _convert_fails(tmp_path, _official_file(tmp_path, 'resnet32', cifar10), 'resnet32',
                 r'fc\.weight has shape \(10, 64\), expected \(100, 64\).*check num_classes \(100\)')


def test_truncated_file_is_refused(tmp_path):
  path = _official_file(tmp_path, 'resnet20')
  data = path.read_bytes()
  for cut in (len(data) // 2, len(data) - 30, 100):
    truncated = tmp_path / f'truncated_{cut}.pth'
    truncated.write_bytes(data[:cut])
    _convert_fails(tmp_path, truncated, 'resnet20', r'truncated or corrupt')
  legacy = (DATA / 'torch_saved_tiny_legacy.pth').read_bytes()  # torch 1.5's format: pickles, then raw storages
  for cut, match in ((len(legacy) - 1, r'ends inside the storage \d+: the file is truncated'),
                     (len(legacy) // 2, r'truncated'), (10, r'truncated or corrupt')):
    truncated = tmp_path / f'legacy_{cut}.pth'
    truncated.write_bytes(legacy[:cut])
    with pytest.raises(official.OfficialFormatError, match=match):
      official.read_pth(str(truncated))


class _Exploit:
  def __reduce__(self):
    return (os.system, ('echo pwned > /dev/null',))


def test_pickle_with_an_arbitrary_object_is_refused(tmp_path):
  payload = pickle.dumps({'weight': _Exploit(), 'epoch': 1}, protocol=2)
  global_name = f'{os.system.__module__}.system'  # posix.system on Linux
  bare = tmp_path / 'bare.pth'
  bare.write_bytes(payload)
  _convert_fails(tmp_path, bare, 'resnet32', rf'names the global {global_name}, which is not a tensor')
  zipped = tmp_path / 'zipped.pth'
  with zipfile.ZipFile(zipped, 'w') as z:  # torch's layout, the payload as data.pkl
    z.writestr('archive/data.pkl', payload)
    z.writestr('archive/version', '3\n')
  _convert_fails(tmp_path, zipped, 'resnet32', rf'names the global {global_name}, which is not a tensor')
  builtins = tmp_path / 'eval.pth'
  with zipfile.ZipFile(builtins, 'w') as z:
    z.writestr('archive/data.pkl', b'\x80\x02cbuiltins\neval\nX\x01\x00\x00\x001\x85R.')
  _convert_fails(tmp_path, builtins, 'resnet32', r'names the global builtins\.eval')


def test_unknown_architecture_is_refused():
  with pytest.raises(official.OfficialFormatError, match='resnet110 has no counterpart in the official FFSD code'):
    official.official_keys('resnet110')


# ----------------------------------------------------------------------------------------------------------------------
# init_leader_from.


def test_init_leader_from_export_and_official_file(tmp_path):
  import optax  # pylint: disable=g-import-not-at-top
  from ffsd_jax.train_state import TrainState  # pylint: disable=g-import-not-at-top
  old_leader, old_head = leader_and_head('resnet20', seed=10)  # then moved by one SGD step
  params = {'leader': old_leader['params'], 'student_0': old_leader['params'], 'student_1': old_leader['params'],
            'trans_fusion': old_head['params']}
  batch_stats = {'leader': old_leader['batch_stats'], 'student_0': old_leader['batch_stats'],
                 'student_1': old_leader['batch_stats'], 'trans_fusion': old_head['batch_stats']}
  tx = optax.sgd(0.1, momentum=0.9)
  state = TrainState(step=jax.numpy.asarray(0), params=params, batch_stats=batch_stats, opt_state=tx.init(params),
                     extra_state={}, tx=tx)
  state = state.apply_gradients(jax.tree.map(jax.numpy.ones_like, params), batch_stats)  # momentum now non-zero
  new_leader, new_head = leader_and_head('resnet20', seed=20)
  source = _official_file(tmp_path, 'resnet20', official.to_official(new_leader, 'resnet20', new_head))

  result = official.init_leader_from(state, str(source), 'resnet20', 100, 2)
  assert_trees_identical(new_leader, {'params': result.params['leader'], 'batch_stats': result.batch_stats['leader']})
  assert_trees_identical(new_head, {'params': result.params['trans_fusion'],
                                    'batch_stats': result.batch_stats['trans_fusion']})
  assert_trees_identical({'params': state.params['student_0'], 'batch_stats': state.batch_stats['student_0']},
                         {'params': result.params['student_0'], 'batch_stats': result.batch_stats['student_0']})
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(result.opt_state))  # fresh momentum
  assert int(result.step) == 1

  export = official.convert_official_to_export(str(source), _config('resnet20'), str(tmp_path / 'export'))
  result = official.init_leader_from(state, export, 'resnet20', 100, 2, students=True)
  for network in ('leader', 'student_0', 'student_1'):
    assert_trees_identical(new_leader, {'params': result.params[network],
                                        'batch_stats': result.batch_stats[network]})
  assert_trees_identical({'params': state.params['trans_fusion'], 'batch_stats': state.batch_stats['trans_fusion']},
                         {'params': result.params['trans_fusion'],  # an export has no head: the state's is kept
                          'batch_stats': result.batch_stats['trans_fusion']})
  with pytest.raises(official.OfficialFormatError, match='holds a resnet20 leader; the config trains resnet32'):
    official.init_leader_from(state, export, 'resnet32', 100, 2)


# ----------------------------------------------------------------------------------------------------------------------
# With torch: PyTorch modules with the official structure give the same logits on real images.

def _torch():
  return pytest.importorskip('torch', exc_type=ImportError)


def _official_torch_model(model: str, num_classes: int, num_students: int = 2):
  """PyTorch modules written for this test with the official module names and layer order (SJLeo/FFSD models/)."""
  torch_ = _torch()
  nn, functional = torch_.nn, torch_.nn.functional

  class TransFusion(nn.Module):
    def __init__(self, channels):
      super().__init__()
      self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
      self.bn1 = nn.BatchNorm2d(channels)
      self.conv1_1 = nn.Conv2d(channels, channels * num_students, 1, bias=False)
      self.bn1_1 = nn.BatchNorm2d(channels * num_students)

    def forward(self, x):
      return functional.relu(self.bn1_1(self.conv1_1(functional.relu(self.bn1(self.conv1(x))))))

  class Basic(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.downsample = None
      if stride != 1 or cin != cout:
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
      out = self.bn2(self.conv2(functional.relu(self.bn1(self.conv1(x)))))
      return functional.relu(out + (x if self.downsample is None else self.downsample(x)))

  class ResNet(nn.Module):
    def __init__(self, blocks, widths, imagenet):
      super().__init__()
      self.imagenet = imagenet
      self.conv1 = nn.Conv2d(3, widths[0], 7 if imagenet else 3, 2 if imagenet else 1, 3 if imagenet else 1,
                             bias=False)
      self.bn1 = nn.BatchNorm2d(widths[0])
      cin = widths[0]
      for index, (count, width) in enumerate(zip(blocks, widths)):
        stride = 1 if index == 0 else 2
        layer = []
        for block in range(count):
          layer.append(Basic(cin, width, stride if block == 0 else 1))
          cin = width
        setattr(self, f'layer{index + 1}', nn.Sequential(*layer))
      self.num_layers = len(blocks)
      self.fc = nn.Linear(cin, num_classes)
      self.trans_fusion_module = TransFusion(cin)

    def forward(self, x):
      x = functional.relu(self.bn1(self.conv1(x)))
      if self.imagenet:
        x = functional.max_pool2d(x, 3, 2, 1)
      for index in range(self.num_layers):
        x = getattr(self, f'layer{index + 1}')(x)
      return self.fc(torch_.flatten(functional.adaptive_avg_pool2d(x, 1), 1)), self.trans_fusion_module(x)

  class WideBasic(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.bn1 = nn.BatchNorm2d(cin)
      self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=True)
      self.dropout = nn.Dropout(0)
      self.bn2 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=True)
      self.shortcut = nn.Sequential()
      if stride != 1 or cin != cout:
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=True))

    def forward(self, x):
      out = self.dropout(self.conv1(functional.relu(self.bn1(x))))
      return self.conv2(functional.relu(self.bn2(out))) + self.shortcut(x)

  class WideResNet(nn.Module):
    def __init__(self, depth, k):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=True)
      cin = 16
      for index, width in enumerate((16 * k, 32 * k, 64 * k)):
        layer = []
        for block in range((depth - 4) // 6):
          layer.append(WideBasic(cin, width, (1 if index == 0 else 2) if block == 0 else 1))
          cin = width
        setattr(self, f'layer{index + 1}', nn.Sequential(*layer))
      self.bn1 = nn.BatchNorm2d(cin, momentum=0.9)
      self.linear = nn.Linear(cin, num_classes)
      self.trans_fusion_module = TransFusion(cin)

    def forward(self, x):
      x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
      x = functional.relu(self.bn1(x))
      return self.linear(torch_.flatten(functional.avg_pool2d(x, 8), 1)), self.trans_fusion_module(x)

  class DenseBlock(nn.Module):
    def __init__(self, cin, growth):
      super().__init__()
      self.bn1 = nn.BatchNorm2d(cin)
      self.conv1 = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x):
      return torch_.cat((x, self.conv1(functional.relu(self.bn1(x)))), 1)

  class Transition(nn.Module):
    def __init__(self, cin):
      super().__init__()
      self.bn1 = nn.BatchNorm2d(cin)
      self.conv1 = nn.Conv2d(cin, cin, 1, bias=False)

    def forward(self, x):
      return functional.avg_pool2d(self.conv1(functional.relu(self.bn1(x))), 2)

  class DenseNet(nn.Module):
    def __init__(self, depth=40, growth=12):
      super().__init__()
      cin = 2 * growth
      self.conv1 = nn.Conv2d(3, cin, 3, padding=1, bias=False)
      for index in range(3):
        layer = []
        for _ in range((depth - 4) // 3):
          layer.append(DenseBlock(cin, growth))
          cin += growth
        setattr(self, f'dense{index + 1}', nn.Sequential(*layer))
        if index < 2:
          setattr(self, f'trans{index + 1}', Transition(cin))
      self.bn = nn.BatchNorm2d(cin)
      self.fc = nn.Linear(cin, num_classes)
      self.trans_fusion_module = TransFusion(cin)

    def forward(self, x):
      x = self.trans2(self.dense2(self.trans1(self.dense1(self.conv1(x)))))
      x = functional.relu(self.bn(self.dense3(x)))
      return self.fc(torch_.flatten(functional.avg_pool2d(x, 8), 1)), self.trans_fusion_module(x)

  builders = {
      'resnet32': lambda: ResNet((5, 5, 5), (16, 32, 64), False),
      'resnet18': lambda: ResNet((2, 2, 2, 2), (64, 128, 256, 512), True),
      'wrn16_2': lambda: WideResNet(16, 2),
      'densenet40': lambda: DenseNet(),
  }
  return builders[model]()


def _cifar_images():
  folder = SHARED_DATA / 'cifar100-test-samples'
  if not folder.is_dir():
    pytest.skip(f'{folder} is absent')
  from PIL import Image  # pylint: disable=g-import-not-at-top
  files = sorted(folder.glob('cifar100_*.png'))
  return np.stack([np.asarray(Image.open(f).convert('RGB')) for f in files])


def _imagenet_images(count: int = 12):
  """The official evaluation transform up to ToTensor: Resize(256) (PIL bilinear), CenterCrop(224)."""
  folder = SHARED_DATA / 'imagenet-samples'
  if not folder.is_dir():
    pytest.skip(f'{folder} is absent')
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = []
  for path in sorted(folder.glob('*.JPEG'))[:count]:
    image = Image.open(path).convert('RGB')
    width, height = image.size
    # torchvision Resize(256): the shorter side to 256, the longer one int(256 * long / short).
    size = (256, int(256 * height / width)) if width <= height else (int(256 * width / height), 256)
    image = image.resize(size, Image.BILINEAR)
    width, height = image.size
    top, left = int(round((height - 224) / 2.0)), int(round((width - 224) / 2.0))
    images.append(np.asarray(image.crop((left, top, left + 224, top + 224))))
  return np.stack(images)


@pytest.mark.parametrize('model,dataset', [('resnet32', 'cifar100'), ('wrn16_2', 'cifar100'),
                                           ('densenet40', 'cifar100'), ('resnet18', 'imagenet2012')])
def test_same_logits_as_pytorch_with_the_official_structure(tmp_path, model, dataset):
  torch_ = _torch()
  from ffsd_jax.export import load_leader  # pylint: disable=g-import-not-at-top
  images = _cifar_images() if dataset == 'cifar100' else _imagenet_images()
  mean_std = CIFAR100_MEAN_STD if dataset == 'cifar100' else IMAGENET_MEAN_STD
  leader, head = leader_and_head(model, seed=7)
  # ffsd_jax -> official: the .pth written without torch loads strictly into the official structure.
  official.write_official(str(tmp_path / 'from_jax'), leader, model, head, epoch=1)
  network = _official_torch_model(model, 100 if dataset == 'cifar100' else 1000)
  checkpoint = torch_.load(str(tmp_path / 'from_jax.pth'), weights_only=True)
  network.load_state_dict(checkpoint['weight'])  # strict: the key sets are equal
  assert {k: list(v.shape) for k, v in network.state_dict().items()} == \
      OFFICIAL[official.OFFICIAL_CFG[model]]['keys']
  # The official PyTorch-side preprocessing: ToTensor (x / 255, NCHW) and Normalize(mean, std).
  inputs = torch_.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  inputs = (inputs - torch_.tensor(mean_std[0]).view(1, 3, 1, 1)) / torch_.tensor(mean_std[1]).view(1, 3, 1, 1)
  # Random weights with random running statistics give logits of one class for every image; running statistics
  # measured on the images themselves (a cumulative average over one train-mode pass) make a well-scaled network
  # whose top-1 depends on the image, so that an identical top-1 means something.
  for module in network.modules():
    if isinstance(module, torch_.nn.BatchNorm2d):
      module.reset_running_stats()
      module.momentum = None
  network.train()
  with torch_.no_grad():
    network(inputs)
  network.eval()
  # Likewise the classifier: centred on the images' mean pooled feature, the logits follow what differs between images
  # (the mean of ReLU features otherwise picks the same class everywhere).
  classifier = [m for m in network.modules() if isinstance(m, torch_.nn.Linear)][-1]
  pooled = []
  hook = classifier.register_forward_hook(lambda module, args, output: pooled.append(args[0]))
  with torch_.no_grad():
    network(inputs)
    hook.remove()
    classifier.bias.copy_(-classifier.weight @ pooled[0].mean(0))
    expected = network(inputs)[0].numpy().astype(np.float64)
  # official -> ffsd_jax: a file written by torch.save as the official trainer does (the ImageNet one through
  # nn.DataParallel: keys start with `module.`), converted to an export folder and evaluated by load_leader.
  # The CIFAR ones in torch 1.5's legacy format, which the official code (torch 1.5.1) wrote.
  imagenet = dataset == 'imagenet2012'
  saved = torch_.nn.DataParallel(network) if imagenet else network
  torch_.save({'weight': saved.state_dict(), 'epoch': 42, 'cfg': official.OFFICIAL_CFG[model], 'index': 'leader'},
              str(tmp_path / 'modelleader_best.pth'), _use_new_zipfile_serialization=imagenet)
  export = official.convert_official_to_export(str(tmp_path / 'modelleader_best.pth'), _config(model, dataset),
                                               str(tmp_path / 'export'))
  logits = np.asarray(load_leader(export)(images)).astype(np.float64)
  relative = np.linalg.norm(logits - expected) / np.linalg.norm(expected)
  print(f'{model}: {len(images)} images, relative L2 {relative:.2e}, max abs {np.max(np.abs(logits - expected)):.2e} '
        f'(logit RMS {np.sqrt(np.mean(expected ** 2)):.3g}), {len(set(np.argmax(expected, 1)))} distinct top-1')
  assert relative <= 1e-5
  assert np.array_equal(np.argmax(logits, 1), np.argmax(expected, 1))
  assert len(set(np.argmax(expected, 1))) >= len(images) // 4  # not one class for every image


def test_safetensors_output_is_read_by_the_safetensors_package(tmp_path):
  safetensors_numpy = pytest.importorskip('safetensors.numpy', exc_type=ImportError)
  leader, head = leader_and_head('resnet20')
  official.write_official(str(tmp_path / 'x'), leader, 'resnet20', head, epoch=3, step=9)
  tensors = safetensors_numpy.load_file(str(tmp_path / 'x.safetensors'))
  expected = official.to_official(leader, 'resnet20', head, num_batches_tracked=9)
  assert set(tensors) == set(expected) and all(np.array_equal(tensors[k], v) for k, v in expected.items())


@pytest.mark.parametrize('name', ['torch_saved_tiny.pth', 'torch_saved_tiny_legacy.pth'])
def test_torch_load_reads_the_restricted_readers_input_identically(name):
  torch_ = _torch()
  loaded = torch_.load(str(DATA / name), weights_only=True)
  ours = official.read_pth(str(DATA / name))
  assert {k: v for k, v in loaded.items() if k != 'weight'} == {k: v for k, v in ours.items() if k != 'weight'}
  for key, tensor in loaded['weight'].items():
    mine = ours['weight'][key]
    reference = tensor.float().numpy().astype(mine.dtype) if tensor.dtype == torch_.bfloat16 else tensor.numpy()
    assert mine.shape == tuple(tensor.shape) and np.array_equal(mine, reference), key


# ----------------------------------------------------------------------------------------------------------------------
# Evaluating an export folder on a dataset.


def test_eval_of_an_export_equals_eval_of_its_checkpoint(tiny_run, tmp_path):
  """`--mode eval --export_dir` (how a converted official leader is evaluated) gives exactly the checkpoint's top-1,
  top-5 and loss, and refuses an export of another architecture."""
  from test_sharding import tiny_config  # pylint: disable=g-import-not-at-top
  workdir, _ = tiny_run
  config = tiny_config()
  native = evaluation.evaluate(config, str(workdir), checkpoint='latest')
  export_dir = export.export_leader(config, str(workdir), str(tmp_path / 'export'), checkpoint='latest')
  (tmp_path / 'eval').mkdir()
  from_export = evaluation.evaluate(config, str(tmp_path / 'eval'), export_dir=export_dir)
  for key in ('top1', 'top5', 'loss', 'num_examples', 'step'):
    assert from_export[key] == native[key], key
  assert from_export['checkpoint'] == export_dir
  with pytest.raises(export.ExportError, match='holds a resnet8_tiny for 10 classes'):
    evaluation.evaluate(tiny_config(num_classes=12), str(tmp_path / 'eval'), export_dir=export_dir)
