"""scripts/compare_official.py and scripts/compare_convolutions.py: their project-side paths (no torch) and their refusals."""

import os
import pathlib

import pytest

import conftest
from ffsd_jax import studies

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def compare_official():
  return conftest.load_script('compare_official')


def test_project_timer_runs_the_smoke_step(compare_official):
  config = studies.load_config_file(str(REPO_ROOT / 'configs' / 'smoke.py'), str(REPO_ROOT))
  run, facts = compare_official.project_timer(config, 'float32', 16)
  times = run(2)
  assert len(times) == 2 and all(t > 0 for t in times)
  assert facts['model'] == 'resnet8_tiny' and facts['compile_s'] > 0
  summary = compare_official.summarise(times)
  assert summary['min_s'] <= summary['median_s'] <= summary['max_s'] and summary['n'] == 2


def test_refuses_missing_or_unrecognised_checkout(compare_official, tmp_path, capsys):
  with pytest.raises(compare_official.OfficialCheckoutError, match='is not a folder'):
    compare_official.check_official_src(str(tmp_path / 'absent'))
  (tmp_path / 'CIFARTrainer.py').write_text('class Trainer:\n  pass\n')
  with pytest.raises(compare_official.OfficialCheckoutError, match='missing models/__init__.py'):
    compare_official.check_official_src(str(tmp_path))
  for name in compare_official._OFFICIAL_FILES[1:]:  # pylint: disable=protected-access
    os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
    (tmp_path / name).write_text('')
  with pytest.raises(compare_official.OfficialCheckoutError, match='no Trainer.train_with_test'):
    compare_official.check_official_src(str(tmp_path))
  # From the command line: exit status 2 and the reason, before torch or JAX are touched.
  with pytest.raises(SystemExit) as exit_info:
    compare_official.main(['--official_src', str(tmp_path / 'absent')])
  assert exit_info.value.code == 2
  assert 'compare_official: --official_src' in capsys.readouterr().err


def test_config_specs(compare_official):
  path, dtype = compare_official.parse_config_spec('resnet32:bfloat16')
  assert path.endswith('configs/cifar100_resnet32.py') and dtype == 'bfloat16'
  assert compare_official.parse_config_spec('wrn16_2')[1] == 'float32'
  with pytest.raises(ValueError, match='no file'):
    compare_official.parse_config_spec('no_such_net')


@pytest.fixture(scope='module')
def compare_convolutions():
  return conftest.load_script('compare_convolutions')


def test_compare_convolutions_lists_resnet32_layers(compare_convolutions):
  # ResNet-32: a 3->16 stem, then 5 BasicBlocks of two 3x3 convs per stage at 32, 16 and 8 pixels; the first block of
  # stages 2 and 3 has a stride-2 first conv and a 1x1 stride-2 projection shortcut.
  config = studies.load_config_file(str(REPO_ROOT / 'configs' / 'cifar100_resnet32.py'), str(REPO_ROOT))
  counts = compare_convolutions.backbone_convolutions(config, batch_size=4)
  described = {compare_convolutions.describe(shape): count for shape, count in counts.items()}
  assert described == {
      '4x32x32x3 3x3 3->16 s1': 1, '4x32x32x16 3x3 16->16 s1': 10,
      '4x32x32x16 3x3 16->32 s2': 1, '4x32x32x16 1x1 16->32 s2': 1, '4x16x16x32 3x3 32->32 s1': 9,
      '4x16x16x32 3x3 32->64 s2': 1, '4x16x16x32 1x1 32->64 s2': 1, '4x8x8x64 3x3 64->64 s1': 9}


def test_compare_convolutions_refuses_a_missing_config(compare_convolutions, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    compare_convolutions.main(['--config', str(tmp_path / 'absent.py')])
  assert exit_info.value.code == 2
  assert 'is not a file' in capsys.readouterr().err
