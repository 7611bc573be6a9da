"""The method registry: FFSD, DML and independent reproduce committed golden values (metrics and every parameter over
3 steps), and no module outside ffsd_jax/methods/ tests a method's name.

The golden file `tests/golden/methods_3_steps.json` was written by this module (`python tests/test_methods.py`)
from the code before the methods moved onto `ffsd_jax.methods` (commit recorded in the file), so any change of
arithmetic in a refactor shows up here. It holds every metric of every step and, per leaf of params and batch_stats,
its sha256 and three float64 statistics, all under the test suite's XLA flags (conftest.py).

On the machine that wrote the file the results are bit-identical (`FFSD_GOLDEN_EXACT=1` asserts the sha256s). Other
CPUs may round differently in XLA's kernels, so the suite compares the statistics at float32 tolerance.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
# The suite's XLA flags (8 simulated CPU devices) change how XLA splits work over threads, hence the last bits: the
# golden file is written under them too.
import conftest  # pylint: disable=g-import-not-at-top,unused-import
import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

from configs import default  # pylint: disable=g-import-not-at-top
from ffsd_jax import methods, train_state, train_step  # pylint: disable=g-import-not-at-top
from ffsd_jax.data.normalization import CIFAR100_MEAN_STD  # pylint: disable=g-import-not-at-top

GOLDEN = pathlib.Path(__file__).resolve().parent / 'golden' / 'methods_3_steps.json'
METHODS = ('ffsd', 'dml', 'independent')
BATCH, CLASSES, STEPS, STEPS_PER_EPOCH = 8, 10, 3, 2  # 2 steps per epoch: step 3 sees the epoch-2 λ warm-up.


def _config(method: str):
  config = default.get_config()
  config.model = 'resnet8_tiny'
  config.num_classes = CLASSES
  config.batch_size = BATCH
  config.method = method
  config.lr_boundaries = (1,)  # The lr decays after epoch 1: step 3 trains at 0.1·lr.
  return config


def _batches():
  rng = np.random.default_rng(1234)
  return [{'image': rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8),
           'label': rng.integers(0, CLASSES, BATCH).astype(np.int32)} for _ in range(STEPS)]


def _leaf_record(leaf) -> dict[str, object]:
  array = np.asarray(leaf)
  as64 = array.astype(np.float64)
  return {'sha256': hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest(), 'sum': float(as64.sum()),
          'abs_sum': float(np.abs(as64).sum()), 'first': float(as64.reshape(-1)[0])}


def _tree_records(tree) -> dict[str, dict[str, object]]:
  return {jax.tree_util.keystr(path): _leaf_record(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def three_steps(method: str) -> dict[str, object]:
  """Trains `method` for 3 steps from seed 0 on fixed random batches; returns its metrics and leaf records."""
  config = _config(method)
  model = train_state.create_model(config)
  state = jax.jit(lambda rng: train_state.create_train_state(config, model, rng, STEPS_PER_EPOCH))(
      jax.random.key(0, impl='rbg'))
  step = train_step.jit_train_step(model, config, STEPS_PER_EPOCH, CIFAR100_MEAN_STD)
  metrics = []
  for batch in _batches():
    state, step_metrics = step(state, batch)
    metrics.append({name: float(value) for name, value in sorted(jax.device_get(step_metrics).items())})
  return {'metrics': metrics, 'params': _tree_records(state.params),
          'batch_stats': _tree_records(state.batch_stats)}


@pytest.fixture(scope='module')
def golden():
  return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize('method', METHODS)
def test_method_matches_golden(method, golden):
  expected, got = golden['methods'][method], three_steps(method)
  for step, (want, have) in enumerate(zip(expected['metrics'], got['metrics'])):
    assert sorted(have) == sorted(want), f'step {step}: metric names changed'
    for name in want:
      np.testing.assert_allclose(have[name], want[name], rtol=2e-5, atol=1e-6, err_msg=f'step {step} {name}')
  for collection in ('params', 'batch_stats'):
    assert sorted(got[collection]) == sorted(expected[collection]), f'{collection}: the tree changed'
    for path, want in expected[collection].items():
      have = got[collection][path]
      for stat in ('sum', 'abs_sum', 'first'):
        np.testing.assert_allclose(have[stat], want[stat], rtol=2e-5, atol=1e-6, err_msg=f'{collection}{path} {stat}')
      if os.environ.get('FFSD_GOLDEN_EXACT') == '1':
        assert have['sha256'] == want['sha256'], f'{collection}{path} is not bit-identical'


def test_golden_file_covers_three_steps_of_every_method(golden):
  # The golden values are real training: every method's loss and parameters change from step to step.
  for method in METHODS:
    metrics = golden['methods'][method]['metrics']
    assert len(metrics) == STEPS
    assert len({m['loss/total'] for m in metrics}) == STEPS, method
  assert 'leader/fusion_attention' in golden['methods']['ffsd']['metrics'][0]
  assert not any(key.startswith("['leader']") for key in golden['methods']['dml']['params'])


def test_no_module_outside_methods_tests_a_method_name():
  root = pathlib.Path(__file__).resolve().parents[1]
  names = '|'.join(methods.method_names())
  # `== 'dml'`, `!= "ffsd"`, `in ('ffsd', ...)`, `.method == ...`: every way of branching on a name.
  pattern = re.compile(rf"""(==|!=)\s*['"]({names})['"]|['"]({names})['"]\s*(==|!=)|\bin\s*[(\[{{]\s*['"]({names})['"]""")
  files = [root / 'main.py', *sorted((root / 'scripts').glob('*.py')),
           *sorted(p for p in (root / 'ffsd_jax').rglob('*.py') if 'methods' not in p.relative_to(root).parts)]
  found = [f'{p.relative_to(root)}:{n}: {line.strip()}' for p in files
           for n, line in enumerate(p.read_text().splitlines(), start=1) if pattern.search(line)]
  assert found == []
  assert pattern.search("if config.method == 'dml':") and pattern.search("method in ('ffsd', 'dml')")


if __name__ == '__main__':
  commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True).stdout.strip()
  GOLDEN.parent.mkdir(exist_ok=True)
  GOLDEN.write_text(json.dumps({'written_at_commit': commit, 'jax': jax.__version__,
                                'methods': {m: three_steps(m) for m in METHODS}}, indent=1, sort_keys=True) + '\n')
  print(f'wrote {GOLDEN}')
