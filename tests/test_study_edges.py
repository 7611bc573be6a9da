"""Edge cases of studies and plots (issue #20), each caused for real on fake workdirs written as the loop writes them.

A workdir here holds `metrics.jsonl` (train records every 2 steps, eval records at epoch ends, 4 steps per epoch),
`summary.json` (the loop's keys, at the end of a run or at a stop) and `config.json`, like `train_loop` leaves them.
Expected values are worked out from the fake inputs with `statistics`, never read back from the output.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import matplotlib.colors
import pytest

from ffsd_jax import studies

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, 'scripts'))
import plot_metrics  # pylint: disable=g-import-not-at-top,wrong-import-position
import study  # pylint: disable=g-import-not-at-top,wrong-import-position

STEPS_PER_EPOCH = 4
NO_EVAL_KEY = object()  # A summary.json without the best/last top-1 keys at all.


def write_run(workdir, *, last_step, total_steps, evals=None, summary=None, method='ffsd', seed=0):
  """A workdir as the loop leaves it: train records every 2 steps up to `last_step`, eval records {step: {net: top1}}
  (with eval/best_top1 of the leader), config.json, and `summary` (a dict) as summary.json when given."""
  os.makedirs(workdir, exist_ok=True)
  records, best = [], None
  for step in range(2, last_step + 1, 2):
    records.append({'step': step, 'epoch': step / STEPS_PER_EPOCH, 'time': 1000.0 + step, 'loss/total': 5.0 - step / 10,
                    'leader/ce': 2.0, 'student_0/ce': 2.5, 'learning_rate/networks': 0.1, 'lambda_scale': 0.5})
    if step in (evals or {}):
      top1 = evals[step]
      best = max(v for v in (best, top1.get('leader')) if v is not None) if 'leader' in top1 else best
      extra = {'eval/best_top1/leader': best} if best is not None else {}
      records.append({'step': step, 'epoch': step / STEPS_PER_EPOCH, 'time': 1000.5 + step,
                      **{f'eval/top1/{n}': v for n, v in top1.items()}, **extra})
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump({'method': method, 'seed': seed, 'num_epochs': total_steps // STEPS_PER_EPOCH, 'max_steps': -1}, f)
  if summary is not None:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f)
  return str(workdir)


def loop_summary(step, total_steps, best, last, last_eval, preempted=False):
  """summary.json as train_loop writes it; best/last NO_EVAL_KEY leaves the key out (a truncated summary)."""
  summary = {'step': step, 'total_steps': total_steps, 'preempted': preempted,
             'stopped_by': 'SIGTERM' if preempted else None, 'network': 'leader', 'best_leader_top1': best,
             'last_leader_top1': last, 'last_eval': {f'eval/top1/{n}': v for n, v in last_eval.items()},
             'skipped_bad_images': 0}
  return {k: v for k, v in summary.items() if v is not NO_EVAL_KEY}


def table_rows(markdown):
  """The markdown tables of `markdown` as lists of rows of cells (escaped '\\|' kept inside a cell)."""
  tables, current = [], []
  for line in markdown.splitlines() + ['']:
    if line.startswith('|'):
      current.append([c.strip() for c in line.replace('\\|', '\0').strip('|').split('|')])
    elif current:
      tables.append(current)
      current = []
  return tables


@pytest.fixture(params=[-1.0, None, NO_EVAL_KEY], ids=['old_sentinel', 'null', 'missing_key'])
def half_evaluated_study(request, tmp_path):
  """c/ffsd: seed 0 finished (leader best 10.55, last 9.5), seed 1 preempted at step 3 before its first eval."""
  root = tmp_path / 'study'
  write_run(root / 'c' / 'ffsd' / 'seed0', last_step=8, total_steps=8, evals={4: {'leader': 10.55}, 8: {'leader': 9.5}},
            summary=loop_summary(8, 8, 10.55, 9.5, {'leader': 9.5}))
  no_eval = request.param
  write_run(root / 'c' / 'ffsd' / 'seed1', last_step=2, total_steps=8, seed=1,
            summary=loop_summary(2, 8, no_eval, None if no_eval is None else no_eval, {}, preempted=True))
  return str(root)


def test_seed_without_eval_is_left_out_of_mean_std_csv_and_plot(half_evaluated_study, tmp_path, monkeypatch):
  rows = studies.aggregate(studies.collect_runs([half_evaluated_study]))
  (row,) = rows
  assert row.best_top1 == [10.55, None] and row.last_top1 == [9.5, None]
  table = studies.markdown_tables(rows)
  # The mean over the one seed that has evaluated, with n = 1 shown; the other seed's value is an en dash.
  best_mean, last_mean = statistics.mean([10.55]), statistics.mean([9.5])
  assert (f'| c | ffsd | leader | 0 1 | 1/2 | 8/8, 2/8 | {best_mean:.2f} (n=1) | {last_mean:.2f} (n=1) | – | – '
          f'| {10.55:.2f}, – | {9.5:.2f}, – |') in table
  assert '-1.00' not in table and '4.77' not in table  # (10.55 + -1) / 2 = 4.775 was the bug.

  csv_path = studies.write_csv(rows, str(tmp_path / 'r.csv'))
  with open(csv_path) as f:
    (csv_row,) = list(csv.DictReader(f))
  assert float(csv_row['best_top1_mean']) == best_mean and csv_row['best_top1_std'] == ''
  assert csv_row['best_top1_n'] == '1' and csv_row['best_top1_seed0'] == repr(10.55)
  assert csv_row['best_top1_seed1'] == csv_row['last_top1_seed1'] == csv_row['last_top1/leader_seed1'] == ''
  assert not any(cell.startswith('-') for cell in csv_row.values())

  # The headline plot: one seed in the legend, no point below 0.
  captured = []
  original_save = plot_metrics._save  # pylint: disable=protected-access
  monkeypatch.setattr(plot_metrics, '_save', lambda fig, out: (captured.append(fig), original_save(fig, out))[1])
  plot_metrics.headline_figure(studies.collect_runs([half_evaluated_study]), str(tmp_path / 'h.png'))
  (fig,) = captured
  assert [t.get_text() for t in fig.legends[0].get_texts()] == ['ffsd (leader, 1 seed; 1 not evaluated yet)']
  (line,) = fig.axes[0].get_lines()
  assert line.get_xydata().tolist() == [[1.0, 10.55], [2.0, 9.5]]


def test_study_aggregate_command_on_a_half_evaluated_study(half_evaluated_study):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert study.main(['aggregate', half_evaluated_study]) == 0
  assert f'| {statistics.mean([10.55]):.2f} (n=1) |' in out.getvalue() and '4.77' not in out.getvalue()


def test_records_after_a_stale_summary_win(tmp_path):
  # Preempted at step 9 of 32 (summary: best 20), resumed, then killed at step 28 before writing a new summary.
  evals = {8: {'leader': 20.0, 'student_0': 18.0}, 16: {'leader': 25.0, 'student_0': 21.0},
           28: {'leader': 23.5, 'student_0': 22.0}}
  workdir = write_run(tmp_path / 'c' / 'ffsd' / 'seed0', last_step=28, total_steps=32, evals=evals,
                      summary=loop_summary(9, 32, 20.0, 20.0, {'leader': 20.0, 'student_0': 18.0}, preempted=True))
  run = studies.read_run(workdir, root=str(tmp_path))
  assert (run.step, run.total_steps, run.status) == (28, 32, studies.INCOMPLETE)
  assert run.best_top1 == max(v['leader'] for v in evals.values())
  assert run.last_top1 == evals[28]['leader'] and run.last_eval == evals[28]
  assert '| 28/32 |' in studies.markdown_tables(studies.aggregate([run]))
  assert studies.workdir_status(workdir) == studies.INCOMPLETE  # So `study.py run` resumes it.
  # A summary at least as new as the records wins (it is final): here its last_eval has a network the records lack.
  write_run(workdir, last_step=8, total_steps=32, evals={8: {'leader': 20.0}},
            summary=loop_summary(9, 32, 20.0, 20.0, {'leader': 20.0, 'fusion': 30.0}, preempted=True))
  run = studies.read_run(workdir, root=str(tmp_path))
  assert (run.step, run.status, run.last_eval) == (9, studies.PREEMPTED, {'leader': 20.0, 'fusion': 30.0})


def test_study_stopped_before_any_eval_prints_well_formed_tables(tmp_path):
  root = tmp_path / 'study'
  write_run(root / 'c' / 'ffsd' / 'seed0', last_step=2, total_steps=8,
            summary=loop_summary(2, 8, None, None, {}, preempted=True))
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert study.main(['aggregate', str(root), '--csv', str(tmp_path / 'r.csv')]) == 0
  tables = table_rows(out.getvalue())
  assert len(tables) == 2
  for table in tables:
    assert len({len(cells) for cells in table}) == 1, table  # Header, separator and rows: one column count.
  main_table, networks_table = tables
  header = main_table[0]
  values = dict(zip(header, main_table[2]))
  assert [values[k] for k in (studies.BEST_TEST_COLUMN, studies.LAST_TEST_COLUMN, studies.BEST_VAL_COLUMN,
                              studies.TEST_AT_BEST_VAL_COLUMN, 'best per seed', 'last per seed',
                              'test at best val per seed')] == ['–'] * 7
  assert values['steps'] == '2/8' and values['finished'] == '0/1'
  assert networks_table[2][2:] == ['–'] and len(networks_table[0]) == 3
  with open(tmp_path / 'r.csv') as f:
    (csv_row,) = list(csv.DictReader(f))
  assert csv_row['best_top1_mean'] == csv_row['best_top1_seed0'] == csv_row['last_top1_seed0'] == ''
  assert csv_row['best_top1_n'] == '0'


def test_markdown_table_rejects_a_row_of_another_width():
  assert studies.markdown_table(['a', 'b'], [['1', 'x|y']]) == ['| a | b |', '|---|---|', '| 1 | x\\|y |']
  with pytest.raises(ValueError, match='1 cells for 2 columns'):
    studies.markdown_table(['a', 'b'], [['1']])


# ----------------------------------------------------------------------------------------------------------------------
# study.py run: stops.


def _plan(tmp_path, methods=('ffsd', 'dml')):
  return studies.plan_study(['c.py'], list(methods), [0], str(tmp_path / 'study'))


def test_ctrl_c_exit_130_is_stopped_not_failed_and_stops_the_study(tmp_path):
  runs = _plan(tmp_path, ('ffsd', 'dml', 'kdcl'))

  def main_stopped_by_ctrl_c(command):
    workdir = command[command.index('--workdir') + 1]
    write_run(workdir, last_step=2, total_steps=8,
              summary={**loop_summary(2, 8, None, None, {}, preempted=True), 'stopped_by': 'SIGINT'})
    return 130

  lines = []
  outcome = studies.run_study(runs, call=main_stopped_by_ctrl_c, log=lines.append)
  assert outcome == studies.StudyOutcome(stopped=[runs[0]], not_started=runs[1:], interrupted=True)
  assert lines[-1] == '[1/3] c ffsd seed 0: stopped (resumable): Ctrl-C; rerun the study to continue.'


def test_fresh_preempted_summary_is_a_stop_a_stale_one_is_not(tmp_path):
  runs = _plan(tmp_path)
  # dml seed 0 was preempted in an earlier study; now its run crashes (exit 1) without writing a summary.
  write_run(runs[1].workdir, last_step=2, total_steps=8, summary=loop_summary(2, 8, None, None, {}, preempted=True))

  def main(command):
    workdir = command[command.index('--workdir') + 1]
    if workdir == runs[0].workdir:
      write_run(workdir, last_step=2, total_steps=8, summary=loop_summary(2, 8, None, None, {}, preempted=True))
    return 1

  outcome = studies.run_study(runs, call=main, log=lambda line: None)
  assert outcome == studies.StudyOutcome(stopped=[runs[0]], not_started=[runs[1]])
  outcome = studies.run_study(runs[1:], call=main, log=lambda line: None)
  assert outcome == studies.StudyOutcome(failed=[runs[1]])


def test_ctrl_c_between_runs_stops_the_study(tmp_path):
  runs = _plan(tmp_path)

  def interrupted(command):
    raise KeyboardInterrupt

  assert studies.run_study(runs, call=interrupted, log=lambda line: None) == studies.StudyOutcome(
      stopped=[runs[0]], not_started=[runs[1]], interrupted=True)


def test_study_run_exits_130_with_one_line_after_ctrl_c(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(studies, 'call_main', lambda command: 130)
  config = os.path.join(REPO_ROOT, 'configs', 'smoke.py')
  assert study.main(['run', '--configs', config, '--methods', 'ffsd,dml', '--seeds', '0',
                     '--root', str(tmp_path / 's')]) == 130
  captured = capsys.readouterr()
  assert captured.err.splitlines() == [
      'study stopped by Ctrl-C (0 ran, 0 already finished, 1 stopped (resumable), 0 failed, 1 not started); rerun '
      'the same command to resume: finished runs are skipped, stopped ones resume from their last checkpoint.']
  assert 'failed:' not in captured.out


_FAKE_MAIN = '''
import json, os, signal, sys, time
workdir = sys.argv[sys.argv.index('--workdir') + 1]
os.makedirs(workdir, exist_ok=True)
def stop(signum, frame):
  # As main.py does after the first Ctrl-C: save, write a preempted summary, exit 130.
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump({'step': 2, 'total_steps': 8, 'preempted': True, 'stopped_by': 'SIGINT', 'network': 'leader',
               'best_leader_top1': None, 'last_leader_top1': None, 'last_eval': {}}, f)
  sys.exit(130)
signal.signal(signal.SIGINT, stop)
open(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(workdir))), 'ready'), 'w').close()
while True:
  time.sleep(0.05)
'''


def test_real_ctrl_c_stops_the_study_cleanly(tmp_path):
  """A real SIGINT to the study's process group (what the terminal sends on Ctrl-C) while a run trains."""
  fake_main = tmp_path / 'fake_main.py'
  fake_main.write_text(_FAKE_MAIN)
  root = tmp_path / 'study'
  driver = (f'import sys; sys.path.insert(0, {os.path.join(REPO_ROOT, "scripts")!r}); import study; '
            f'study.MAIN_PY = {str(fake_main)!r}; sys.exit(study.main(sys.argv[1:]))')
  process = subprocess.Popen(
      [sys.executable, '-c', driver, 'run', '--configs', os.path.join(REPO_ROOT, 'configs', 'smoke.py'),
       '--methods', 'ffsd,dml', '--seeds', '0', '--root', str(root)],
      cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  try:
    deadline = time.time() + 120
    while not (root / 'ready').exists():
      assert process.poll() is None and time.time() < deadline, process.communicate()
      time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
  assert process.returncode == 130, stderr
  assert stderr.splitlines() == [
      'study stopped by Ctrl-C (0 ran, 0 already finished, 1 stopped (resumable), 0 failed, 1 not started); rerun '
      'the same command to resume: finished runs are skipped, stopped ones resume from their last checkpoint.']
  assert stdout.splitlines()[-1] == '[1/2] smoke ffsd seed 0: stopped (resumable): Ctrl-C; rerun the study to continue.'
  assert not (root / 'smoke' / 'dml').exists()


# ----------------------------------------------------------------------------------------------------------------------
# Plots.


def _hex(colour):
  return matplotlib.colors.to_hex(colour)


def test_group_styles_are_distinct_for_eight_methods():
  labels = ['ffsd', 'dml', 'independent', 'kdcl', 'one', 'pcl', 'mine', 'other']
  styles = plot_metrics.group_styles(labels)
  assert list(styles) == labels
  assert len({(_hex(s.colour), str(s.linestyle)) for s in styles.values()}) == 8
  assert len({str(s.linestyle) for s in styles.values()}) == 8  # The losses figure tells groups apart by style alone.
  assert len({_hex(s.colour) for s in styles.values()}) == 8
  # The same method under two configs prefers the same colour: the second gets another one.
  two_configs = plot_metrics.group_styles(['a/ffsd', 'b/ffsd'])
  assert _hex(two_configs['a/ffsd'].colour) != _hex(two_configs['b/ffsd'].colour)
  many = plot_metrics.group_styles([f'm{i}' for i in range(30)])
  assert len({(_hex(s.colour), str(s.linestyle)) for s in many.values()}) == 30


def test_every_network_gets_its_own_colour(tmp_path, monkeypatch):
  names = ['branch_0', 'branch_1', 'branch_2', 'teacher', 'temporal_mean_0', 'temporal_mean_1', 'peer_ensemble',
           'peer_0', 'student_0', 'student_8', 'leader', 'kdcl_teacher']
  colours = plot_metrics.network_colours(names)
  assert set(colours) == set(names) and len({_hex(c) for c in colours.values()}) == len(names)
  # A ONE run (branches and a teacher) drawn: every network's curve in its own colour, its losses drawn too.
  one = ['branch_0', 'branch_1', 'branch_2', 'teacher']
  workdir = tmp_path / 'one'
  os.makedirs(workdir)
  records = [{'step': 4, 'epoch': 1.0, 'loss/total': 3.0, 'gate/branch_0': 0.3,
              **{f'{n}/ce': 1.0 + i for i, n in enumerate(one)}},
             {'step': 4, 'epoch': 1.0, **{f'eval/top1/{n}': 10.0 + i for i, n in enumerate(one)}}]
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  captured = []
  original_save = plot_metrics._save  # pylint: disable=protected-access
  monkeypatch.setattr(plot_metrics, '_save', lambda fig, out: (captured.append(fig), original_save(fig, out))[1])
  runs = studies.collect_runs([f'one={workdir}'])
  plot_metrics.networks_figure(runs, str(tmp_path / 'n.png'))
  drawn = {line.get_label(): _hex(line.get_color()) for line in captured[0].axes[0].get_lines()}
  assert set(drawn) == set(one) and len(set(drawn.values())) == len(one)
  losses = plot_metrics.losses_figure(runs, str(tmp_path / 'l.png'))
  assert set(losses['ce']) == {('one', n) for n in one} and 'branch_0' not in losses  # gate/* is not a loss.


def test_schedule_line_is_the_exact_step_function_and_the_dots_are_window_means(tmp_path, monkeypatch):
  config = {'learning_rate': 0.1, 'decoder_learning_rate': 0.001, 'lr_boundaries': [1], 'lr_decay': 0.1,
            'lr_schedule': 'cifar', 'lambda_warmup_epochs': 2, 'num_epochs': 2, 'max_steps': -1, 'method': 'ffsd'}
  workdir = tmp_path / 'w'
  os.makedirs(workdir)
  (workdir / 'config.json').write_text(json.dumps(config))
  # Logging windows of 4 steps that straddle the drop at epoch 1 (step 4): half at 0.1, half at 0.01.
  window_mean = statistics.mean([0.1, 0.1, 0.01, 0.01])
  records = [{'step': 2, 'epoch': 0.5, 'learning_rate/networks': 0.1},
             {'step': 6, 'epoch': 1.5, 'learning_rate/networks': window_mean},
             {'step': 8, 'epoch': 2.0, 'learning_rate/networks': 0.01}]
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  captured = []
  original_save = plot_metrics._save  # pylint: disable=protected-access
  monkeypatch.setattr(plot_metrics, '_save', lambda fig, out: (captured.append(fig), original_save(fig, out))[1])
  plot_metrics.schedules_figure(studies.collect_runs([f'ffsd={workdir}']), str(tmp_path / 's.png'))
  lines = {line.get_label(): line for line in captured[0].axes[0].get_lines()}
  assert set(lines) == {'ffsd', 'ffsd (logged window mean)'}
  assert lines['ffsd'].get_drawstyle() == 'steps-pre'
  assert sorted({round(float(y), 6) for y in lines['ffsd'].get_ydata()}) == [0.01, 0.1]  # Never the 0.055.
  assert lines['ffsd (logged window mean)'].get_ydata().tolist() == [0.1, window_mean, 0.01]


# ----------------------------------------------------------------------------------------------------------------------
# Errors: one line on stderr, a traceback only with --verbosity=1.


@pytest.mark.parametrize('script', ['study', 'plot_metrics'])
def test_bad_root_is_one_line_on_stderr(script, tmp_path):
  missing = str(tmp_path / 'no_such_study')
  arguments = ['aggregate', missing] if script == 'study' else [missing, '--out', str(tmp_path / 'p')]
  command = [sys.executable, os.path.join(REPO_ROOT, 'scripts', f'{script}.py'), *arguments]
  result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
                          timeout=120, check=False)
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
      f'StudyError: {missing}: no such folder; give a study root (the --root of scripts/study.py run), a workdir, '
      'or label=workdir.']
  assert result.stdout == ''
  verbose = subprocess.run(command + ['--verbosity=1'], capture_output=True, text=True, timeout=120, check=False,
                           env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert verbose.returncode == 2 and 'Traceback' in verbose.stderr
  assert verbose.stderr.splitlines()[-1] == result.stderr.strip()


def test_other_user_errors_are_one_line(tmp_path, capsys):
  damaged = tmp_path / 'w'
  write_run(damaged, last_step=4, total_steps=8)
  lines = (damaged / 'metrics.jsonl').read_text().splitlines()
  (damaged / 'metrics.jsonl').write_text('\n'.join(['{not json'] + lines) + '\n')
  config = os.path.join(REPO_ROOT, 'configs', 'smoke.py')
  cases = [
      (lambda: study.main(['aggregate', str(damaged)]), 1, 'UnreadableWorkdirError: ', 'line 1'),
      (lambda: study.main(['run', '--configs', config, '--root', str(tmp_path), '--seeds', '0,x']), 2,
       "StudyError: --seeds '0,x'", 'e.g. --seeds 0,1,2'),
      (lambda: study.main(['run', '--configs', config, '--root', str(tmp_path), '--methods', 'ffsd,nope']), 2,
       'StudyError: --methods: unknown method nope', 'choose from'),
      (lambda: study.main(['aggregate', str(damaged), '--bogus']), 2, 'study.py: error: unrecognized', '--help'),
      (lambda: plot_metrics.main([str(damaged), '--figures', 'headline,nope']), 2, "StudyError: Unknown figure 'nope'",
       'choose --figures'),
      (lambda: plot_metrics.main([str(damaged), '--config', str(tmp_path / 'none.py')]), 2, 'StudyError: ',
       'no such config file'),
  ]
  for call, status, start, fix in cases:
    with pytest.raises(SystemExit) as exit_info:
      call()
    err = capsys.readouterr().err
    assert exit_info.value.code == status, err
    assert len(err.splitlines()) == 1 and err.startswith(start) and fix in err, err
