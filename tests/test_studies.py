"""Multi-seed studies and plots on fake workdirs (hand-written summary.json / metrics.jsonl / config.json): no training.

The expected means and sample standard deviations are worked out by hand from the fake values.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys

import numpy as np
import pytest

from ffsd_jax import studies

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, 'scripts'))
import plot_metrics  # pylint: disable=g-import-not-at-top,wrong-import-position
import study  # pylint: disable=g-import-not-at-top,wrong-import-position

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
NETWORKS = ('student_0', 'student_1', 'leader', 'fusion', 'ensemble')


def write_workdir(workdir, *, eval_top1=None, summary=None, config=None, train=(), times=None):
  """A fake workdir. eval_top1: {epoch: {network: top-1}} (4 steps per epoch); train: extra train records."""
  os.makedirs(workdir, exist_ok=True)
  records = [dict(r) for r in train]
  for epoch, values in sorted((eval_top1 or {}).items()):
    records.append({'step': 4 * epoch, 'epoch': float(epoch), **{f'eval/top1/{n}': v for n, v in values.items()}})
  records.sort(key=lambda r: r['step'])
  for record, t in zip(records, times or ()):
    record['time'] = t
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
  if summary is not None:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f)
  if config is not None:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(config, f)
  return str(workdir)


def finished_summary(best, last, last_eval, network='leader', step=8):
  return {'step': step, 'total_steps': 8, 'preempted': False, 'stopped_by': None, 'network': network,
          'best_leader_top1': best, 'last_leader_top1': last,
          'last_eval': {f'eval/top1/{n}': v for n, v in last_eval.items()}, 'skipped_bad_images': 0}


@pytest.fixture
def study_root(tmp_path):
  """cifar/ffsd/seed0..2 finished (leader best 70, 72, 74; last 69, 70, 74), cifar/dml/seed0..1 finished."""
  root = tmp_path / 'study'
  for seed, (best, last, s0) in enumerate([(70.0, 69.0, 60.0), (72.0, 70.0, 61.0), (74.0, 74.0, 65.0)]):
    last_eval = {'student_0': s0, 'student_1': 50.0 + seed, 'leader': last, 'fusion': 80.0, 'ensemble': 75.0 + seed}
    write_workdir(root / 'cifar' / 'ffsd' / f'seed{seed}', eval_top1={1: {'leader': best}, 2: {'leader': last}},
                  summary=finished_summary(best, last, last_eval), times=[1000.0, 1000.0 + 100 * (seed + 1)])
  for seed, s0 in enumerate([66.0, 67.0]):
    write_workdir(root / 'cifar' / 'dml' / f'seed{seed}', eval_top1={2: {'student_0': s0, 'student_1': s0 - 1}},
                  summary=finished_summary(s0, s0, {'student_0': s0, 'student_1': s0 - 1}, network='student_0'))
  return str(root)


def test_aggregate_three_finished_seeds_gives_exact_mean_and_sample_std(study_root, tmp_path):
  rows = studies.aggregate(studies.collect_runs([study_root]))
  assert [(r.config, r.method) for r in rows] == [('cifar', 'dml'), ('cifar', 'ffsd')]
  dml, ffsd = rows
  assert ffsd.seeds == [0, 1, 2] and ffsd.statuses == [studies.FINISHED] * 3 and ffsd.network == 'leader'
  assert ffsd.best_top1 == [70.0, 72.0, 74.0] and ffsd.last_top1 == [69.0, 70.0, 74.0]
  # best: mean 72, deviations -2, 0, 2: sample variance 8 / 2 = 4. last: mean 71, deviations -2, -1, 3: 14 / 2 = 7.
  assert studies.mean_std(ffsd.best_top1) == (72.0, 2.0)
  assert studies.mean_std(ffsd.last_top1) == (71.0, math.sqrt(7.0))
  assert ffsd.last_eval['student_0'] == [60.0, 61.0, 65.0]  # mean 62, deviations -2, -1, 3: std sqrt(7) too.
  assert ffsd.wall_time_s == [100.0, 200.0, 300.0]
  assert dml.network == 'student_0' and dml.best_top1 == [66.0, 67.0] and 'leader' not in dml.last_eval
  assert studies.mean_std(dml.best_top1) == (66.5, math.sqrt(0.5))

  table = studies.markdown_tables(rows)
  assert ('| cifar | ffsd | leader | 0 1 2 | 3/3 | 8/8 | 72.00 ± 2.00 | 71.00 ± 2.65 | – | – '
          '| 70.00, 72.00, 74.00 ') in table
  assert '| 69.00, 70.00, 74.00 | –, –, – | 0:03:20 |' in table  # No validation split; mean wall time 200 s.
  assert '| cifar | ffsd | 62.00 ± 2.65 | 51.00 ± 1.00 | 71.00 ± 2.65 | 80.00 ± 0.00 | 76.00 ± 1.00 |' in table
  assert '| cifar | dml | 66.50 ± 0.71 | 65.50 ± 0.71 | – | – | – |' in table
  assert 'ddof=1' in table and '3 runs from metrics.jsonl time' in table and '2 unknown' in table

  path = studies.write_csv(rows, str(tmp_path / 'out' / 'results.csv'))
  with open(path) as f:
    csv_table = {r['method']: r for r in csv.DictReader(f)}
  row = csv_table['ffsd']
  assert float(row['best_top1_mean']) == 72.0 and float(row['best_top1_std']) == 2.0
  assert float(row['last_top1_std']) == math.sqrt(7.0)
  assert [row[f'best_top1_seed{k}'] for k in range(3)] == ['70.0', '72.0', '74.0'] and row['best_top1_n'] == '3'
  assert row['seeds'] == '0 1 2' and row['num_finished'] == '3'
  assert [row[f'last_top1/ensemble_seed{k}'] for k in range(3)] == ['75.0', '76.0', '77.0']
  assert float(row['last_top1/ensemble_mean']) == 76.0
  assert float(row['wall_time_s_mean']) == 200.0
  # dml has no leader and no seed 2: empty cells, n = 0.
  dml_row = csv_table['dml']
  assert dml_row['last_top1/leader_mean'] == dml_row['last_top1/leader_seed0'] == dml_row['best_top1_seed2'] == ''
  assert dml_row['last_top1/leader_n'] == '0' and dml_row['best_top1_seed1'] == '67.0'
  assert csv_table['dml']['network'] == 'student_0'


def test_single_seed_has_no_std(tmp_path):
  write_workdir(tmp_path / 'c' / 'ffsd' / 'seed4', eval_top1={1: {'leader': 10.0}},
                summary=finished_summary(10.0, 10.0, {'leader': 10.0}))
  rows = studies.aggregate(studies.collect_runs([str(tmp_path)]))
  assert rows[0].seeds == [4] and studies.mean_std(rows[0].best_top1) == (10.0, None)
  assert '| 10.00 | 10.00 |' in studies.markdown_tables(rows)
  assert studies.csv_rows(rows)[0]['best_top1_std'] == ''


def test_running_workdir_is_read_from_its_records_and_config(tmp_path):
  # No summary.json yet; config.json says dml seed 7 (it wins over the folder names) and 3 epochs of 4 steps.
  workdir = write_workdir(
      tmp_path / 'r32' / 'ffsd' / 'seed0',
      eval_top1={1: {'student_0': 30.0, 'student_1': 20.0}, 2: {'student_0': 25.0, 'student_1': 26.0}},
      train=[{'step': 2, 'epoch': 0.5, 'loss/total': 3.0}], config={'method': 'dml', 'seed': 7, 'num_epochs': 3,
                                                                     'max_steps': -1},
      times=[1000.0, 1060.0, 1150.5])
  run = studies.read_run(workdir, root=str(tmp_path))
  assert (run.config, run.method, run.seed, run.status) == ('r32', 'dml', 7, studies.INCOMPLETE)
  assert run.network == 'student_0'  # No leader in the records.
  assert (run.step, run.total_steps) == (8, 12)
  assert (run.best_top1, run.last_top1) == (30.0, 25.0)
  assert run.last_eval == {'student_0': 25.0, 'student_1': 26.0}
  assert (run.wall_time_s, run.wall_time_source) == (150.5, studies.WALL_TIME_FROM_RECORDS)
  rows = studies.aggregate([run])
  assert '| 0/1 | 8/12 |' in studies.markdown_tables(rows)
  assert studies.aggregate([run], finished_only=True) == []


def test_wall_time_falls_back_to_file_times(tmp_path):
  workdir = write_workdir(tmp_path / 'w', eval_top1={1: {'leader': 5.0}})
  os.makedirs(os.path.join(workdir, 'tensorboard'))
  open(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.1700000000.host'), 'w').close()
  open(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.1700000500.host'), 'w').close()  # A resume.
  os.utime(os.path.join(workdir, 'metrics.jsonl'), (1700000900, 1700000900))
  run = studies.read_run(workdir)
  assert (run.wall_time_s, run.wall_time_source) == (900.0, studies.WALL_TIME_FROM_FILES)
  assert run.method == 'w' and run.config == '' and run.seed is None  # A lone workdir: named by its folder.
  assert studies.read_run(workdir, method='ffsd').method == 'ffsd'
  # Records with `time`: from the first event file (the start, before compiling) to the last record.
  write_workdir(workdir, eval_top1={1: {'leader': 5.0}, 2: {'leader': 6.0}}, times=[1700000100.0, 1700000700.25])
  run = studies.read_run(workdir)
  assert (run.wall_time_s, run.wall_time_source) == (700.25, studies.WALL_TIME_FROM_EVENTS_AND_RECORDS)


def test_workdir_status(tmp_path):
  assert studies.workdir_status(str(tmp_path / 'none')) == studies.NEW
  finished = write_workdir(tmp_path / 'a', summary=finished_summary(1.0, 1.0, {}))
  short = write_workdir(tmp_path / 'b', summary=finished_summary(1.0, 1.0, {}, step=4))
  preempted = write_workdir(tmp_path / 'c', summary={**finished_summary(1.0, 1.0, {}, step=4), 'preempted': True})
  running = write_workdir(tmp_path / 'd', eval_top1={1: {'leader': 1.0}})
  assert [studies.workdir_status(w) for w in (finished, short, preempted, running)] == [
      studies.FINISHED, studies.INCOMPLETE, studies.PREEMPTED, studies.INCOMPLETE]


def test_plan_study_order_and_checks():
  runs = studies.plan_study(['configs/a.py', 'other/b.py'], ['ffsd', 'dml'], [0, 1], 'root')
  assert [(r.config_name, r.method, r.seed) for r in runs] == [
      ('a', 'ffsd', 0), ('a', 'dml', 0), ('a', 'ffsd', 1), ('a', 'dml', 1),
      ('b', 'ffsd', 0), ('b', 'dml', 0), ('b', 'ffsd', 1), ('b', 'dml', 1)]
  assert runs[3].workdir == os.path.join('root', 'a', 'dml', 'seed1')
  assert runs[3].command(['--config.num_epochs=2'], python='py') == [
      'py', 'main.py', '--config', 'configs/a.py', '--workdir', os.path.join('root', 'a', 'dml', 'seed1'),
      '--config.method=dml', '--config.seed=1', '--config.num_epochs=2']
  with pytest.raises(ValueError, match='Duplicate config name: a'):
    studies.plan_study(['x/a.py', 'y/a.py'], ['ffsd'], [0], 'root')
  with pytest.raises(ValueError, match='Duplicate seed: 1'):
    studies.plan_study(['a.py'], ['ffsd'], [1, 1], 'root')
  studies.check_overrides(['--config.data_dir=/d', '--config.batch_size=64'])
  with pytest.raises(ValueError, match='sets config.seed itself'):
    studies.check_overrides(['--config.seed=3'])
  with pytest.raises(ValueError, match='not a --config.KEY=VALUE'):
    studies.check_overrides(['--workdir=x'])


def test_run_study_skips_finished_resumes_the_rest_and_stops_on_preemption(tmp_path):
  root = str(tmp_path)
  runs = studies.plan_study(['c.py'], ['ffsd', 'dml'], [0, 1, 2], root)  # ffsd0 dml0 ffsd1 dml1 ffsd2 dml2
  write_workdir(runs[0].workdir, summary=finished_summary(1.0, 1.0, {}))  # Finished: skipped.
  write_workdir(runs[1].workdir, eval_top1={1: {'student_0': 1.0}})  # Started: resumed.
  calls = []

  def fake_main(command):
    calls.append(command)
    workdir = command[command.index('--workdir') + 1]
    if workdir == runs[2].workdir:
      return 1  # A crash: reported, the study goes on.
    preempted = workdir == runs[4].workdir
    write_workdir(workdir, summary={**finished_summary(1.0, 1.0, {}, step=4 if preempted else 8),
                                    'preempted': preempted})
    return 0

  lines = []
  outcome = studies.run_study(runs, ['--config.num_epochs=2'], python='py', call=fake_main, log=lines.append)
  assert [c[5] for c in calls] == [r.workdir for r in runs[1:5]]
  assert calls[0] == ['py', 'main.py', '--config', 'c.py', '--workdir', runs[1].workdir, '--config.method=dml',
                      '--config.seed=0', '--config.num_epochs=2']
  assert outcome == studies.StudyOutcome(skipped=[runs[0]], done=[runs[1], runs[3]], stopped=[runs[4]],
                                         failed=[runs[2]], not_started=[runs[5]], interrupted=False)
  assert lines[0] == f'[1/6] c ffsd seed 0: already finished at step 8; skipped ({runs[0].workdir})'
  assert lines[1].startswith('[2/6] c dml seed 0: resuming: py main.py')
  assert lines[2].startswith('[3/6] c ffsd seed 1: starting: ')
  assert lines[-1] == '[5/6] c ffsd seed 2: stopped (resumable): preempted (SIGTERM); rerun the study to continue.'


def test_study_script_prints_commands_and_aggregates(study_root, tmp_path):
  config = os.path.join(REPO_ROOT, 'configs', 'smoke.py')
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert study.main(['run', '--configs', config, '--methods', 'ffsd,dml', '--seeds', '0', '--root',
                       str(tmp_path / 's'), '--print', '--config.data_dir', '/data', '--config.num_epochs=1']) == 0
  lines = out.getvalue().splitlines()
  assert len(lines) == 2
  assert lines[1].endswith(f'main.py --config {config} --workdir {tmp_path / "s" / "smoke" / "dml" / "seed0"} '
                           '--config.method=dml --config.seed=0 --config.data_dir=/data --config.num_epochs=1')
  # Without --methods a study compares every registered method.
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert study.main(['run', '--configs', config, '--seeds', '0', '--root', str(tmp_path / 's'), '--print']) == 0
  assert [line.split('--config.method=')[1].split()[0] for line in out.getvalue().splitlines()] == [
      'ffsd', 'dml', 'independent', 'kdcl', 'one', 'pcl', 'okddip', 'mcl']
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert study.main(['aggregate', study_root, '--csv', str(tmp_path / 'r.csv')]) == 0
  assert '| cifar | ffsd | leader | 0 1 2 | 3/3 |' in out.getvalue()
  assert os.path.exists(tmp_path / 'r.csv')
  with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as exit_info:
    study.main(['run', '--configs', config, '--root', str(tmp_path), '--config.method=dml'])
  assert exit_info.value.code == 2


def _captured_axes(monkeypatch):
  """Keeps the figures' axes before plot_metrics saves and closes them, to read the drawn Line2D data back."""
  captured = []
  original = plot_metrics._save  # pylint: disable=protected-access

  def save(fig, out):
    captured.append(fig.axes)
    return original(fig, out)

  monkeypatch.setattr(plot_metrics, '_save', save)
  return captured


def _is_png(path):
  with open(path, 'rb') as f:
    return f.read(8) == PNG_SIGNATURE


def test_headline_band_is_mean_min_max_over_seeds(tmp_path, monkeypatch):
  root = tmp_path / 'study'
  leader = [{1: 10.0, 2: 30.0}, {1: 20.0, 2: 40.0}, {1: 60.0}]  # Seed 2 is still running: epoch 1 only.
  for seed, values in enumerate(leader):
    write_workdir(root / 'c' / 'ffsd' / f'seed{seed}', eval_top1={e: {'leader': v, 'student_0': 1.0}
                                                                   for e, v in values.items()})
  write_workdir(root / 'c' / 'dml' / 'seed0', eval_top1={1: {'student_0': 7.0}, 2: {'student_0': 9.0}})
  captured = _captured_axes(monkeypatch)
  bands = plot_metrics.headline_figure(studies.collect_runs([str(root)]), str(tmp_path / 'h.png'))
  assert _is_png(tmp_path / 'h.png')
  ffsd = bands['c']['ffsd']
  assert ffsd.x.tolist() == [1.0, 2.0] and ffsd.count.tolist() == [3, 2]
  assert ffsd.mean.tolist() == [30.0, 35.0]  # (10 + 20 + 60) / 3, (30 + 40) / 2.
  assert ffsd.low.tolist() == [10.0, 30.0] and ffsd.high.tolist() == [60.0, 40.0]
  dml = bands['c']['dml']  # dml is tracked by student_0.
  assert dml.mean.tolist() == [7.0, 9.0] and dml.low.tolist() == dml.high.tolist() == [7.0, 9.0]
  (axes,) = captured
  drawn = {line.get_label(): line.get_xydata().tolist() for line in axes[0].get_lines()}
  assert drawn == {'ffsd (leader, 3 seeds)': [[1.0, 30.0], [2.0, 35.0]],
                   'dml (student_0, 1 seed)': [[1.0, 7.0], [2.0, 9.0]]}
  band = axes[0].collections[0].get_paths()[0].vertices  # fill_between: the min–max band of ffsd.
  assert {tuple(v) for v in band} >= {(1.0, 10.0), (2.0, 30.0), (1.0, 60.0), (2.0, 40.0)}
  assert axes[0].get_legend() is None and axes[0].figure.legends  # The legend is the figure's, beside the axes.


def test_networks_and_losses_figures_draw_the_records(tmp_path, monkeypatch):
  train = [{'step': 2, 'epoch': 0.5, 'loss/total': 9.0, 'student_0/ce': 2.0, 'leader/ce': 3.0, 'leader/kl': 0.5,
            'grad_norm/leader': 1.0, 'accuracy/leader': 0.1},
           {'step': 4, 'epoch': 1.0, 'loss/total': 7.0, 'student_0/ce': 1.0, 'leader/ce': 2.0, 'leader/kl': 0.25}]
  a = write_workdir(tmp_path / 'a', train=train, eval_top1={1: {n: 10.0 + i for i, n in enumerate(NETWORKS)}})
  b = write_workdir(tmp_path / 'b', train=[{**r, 'leader/ce': r['leader/ce'] + 1.0} for r in train],
                    eval_top1={1: {n: 20.0 + i for i, n in enumerate(NETWORKS)}})
  runs = studies.collect_runs([f'ffsd={a}', f'ffsd={b}'])
  captured = _captured_axes(monkeypatch)
  networks = plot_metrics.networks_figure(runs, str(tmp_path / 'n.png'))
  assert list(networks['ffsd']) == list(NETWORKS)
  assert networks['ffsd']['fusion'].mean.tolist() == [18.0]  # (13 + 23) / 2.
  colours = {line.get_label(): line.get_color() for line in captured[0][0].get_lines()}
  assert len(set(colours.values())) == len(NETWORKS)
  assert colours['ensemble'] != colours['student_1']
  losses = plot_metrics.losses_figure(runs, str(tmp_path / 'l.png'))
  assert set(losses) == {'ce', 'kl', 'total'}  # Not grad_norm/* nor accuracy/*.
  assert losses['ce'][('ffsd', 'leader')].mean.tolist() == [3.5, 2.5]
  assert losses['total'][('ffsd', 'loss')].mean.tolist() == [9.0, 7.0]
  ce_axes = captured[1][[ax.get_title() for ax in captured[1]].index('<network>/ce')]
  drawn = {line.get_label(): line.get_ydata().tolist() for line in ce_axes.get_lines()}
  assert drawn == {'ffsd: student_0': [2.0, 1.0], 'ffsd: leader': [3.5, 2.5]}
  assert _is_png(tmp_path / 'n.png') and _is_png(tmp_path / 'l.png')


def test_network_colours_are_distinct():
  names = [f'student_{i}' for i in range(4)] + ['leader', 'fusion', 'ensemble', 'decoder_leader'] + [
      f'decoder_{i}' for i in range(1, 4)]
  assert len({plot_metrics.network_colour(n) for n in names}) == len(names)


def test_schedules_from_config_and_metrics(tmp_path):
  config = {'learning_rate': 0.1, 'decoder_learning_rate': 0.001, 'lr_boundaries': [1], 'lr_decay': 0.1,
            'lr_schedule': 'cifar', 'lambda_warmup_epochs': 2, 'num_epochs': 2, 'max_steps': -1, 'method': 'ffsd'}
  workdir = write_workdir(tmp_path / 'w', config=config,
                          train=[{'step': 4, 'epoch': 1.0, 'learning_rate/networks': 0.1, 'lambda_scale': 0.25}])
  plotted = plot_metrics.schedules_figure(studies.collect_runs([workdir]), str(tmp_path / 's.png'))
  assert _is_png(tmp_path / 's.png')
  # 4 steps per epoch (step 4 at epoch 1), 2 epochs: optimizer counts 0..7, drawn at epochs (c + 1) / 4.
  epochs, lr = plotted['learning_rate/networks']['ffsd']['config']
  assert epochs.tolist() == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
  np.testing.assert_allclose(lr, [0.1] * 4 + [0.01] * 4, rtol=1e-6)  # float32 schedule values.
  np.testing.assert_allclose(plotted['learning_rate/decoders']['ffsd']['config'][1], [1e-3] * 4 + [1e-4] * 4,
                             rtol=1e-6)
  # Epoch 1 of 2: exp(-5 (1 - 1/2)^2) = exp(-1.25); epoch 2: 1.
  np.testing.assert_allclose(plotted['lambda_scale']['ffsd']['config'][1], [math.exp(-1.25)] * 4 + [1.0] * 4,
                             rtol=1e-6)
  logged = plotted['learning_rate/networks']['ffsd']['logged']
  assert logged[0].tolist() == [1.0] and logged[1].tolist() == [0.1]
  # Without a config, only the logged values.
  os.remove(os.path.join(workdir, 'config.json'))
  plotted = plot_metrics.schedules_figure(studies.collect_runs([workdir]), str(tmp_path / 's2.png'))
  assert list(plotted['lambda_scale']['w']) == ['logged']


def test_keys_figure_and_plot_files(tmp_path):
  workdir = write_workdir(tmp_path / 'w', train=[{'step': 2, 'epoch': 0.5, 'leader/ce': 2.0, 'leader/kl': 1.0,
                                                  'student_0/ce': 4.0}], eval_top1={1: {'leader': 5.0}})
  runs = studies.collect_runs([f'x={workdir}'])
  plotted = plot_metrics.keys_figure(runs, ['leader/*', 'eval/top1/leader'], str(tmp_path / 'k.png'))
  assert list(plotted) == ['eval/top1/leader', 'leader/ce', 'leader/kl']
  assert plotted['leader/kl']['x'].mean.tolist() == [1.0]
  with pytest.raises(ValueError, match='No metrics key matches nothing'):
    plot_metrics.keys_figure(runs, ['nothing'], str(tmp_path / 'k2.png'))
  with contextlib.redirect_stdout(io.StringIO()) as out:
    assert plot_metrics.main([f'x={workdir}', '--out', str(tmp_path / 'p' / 'fig.png')]) == 0
  paths = out.getvalue().split()
  assert paths == [str(tmp_path / 'p' / f'fig_{f}.png') for f in plot_metrics.FIGURES]
  assert all(_is_png(p) for p in paths)


def test_run_study_stops_when_a_run_exits_short_of_its_last_step(tmp_path):
  # A stopped run exits 0 short of its last step; main.py writes summary.json with preempted: true, an older version
  # wrote none: records without a summary mean the same.
  runs = studies.plan_study(['c.py'], ['ffsd'], [0, 1], str(tmp_path))

  def stopped_run(command):
    write_workdir(command[5], eval_top1={1: {'leader': 1.0}})
    return 0

  lines = []
  outcome = studies.run_study(runs, call=stopped_run, log=lines.append)
  assert outcome == studies.StudyOutcome(stopped=[runs[0]], not_started=[runs[1]])
  assert lines[-1] == '[1/2] c ffsd seed 0: stopped (resumable): preempted; rerun the study to continue.'


def test_call_main_returns_the_exit_status_and_restores_signal_handlers():
  import signal  # pylint: disable=g-import-not-at-top
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  assert studies.call_main([sys.executable, '-c', 'import sys; sys.exit(3)']) == 3
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_validation_columns_are_aggregated_exactly(tmp_path):
  """Seeds 0, 1 from summary.json, seed 2 still running (from its records), seed 3 without a validation split."""
  root = tmp_path / 'study'
  for seed, (best_val, test_at) in enumerate([(80.0, 68.0), (82.0, 70.0)]):
    summary = dict(finished_summary(72.0, 70.0, {'leader': 70.0}), best_val_top1=best_val,
                   test_top1_at_best_val=test_at, last_test_top1=70.0)
    write_workdir(root / 'c' / 'ffsd' / f'seed{seed}', eval_top1={2: {'leader': 70.0}}, summary=summary)
  # Two evaluations reach validation top-1 84: the first one's test top-1 (71) is the one at the best validation.
  write_workdir(root / 'c' / 'ffsd' / 'seed2', train=[
      {'step': 4, 'epoch': 1.0, 'eval/top1/leader': 71.0, 'val/top1/leader': 84.0},
      {'step': 8, 'epoch': 2.0, 'eval/top1/leader': 74.0, 'val/top1/leader': 84.0}])
  write_workdir(root / 'c' / 'ffsd' / 'seed3', eval_top1={2: {'leader': 70.0}},
                summary=dict(finished_summary(72.0, 70.0, {'leader': 70.0}), best_val_top1=None,
                             test_top1_at_best_val=None, last_test_top1=70.0))
  (row,) = studies.aggregate(studies.collect_runs([str(root)]))
  assert row.best_val_top1 == [80.0, 82.0, 84.0, None]
  assert row.test_top1_at_best_val == [68.0, 70.0, 71.0, None]
  # best val: mean 82, deviations -2, 0, 2: sample variance 8 / 2 = 4. test at best val: 68, 70, 71, mean 209 / 3,
  # squared deviations sum 14565 - 209² / 3 = 14 / 3: sample variance 7 / 3.
  table = studies.markdown_tables([row])
  assert (f'| {studies.BEST_TEST_COLUMN} | {studies.LAST_TEST_COLUMN} | {studies.BEST_VAL_COLUMN} | '
          f'{studies.TEST_AT_BEST_VAL_COLUMN} |') in table
  assert f'| 82.00 ± 2.00 (n=3) | {209 / 3:.2f} ± {math.sqrt(7 / 3):.2f} (n=3) |' in table
  assert '| 70.00, 70.00, 74.00, 70.00 | 68.00, 70.00, 71.00, – |' in table  # Last, then test at best val, per seed.
  assert 'best test epoch (selected on the test set' in table
  with open(studies.write_csv([row], str(tmp_path / 'r.csv'))) as f:
    (csv_row,) = list(csv.DictReader(f))
  assert (float(csv_row['best_val_top1_mean']), float(csv_row['best_val_top1_std'])) == (82.0, 2.0)
  assert float(csv_row['test_top1_at_best_val_mean']) == pytest.approx(209 / 3, rel=1e-12)
  assert float(csv_row['test_top1_at_best_val_std']) == pytest.approx(math.sqrt(7 / 3), rel=1e-12)
  assert csv_row['best_val_top1_n'] == csv_row['test_top1_at_best_val_n'] == '3'
  assert [csv_row[f'test_top1_at_best_val_seed{k}'] for k in range(4)] == ['68.0', '70.0', '71.0', '']
  assert csv_row['last_top1_n'] == '4'
