"""Every error a user can fix is at most 2 lines from main.py (no traceback), with the documented exit status;
`--verbosity=1` adds the traceback. Each case is caused for real (a missing folder, a corrupt JPEG, a file where the
workdir should be, ...)."""

from __future__ import annotations

import concurrent.futures
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from conftest import child_env, report_lines
from ffsd_jax import errors
from ffsd_jax import export

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = ['main.py', '--config', 'configs/smoke.py']


def _run(args: list[str], devices: int = 1) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                        env=child_env(devices))


def _image_folder(root: pathlib.Path, classes=('a', 'b'), count=4, size=32, splits=('train', 'test')):
  rng = np.random.default_rng(0)
  for split in splits:
    for name in classes:
      (root / split / name).mkdir(parents=True, exist_ok=True)
      for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(root / split / name / f'{i}.jpg')
  return root


def _folder_args(root: pathlib.Path, *extra: str) -> list[str]:
  return ['--config.dataset=image_folder', f'--config.image_folder={root}', '--config.num_classes=2',
          '--config.batch_size=4', '--config.eval_batch_size=4', '--config.max_steps=1', *extra]


@pytest.fixture(scope='module')
def cases(tmp_path_factory) -> dict[str, tuple[list[str], int, str, int]]:
  """name -> (argv, simulated devices, a phrase the one line must contain, exit status)."""
  tmp = tmp_path_factory.mktemp('cases')
  corrupt = _image_folder(tmp / 'corrupt')
  (corrupt / 'train' / 'b' / '1.jpg').write_bytes((corrupt / 'train' / 'b' / '1.jpg').read_bytes()[:200])
  empty_class = _image_folder(tmp / 'empty_class')
  for file in (empty_class / 'train' / 'b').iterdir():
    file.unlink()
  mismatch = _image_folder(tmp / 'mismatch')
  (mismatch / 'test' / 'b').rename(mismatch / 'test' / 'c')
  wrong_size = _image_folder(tmp / 'wrong_size')
  PIL.Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(wrong_size / 'train' / 'a' / '0.jpg')
  good = _image_folder(tmp / 'good')
  workdir_file = tmp / 'a_file'
  workdir_file.write_text('not a folder')
  trained = tmp / 'trained'  # A run whose checkpoint a changed batch cannot resume.
  result = _run([*SMOKE, '--workdir', str(trained), '--config.max_steps=2'])
  assert result.returncode == 0, result.stderr[-3000:]
  damaged = tmp / 'damaged_metrics'  # A metrics.jsonl edited in the middle (only its last line can be torn).
  shutil.copytree(trained, damaged)
  lines = (damaged / 'metrics.jsonl').read_text().splitlines()
  (damaged / 'metrics.jsonl').write_text('\n'.join([lines[0][:-3]] + lines[1:]) + '\n')
  unevaluated = tmp / 'no_checkpoint'
  unevaluated.mkdir()
  (unevaluated / 'config.json').write_text((trained / 'config.json').read_text())
  w = lambda name: ['--workdir', str(tmp / 'runs' / name)]
  return {
      'missing data_dir': (['main.py', '--config', 'configs/cifar100_resnet32.py', *w('a'),
                            f'--config.data_dir={tmp / "nowhere"}'], 1, 'prepare_data.py', 1),
      'unprepared data_dir': (['main.py', '--config', 'configs/cifar100_resnet32.py', *w('b'),
                               f'--config.data_dir={tmp}'], 1, 'prepare_data.py', 1),
      'missing image folder': ([*SMOKE, *w('c'), *_folder_args(tmp / 'nowhere')], 1, str(tmp / 'nowhere'), 1),
      'unset image folder': ([*SMOKE, *w('d'), '--config.dataset=image_folder'], 1, 'image_folder', 1),
      'corrupt jpeg': ([*SMOKE, *w('e'), *_folder_args(corrupt)], 1, 'train/b/1.jpg', 1),
      'empty class folder': ([*SMOKE, *w('f'), *_folder_args(empty_class)], 1, 'train/b', 1),
      'class mismatch': ([*SMOKE, *w('g'), *_folder_args(mismatch)], 1, 'c', 1),
      'wrong num_classes': ([*SMOKE, *w('h'), *_folder_args(good, '--config.num_classes=5')], 1, 'num_classes', 1),
      'wrong-size image': ([*SMOKE, *w('i'), *_folder_args(wrong_size)], 1, '40', 1),
      'workdir is a file': ([*SMOKE, '--workdir', str(workdir_file)], 1, 'is a file', 1),
      'indivisible batch': ([*SMOKE, *w('j'), '--config.batch_size=33'], 2, 'Device counts that fit: 1, 3, 11, 33',
                            errors.EXIT_USAGE),
      'batch change on resume': ([*SMOKE, '--workdir', str(trained), '--config.max_steps=4',
                                  '--config.batch_size=16'], 1, 'batch', errors.EXIT_USAGE),
      'damaged metrics.jsonl': ([*SMOKE, '--workdir', str(damaged), '--config.max_steps=4'], 1,
                                'metrics.jsonl, line 1, is not a JSON record', 1),
      'eval without a checkpoint': (['main.py', '--workdir', str(unevaluated), '--mode', 'eval'], 1,
                                    'No best checkpoint', 1),
  }


def test_each_case_is_at_most_two_lines_without_a_traceback(cases):
  """The issue's point 5: every case, at most 2 lines (without --verbosity), the documented exit status, and
  nothing written into the workdir that was to be created."""
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = dict(zip(cases, pool.map(lambda case: _run(case[0], case[1]), cases.values())))
  failures = []
  for name, result in results.items():
    _, _, phrase, status = cases[name]
    lines = report_lines(result.stderr)
    if (result.returncode != status or not 1 <= len(lines) <= 2 or 'Traceback' in result.stderr
        or phrase not in ' '.join(lines)):
      failures.append(f'{name}: exit {result.returncode} (want {status}), {len(lines)} lines: {lines[:6]} '
                      f'(want {phrase!r})')
  assert not failures, '\n'.join(failures)
  for name in cases:
    workdir = pathlib.Path(cases[name][0][cases[name][0].index('--workdir') + 1])
    if workdir.parent.name == 'runs':
      assert not (workdir / 'checkpoints').exists(), name  # Failed before anything was saved.


def test_verbosity_1_shows_the_traceback(cases):
  args, devices, phrase, status = cases['corrupt jpeg']
  result = _run([*args, '--verbosity=1'], devices)
  assert result.returncode == status
  assert 'Traceback' in result.stderr and phrase in report_lines(result.stderr)[-1]


def test_load_leader_without_leader_json_is_one_line(tmp_path):
  with pytest.raises(export.ExportError) as raised:
    export.load_leader(str(tmp_path))
  assert '\n' not in str(raised.value) and str(tmp_path) in str(raised.value)
  assert isinstance(raised.value, errors.UserError)
