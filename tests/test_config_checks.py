"""Config validation before anything runs, main.py's one-line errors, and config changes on resume."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from configs import default as default_config
from configs import smoke as smoke_config
from ffsd_jax import checkpointing
from ffsd_jax import config_checks

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# configs/saved.py reads a workdir's config.json (it takes the workdir): tested in test_run_edges.py.
CONFIGS = sorted(p for p in (REPO_ROOT / 'configs').glob('*.py') if p.name not in ('__init__.py', 'saved.py'))


def smoke(**overrides):
  config = smoke_config.get_config()
  config.update(overrides)
  return config


def _problems(**overrides) -> list[str]:
  with pytest.raises(config_checks.ConfigError) as info:
    config_checks.validate_config(smoke(**overrides))
  return str(info.value).splitlines()


# ----------------------------------------------------------------------------------------------------------------------
# validate_config.

# (overrides, the key the one problem line must name).
BAD_VALUES = [
    ({'log_every_steps': 0}, 'log_every_steps'),
    ({'log_every_steps': -1}, 'log_every_steps'),
    ({'checkpoint_every_steps': 0}, 'checkpoint_every_steps'),
    ({'eval_every_epochs': 0}, 'eval_every_epochs'),
    ({'keep_checkpoints': 0}, 'keep_checkpoints'),
    ({'num_epochs': 0}, 'num_epochs'),
    ({'num_epochs': -1, 'max_steps': 5}, 'num_epochs'),
    ({'batch_size': 0}, 'batch_size'),
    ({'eval_batch_size': 0}, 'eval_batch_size'),
    ({'temperature': 0.0}, 'temperature'),
    ({'temperature': -1.0}, 'temperature'),
    ({'temperature': math.nan}, 'temperature'),
    ({'temperature': math.inf}, 'temperature'),
    ({'lambda_diversity': -1e-5}, 'lambda_diversity'),
    ({'lambda_fusion': math.nan}, 'lambda_fusion'),
    ({'lambda_self_distillation': -1.0}, 'lambda_self_distillation'),
    ({'lambda_warmup_epochs': -1}, 'lambda_warmup_epochs'),
    ({'learning_rate': 0.0}, 'learning_rate'),
    ({'learning_rate': -0.1}, 'learning_rate'),
    ({'learning_rate': math.inf}, 'learning_rate'),
    ({'decoder_learning_rate': 0.0}, 'decoder_learning_rate'),
    ({'weight_decay': -1e-4}, 'weight_decay'),
    ({'weight_decay': math.nan}, 'weight_decay'),
    ({'fusion_weight_decay': -1.0}, 'fusion_weight_decay'),
    ({'decoder_weight_decay': math.inf}, 'decoder_weight_decay'),
    ({'momentum': 1.0}, 'momentum'),
    ({'momentum': -0.1}, 'momentum'),
    ({'momentum': math.nan}, 'momentum'),
    ({'num_students': 1}, 'num_students'),
    ({'method': 'dml', 'num_students': 1}, 'num_students'),
    ({'method': 'independent', 'num_students': 0}, 'num_students'),
    ({'lr_boundaries': (2, 1)}, 'lr_boundaries'),
    ({'lr_boundaries': (1, 1)}, 'lr_boundaries'),
    ({'lr_boundaries': (0, 5)}, 'lr_boundaries'),
    ({'lr_decay': 0.0}, 'lr_decay'),
    ({'lr_decay': math.nan}, 'lr_decay'),
    ({'method': 'ffs'}, 'method'),
    ({'compute_dtype': 'float16'}, 'compute_dtype'),
    ({'lr_schedule': 'linear'}, 'lr_schedule'),
    ({'dataset': 'cifar1000'}, 'dataset'),
    ({'normalization': 'cifar'}, 'normalization'),
    ({'model': 'resnet'}, 'model'),
    ({'image_size': 0}, 'image_size'),
    ({'image_size': 64}, 'image_size'),  # resnet8_tiny is a CIFAR-layout network: 32x32 only.
    ({'eval_resize_size': 16}, 'eval_resize_size'),
    ({'num_classes': 1}, 'num_classes'),
    ({'num_data_workers': -2}, 'num_data_workers'),
    ({'max_steps': 0}, 'max_steps'),
    ({'max_steps': -2}, 'max_steps'),
    ({'seed': -1}, 'seed'),
    ({'synthetic_num_train_examples': 0}, 'synthetic_num_train_examples'),
]


@pytest.mark.parametrize('overrides,key', BAD_VALUES, ids=lambda v: '-'.join(f'{k}={x}' for k, x in v.items())
                         if isinstance(v, dict) else None)
def test_bad_value_is_rejected_naming_the_key(overrides, key):
  [line] = _problems(**overrides)  # Exactly one problem, on one line.
  assert line.startswith(f'config.{key}={smoke(**overrides)[key]!r}: '), line
  assert f'--config.{key}=' in line, line  # The fix names the flag to set.


def test_exact_messages():
  assert _problems(log_every_steps=0) == [
      'config.log_every_steps=0: must be an integer >= 1; set --config.log_every_steps=50']
  assert _problems(temperature=0.0) == [
      'config.temperature=0.0: must be a finite number > 0; set --config.temperature=2.0']
  assert _problems(momentum=1.0) == ['config.momentum=1.0: must be a number in [0, 1); set --config.momentum=0.9']
  assert _problems(method='dml', num_students=1) == [
      "config.num_students=1: must be an integer >= 2; set --config.num_students=2 (method 'dml' needs >= 2)"]
  assert _problems(compute_dtype='float16') == [
      "config.compute_dtype='float16': must be one of float32, bfloat16; set --config.compute_dtype=bfloat16"]
  assert _problems(max_steps=0) == [
      'config.max_steps=0: must be -1 (train num_epochs) or an integer >= 1; set --config.max_steps=-1']
  # The suggested value is the valid one nearest in spelling, not the default.
  [model_line] = _problems(model='resnet19')
  assert model_line.endswith('; set --config.model=resnet18'), model_line
  assert _problems(method='kdlc')[0].endswith('; set --config.method=kdcl')


def test_every_problem_is_reported_at_once_in_a_fixed_order():
  assert _problems(log_every_steps=0, batch_size=0, temperature=0.0, lambda_fusion=-1.0) == [
      'config.log_every_steps=0: must be an integer >= 1; set --config.log_every_steps=50',
      'config.batch_size=0: must be an integer >= 1; set --config.batch_size=128',
      'config.temperature=0.0: must be a finite number > 0; set --config.temperature=2.0',
      'config.lambda_fusion=-1.0: must be a finite number >= 0; set --config.lambda_fusion=0 to turn the term off',
  ]


@pytest.mark.parametrize('overrides', [
    {'num_epochs': 0, 'max_steps': 5},  # max_steps > 0 replaces num_epochs.
    {'lambda_warmup_epochs': 0, 'lambda_diversity': 0.0, 'lambda_fusion': 0.0, 'lambda_self_distillation': 0.0},
    {'weight_decay': 0.0, 'fusion_weight_decay': 0.0, 'decoder_weight_decay': 0.0, 'momentum': 0.0},
    {'lr_boundaries': ()},
    {'method': 'independent', 'num_students': 1},
    {'normalization': None, 'eval_resize_size': 32, 'num_data_workers': 0},
    {'compute_dtype': 'bfloat16', 'lr_schedule': 'imagenet', 'dataset': 'cifar10'},
])
def test_edge_values_that_can_run_are_accepted(overrides):
  config_checks.validate_config(smoke(**overrides))


def _load_config(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(f'config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_validates(path):
  assert config_checks.config_problems(_load_config(path)) == []


# ----------------------------------------------------------------------------------------------------------------------
# Key classification.


def test_every_default_key_is_classified_exactly_once():
  sets = (config_checks.FREE_KEYS, config_checks.OPTIMISATION_KEYS, config_checks.CHECKED_ELSEWHERE_KEYS)
  keys = set(default_config.get_config().keys())
  assert sorted(keys - set().union(*sets)) == []  # A new key in configs/default.py needs a decision here.
  assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])
  # Classified keys that configs/default.py does not define: read with config.get, or being added.
  assert set().union(*sets) - keys <= {'eval_top5', 'skip_bad_images'}
  assert set(checkpointing.ARCHITECTURE_KEYS) <= config_checks.CHECKED_ELSEWHERE_KEYS


def test_key_kind():
  assert config_checks.key_kind('log_every_steps') == 'free'
  assert config_checks.key_kind('learning_rate') == 'optimisation'
  assert config_checks.key_kind('model') == 'checked_elsewhere'
  assert config_checks.key_kind('some_new_key') == 'optimisation'  # Unclassified: the safe default.
  assert config_checks.key_kind('data_dir.sub') == 'free'  # A nested key follows its group.


# ----------------------------------------------------------------------------------------------------------------------
# Config changes on resume.


def test_config_changes_on_hand_made_dicts():
  saved = {'learning_rate': 0.1, 'lr_boundaries': [150, 225], 'log_every_steps': 50, 'old_key': 1, 'seed': 0,
           'temperature': 2, 'flag': True, 'group': {'a': 1, 'b': 'x'}}
  current = {'learning_rate': 0.05, 'lr_boundaries': (150, 225), 'log_every_steps': 10, 'new_key': None, 'seed': 1,
             'temperature': 2.0, 'flag': 1, 'group': {'a': 1, 'b': 'y'}}
  assert config_checks.config_changes(saved, current) == [
      {'key': 'flag', 'change': 'changed', 'old': True, 'new': 1, 'kind': 'optimisation'},
      {'key': 'group.b', 'change': 'changed', 'old': 'x', 'new': 'y', 'kind': 'optimisation'},
      {'key': 'learning_rate', 'change': 'changed', 'old': 0.1, 'new': 0.05, 'kind': 'optimisation'},
      {'key': 'log_every_steps', 'change': 'changed', 'old': 50, 'new': 10, 'kind': 'free'},
      {'key': 'new_key', 'change': 'added', 'new': None, 'kind': 'optimisation'},
      {'key': 'old_key', 'change': 'removed', 'old': 1, 'kind': 'optimisation'},
      {'key': 'seed', 'change': 'changed', 'old': 0, 'new': 1, 'kind': 'checked_elsewhere'},
  ]
  assert config_checks.config_changes(saved, saved) == []


def _saved_json(config) -> dict:
  # What the checkpoint holds: config_to_json written and read back as JSON.
  return json.loads(json.dumps(checkpointing.config_to_json(config)))


def test_config_changes_on_smoke_variations():
  saved = _saved_json(smoke())
  assert config_checks.config_changes(saved, checkpointing.config_to_json(smoke())) == []
  current = checkpointing.config_to_json(smoke(learning_rate=0.05, compute_dtype='bfloat16', lr_boundaries=(1, 3),
                                               num_epochs=4, data_dir='/data', batch_size=16))
  assert config_checks.config_changes(saved, current) == [
      {'key': 'batch_size', 'change': 'changed', 'old': 32, 'new': 16, 'kind': 'checked_elsewhere'},
      {'key': 'compute_dtype', 'change': 'changed', 'old': 'float32', 'new': 'bfloat16', 'kind': 'optimisation'},
      {'key': 'data_dir', 'change': 'changed', 'old': None, 'new': '/data', 'kind': 'free'},
      {'key': 'learning_rate', 'change': 'changed', 'old': 0.1, 'new': 0.05, 'kind': 'optimisation'},
      {'key': 'lr_boundaries', 'change': 'changed', 'old': [1, 2], 'new': [1, 3], 'kind': 'optimisation'},
      {'key': 'num_epochs', 'change': 'changed', 'old': 2, 'new': 4, 'kind': 'free'},
  ]


def test_check_resume_config_refuses_optimisation_changes_with_the_fix():
  saved = _saved_json(smoke())
  current = checkpointing.config_to_json(smoke(learning_rate=0.05, lambda_fusion=1.0, normalization='cifar100',
                                               log_every_steps=8))
  with pytest.raises(config_checks.ConfigChangeError) as info:
    config_checks.check_resume_config(saved, current, allow_change=False)
  assert str(info.value) == (
      'The config changes the optimisation of the checkpointed run: '
      'config.lambda_fusion: 10.0 in the checkpoint, 1.0 now; '
      'config.learning_rate: 0.1 in the checkpoint, 0.05 now; '
      "config.normalization: 'cifar10' in the checkpoint, 'cifar100' now. "
      'Restore these values to continue the same run, or pass --config.allow_config_change=True to resume with them '
      '(the changes are then recorded in WORKDIR/config_changes.jsonl).')
  assert isinstance(info.value, ValueError)
  changes = config_checks.check_resume_config(saved, current, allow_change=True)
  assert [c['key'] for c in changes] == ['lambda_fusion', 'learning_rate', 'log_every_steps', 'normalization']


def test_check_resume_config_lets_free_and_elsewhere_checked_changes_through():
  saved = _saved_json(smoke())
  current = checkpointing.config_to_json(smoke(keep_checkpoints=5, max_steps=100, num_data_workers=2, seed=3,
                                               allow_config_change=True))
  assert [(c['key'], c['kind']) for c in config_checks.check_resume_config(saved, current, allow_change=False)] == [
      ('allow_config_change', 'free'), ('keep_checkpoints', 'free'), ('max_steps', 'free'),
      ('num_data_workers', 'free'), ('seed', 'checked_elsewhere')]
  # A key the checkpoint lacks (config from an older version) is an unclassified change: refused by default.
  del saved['temperature']
  with pytest.raises(config_checks.ConfigChangeError, match=r'config\.temperature: absent in the checkpoint, 2\.0 now'):
    config_checks.check_resume_config(saved, current, allow_change=False)


def test_a_checkpoint_from_before_a_key_existed_resumes_when_the_key_changes_nothing():
  """An upgrade mid-run: keys added since the checkpoint at their neutral value, and another method's keys, are free;
  the same keys at another value, or the method's own new key, still need allow_config_change."""
  current = checkpointing.config_to_json(smoke())  # FFSD.
  added = ('validation_examples_per_class', 'batch_images_per_class', 'batch_norm_statistics', 'mcl_embedding_dim',
           'okddip_temperature', 'kdcl_teacher')
  saved = {k: v for k, v in _saved_json(smoke()).items() if k not in added}
  assert [(c['key'], c['kind']) for c in config_checks.check_resume_config(saved, current, allow_change=False)] == [
      (key, 'free') for key in sorted(added)]
  assert checkpointing.architecture_differences(saved, current) == {}  # mcl_embedding_dim is MCL's, not FFSD's.
  with pytest.raises(config_checks.ConfigChangeError, match=r'config\.batch_images_per_class: absent in the '
                     r'checkpoint, 2 now'):
    config_checks.check_resume_config(saved, dict(current, batch_images_per_class=2), allow_change=False)
  mcl = checkpointing.config_to_json(smoke(method='mcl'))
  mcl_saved = {k: v for k, v in mcl.items() if k != 'mcl_embedding_dim'}
  assert checkpointing.architecture_differences(mcl_saved, mcl) == {'mcl_embedding_dim': (None, 128)}
  with pytest.raises(config_checks.ConfigChangeError, match=r'mcl_temperature'):
    config_checks.check_resume_config(mcl, dict(mcl, mcl_temperature=4.0), allow_change=False)


def test_a_longer_run_under_the_cosine_schedule_is_an_optimisation_change():
  saved = checkpointing.config_to_json(smoke(lr_schedule='cosine'))
  longer = dict(saved, num_epochs=saved['num_epochs'] + 1)
  with pytest.raises(config_checks.ConfigChangeError, match=r'config\.num_epochs: 2 in the checkpoint, 3 now'):
    config_checks.check_resume_config(saved, longer, allow_change=False)
  step = checkpointing.config_to_json(smoke())  # The step schedule's boundaries are absolute epochs: free.
  assert [c['kind'] for c in config_checks.check_resume_config(
      step, dict(step, num_epochs=step['num_epochs'] + 1), allow_change=False)] == ['free']


def test_record_config_changes_appends_one_line_per_resume(tmp_path):
  config_checks.record_config_changes(str(tmp_path), 10, [])
  assert not (tmp_path / config_checks.CONFIG_CHANGES_FILE).exists()  # Nothing changed: nothing written.
  first = [{'key': 'learning_rate', 'change': 'changed', 'old': 0.1, 'new': 0.05, 'kind': 'optimisation'}]
  second = [{'key': 'num_epochs', 'change': 'changed', 'old': 2, 'new': 4, 'kind': 'free'}]
  config_checks.record_config_changes(str(tmp_path), 10, first)
  config_checks.record_config_changes(str(tmp_path), 32, second)
  lines = (tmp_path / config_checks.CONFIG_CHANGES_FILE).read_text().splitlines()
  assert [json.loads(line)['step'] for line in lines] == [10, 32]
  records = config_checks.read_config_changes(str(tmp_path))
  assert [(r['step'], r['changes']) for r in records] == [(10, first), (32, second)]
  assert all(isinstance(r['time'], float) for r in records)


def test_torn_last_line_is_skipped_and_does_not_block_the_next_record(tmp_path):
  path = tmp_path / config_checks.CONFIG_CHANGES_FILE
  changes = [{'key': 'temperature', 'change': 'changed', 'old': 2.0, 'new': 4.0, 'kind': 'optimisation'}]
  config_checks.record_config_changes(str(tmp_path), 5, changes)
  with open(path, 'a') as f:
    f.write('{"step": 9, "time": 1.0, "chan')  # A write killed mid-line.
  assert [r['step'] for r in config_checks.read_config_changes(str(tmp_path))] == [5]
  config_checks.record_config_changes(str(tmp_path), 12, changes)
  assert path.read_text().splitlines()[1] == '{"step": 9, "time": 1.0, "chan'  # The torn text stays on its own line.
  assert [r['step'] for r in config_checks.read_config_changes(str(tmp_path))] == [5, 12]
  assert config_checks.read_config_changes(str(tmp_path / 'missing')) == []


# ----------------------------------------------------------------------------------------------------------------------
# Config files that cannot be loaded (the one line main.py prints; subprocesses below).


@pytest.mark.parametrize('source,expected', [
    ('def get_config():\n  return 1 / 0\n',
     'Config file {path} failed to load: ZeroDivisionError: division by zero ({path}:2)'),
    ('def get_config(:\n', 'Config file {path} failed to load: SyntaxError: invalid syntax ({path}:1)'),
    ('def get_config():\n  return {{"a": 1}}\n',
     'Config file {path}: get_config() returned dict, not an ml_collections.ConfigDict.'),
], ids=['raises', 'syntax_error', 'not_a_config_dict'])
def test_broken_config_file_is_described_in_one_line(tmp_path, source, expected):
  path = tmp_path / 'broken.py'
  path.write_text(source.format())
  describe = config_checks._describe_flags_failure  # pylint: disable=protected-access
  message = describe(['main.py', f'--config={path}'], 'config', None)
  assert message == expected.format(path=path)


def _run_main(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, 'main.py', *args], cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=120, env=dict(os.environ, JAX_PLATFORMS='cpu'))


def test_main_bad_value_prints_one_line_and_creates_nothing(tmp_path):
  result = _run_main('--config', 'configs/smoke.py', '--workdir', str(tmp_path / 'run'), '--config.log_every_steps=0')
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr == 'config.log_every_steps=0: must be an integer >= 1; set --config.log_every_steps=50\n'
  assert not (tmp_path / 'run').exists()


def test_main_unknown_key_prints_one_line_with_a_suggestion(tmp_path):
  result = _run_main('--config', 'configs/smoke.py', '--workdir', str(tmp_path / 'run'), '--config.learning_rat=0.05',
                     '--mode', 'eval')
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr == ("Unknown config key 'learning_rat' in configs/smoke.py (did you mean 'learning_rate' or "
                           "'decoder_learning_rate'?)\n")
  assert not (tmp_path / 'run').exists()


def test_main_missing_config_file_prints_one_line(tmp_path):
  result = _run_main('--config', 'configs/smok.py', '--workdir', str(tmp_path / 'run'), '--mode', 'export')
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr == 'Config file configs/smok.py not found (--config=configs/smok.py).\n'
  assert not (tmp_path / 'run').exists()
