"""Draws runs' metrics as a few readable PNG figures, from a study root or workdirs grouped by method.

  python scripts/plot_metrics.py runs/study --out runs/study/plots/r32          # a study root (scripts/study.py)
  python scripts/plot_metrics.py ffsd=runs/r32_ffsd dml=runs/r32_dml --out r32   # label=workdir; repeat a label to
                                                                                 # group several seeds
  python scripts/plot_metrics.py runs/study --keys 'leader/*,eval/top1/fusion' --out r32   # chosen keys only

Figures (`--figures`, default all but `keys`; `--keys` alone draws only the keys figure), written to
`<out>_<figure>.png`:
- headline: test top-1 of the tracked network (the deployed one: the leader, student_0 for dml, ...) per method over
  epochs: the mean over seeds as a line, the min–max over seeds as a band; one panel per config.
- networks: every network's test top-1 (mean over seeds), one panel per (config, method).
- losses: one panel per loss term (ce, kl, loss, ...), one colour per network, one line style per (config, method).
- schedules: the learning rates and the λ warm-up factor: lines computed step by step from the config
  (WORKDIR/config.json, or `--config FILE`) with the training code's own schedules (the exact step function), hollow
  dots the logged values, which are means over a logging window (one across a step lies between the two levels).
- keys: one panel per metrics.jsonl key matching `--keys` (comma-separated fnmatch patterns), mean and band per group.
Each network has its own colour, the same in every figure; each (config, method) group its own (colour, line
style); legends sit outside the axes and count only the seeds that have evaluated. An error is one line on stderr
(--verbosity=1 adds the traceback).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from typing import Any, Iterable, NamedTuple, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from ffsd_jax import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from ffsd_jax import studies  # pylint: disable=g-import-not-at-top,wrong-import-position

try:
  import matplotlib  # pylint: disable=g-import-not-at-top
  import matplotlib.colors  # pylint: disable=g-import-not-at-top
except ImportError:
  sys.exit('ModuleNotFoundError: matplotlib is not installed; pip install -r requirements-plot.txt')
matplotlib.use('Agg')
from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

FIGURES = ('headline', 'networks', 'losses', 'schedules')
# Fixed colours, so a network looks the same in every figure; students and decoders have their own small palettes,
# and every other network (branch_i, temporal_mean_i, teacher, ...) a spare colour of tab20b/tab20c.
NETWORK_COLOURS = {'leader': 'tab:red', 'fusion': 'tab:purple', 'ensemble': 'black', 'decoder_leader': 'tab:brown',
                   'loss': 'dimgray'}
_STUDENT_COLOURS = ('tab:blue', 'tab:orange', 'tab:green', 'tab:cyan', 'tab:olive', 'tab:pink', 'teal', 'navy')
_DECODER_COLOURS = ('#aec7e8', '#ffbb78', '#98df8a', '#9edae5', '#dbdb8d', '#f7b6d2', 'lightsteelblue', 'khaki')
_SPARE_NETWORK_COLOURS = tuple(matplotlib.colors.to_hex(c) for name in ('tab20b', 'tab20c')
                               for c in matplotlib.colormaps[name].colors)
# Method colours: fixed for the registered methods, the rest of tab10 (and two more) for any other group.
METHOD_COLOURS = {'ffsd': 'tab:red', 'dml': 'tab:blue', 'independent': 'tab:gray', 'kdcl': 'tab:green',
                  'one': 'tab:orange', 'pcl': 'tab:purple'}
_GROUP_COLOURS = tuple(METHOD_COLOURS.values()) + ('tab:brown', 'tab:olive', 'tab:cyan', 'tab:pink')
# Nine dash patterns: with ten colours, (colour, style) pairs stay distinct for 90 groups, and the style alone (the
# losses figure, where colour means the network) for 9.
_GROUP_STYLES = ('-', '--', ':', '-.', (0, (5, 1, 1, 1, 1, 1)), (0, (10, 3)), (0, (1, 4)), (0, (10, 2, 2, 2)),
                 (0, (3, 1, 1, 1, 1, 1, 1, 1)))


class GroupStyle(NamedTuple):
  """How a (config, method) group is drawn: its colour and its line style (a matplotlib linestyle)."""
  colour: str
  linestyle: Any


def _fixed_network_colour(network: str) -> str | None:
  """The fixed colour of a known network (students, decoders, leader, ...), or None."""
  if network in NETWORK_COLOURS:
    return NETWORK_COLOURS[network]
  kind, _, number = network.rpartition('_')
  if number.isdigit() and kind in ('student', 'decoder'):
    colours = _STUDENT_COLOURS if kind == 'student' else _DECODER_COLOURS
    return colours[int(number) % len(colours)]
  return None


def network_colours(networks: Iterable[str]) -> dict[str, str]:
  """A distinct colour for each network: the fixed one of a known network, else (or if taken) a spare colour.

  Called with every network of the runs, so a network has the same colour in every figure of one call.
  """
  names = sorted(set(networks), key=studies.network_sort_key)
  fixed = {n: _fixed_network_colour(n) for n in names}
  spare = [c for c in _SPARE_NETWORK_COLOURS if c not in fixed.values()]
  colours: dict[str, str] = {}
  for index, name in enumerate(names):
    colour = fixed[name]
    if colour is None or colour in colours.values():  # student_8 would repeat student_0's colour.
      colour = spare.pop(0) if spare else _SPARE_NETWORK_COLOURS[index % len(_SPARE_NETWORK_COLOURS)]
    colours[name] = colour
  return colours


def network_colour(network: str) -> str:
  """The colour of a known network (a fixed one); see `network_colours` for sets that hold other networks."""
  return network_colours([network])[network]


def _run_network_colours(runs: Sequence[studies.RunResult]) -> dict[str, str]:
  """`network_colours` of every network any of the runs evaluates or logs a loss of, plus 'loss' (loss/total)."""
  return network_colours({n for r in runs for n in studies.network_names(r.records)} | {'loss'})


def group_styles(labels: Sequence[str]) -> dict[str, GroupStyle]:
  """A distinct (colour, line style) for each group label, in order; line styles alone are distinct for 9 groups.

  A registered method keeps its colour (`METHOD_COLOURS`, also as `config/method`) unless an earlier group took it.
  """
  styles: dict[str, GroupStyle] = {}
  for index, label in enumerate(dict.fromkeys(labels)):
    linestyle = _GROUP_STYLES[index % len(_GROUP_STYLES)]
    used_colours = {s.colour for s in styles.values()}
    preferred = METHOD_COLOURS.get(label.rpartition('/')[2])
    candidates = ([preferred] if preferred and preferred not in used_colours else []) + [
        c for c in _GROUP_COLOURS if c not in used_colours] + list(_GROUP_COLOURS)
    colour = next((c for c in candidates if GroupStyle(c, linestyle) not in styles.values()), candidates[0])
    styles[label] = GroupStyle(colour, linestyle)
  return styles


def read_run(path: str) -> list[dict]:
  """The records of one run (a workdir or a metrics.jsonl file)."""
  from ffsd_jax import metric_writers  # pylint: disable=g-import-not-at-top
  return metric_writers.read_metrics(path)


def group_runs(runs: Sequence[studies.RunResult]) -> dict[str, list[studies.RunResult]]:
  """{label: runs}: the label is the method, or `config/method` when the runs come from several configs."""
  several_configs = len({r.config for r in runs}) > 1
  groups: dict[str, list[studies.RunResult]] = {}
  for run in runs:
    groups.setdefault(f'{run.config}/{run.method}' if several_configs else run.method, []).append(run)
  return groups


def _legend_outside(fig, handles: Sequence[Any], labels: Sequence[str]) -> None:
  """One legend to the right of all panels (saved with bbox_inches='tight', so it never covers data)."""
  if handles:
    fig.legend(handles, labels, loc='upper left', bbox_to_anchor=(1.0, 0.98), fontsize='small', frameon=False)


def _panels(count: int, cols: int = 3):
  cols = max(1, min(cols, count))
  rows = max(1, -(-count // cols))
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
  for ax in axes.ravel()[count:]:
    ax.axis('off')
  if not count:
    fig.text(0.5, 0.5, 'nothing to draw yet (no such records)', ha='center')  # A run that has not logged yet.
  return fig, axes.ravel()[:count]


def _save(fig, out: str) -> str:
  fig.tight_layout()
  fig.savefig(out, dpi=100, bbox_inches='tight')
  plt.close(fig)
  return out


def _draw_band(ax, band: studies.Band, colour: str, label: str, style: Any = '-', fill: bool = True):
  marker = '.' if len(band.x) <= 30 else None  # Dots only where there are few points (short runs).
  (line,) = ax.plot(band.x, band.mean, linestyle=style, color=colour, lw=1.6, label=label, marker=marker)
  if fill and np.any(band.high > band.low):
    ax.fill_between(band.x, band.low, band.high, color=colour, alpha=0.2, lw=0)
  return line


def evaluated_seeds(members: Sequence[studies.RunResult]) -> int:
  """How many of the runs have at least one evaluation of their tracked network (the seeds a curve averages)."""
  return sum(len(studies.curve(r.records, f'eval/top1/{r.network}')[0]) > 0 for r in members)


def headline_label(method: str, members: Sequence[studies.RunResult]) -> str:
  """The legend entry of a method: its tracked network(s) and the number of seeds the curve averages.

  A seed stopped before its first evaluation draws nothing, so it is not counted; it is named as not evaluated yet.
  """
  networks = '/'.join(sorted({r.network for r in members}))
  evaluated = evaluated_seeds(members)
  label = f'{method} ({networks}, {evaluated} seed{"" if evaluated == 1 else "s"}'
  waiting = len(members) - evaluated
  return label + (f'; {waiting} not evaluated yet)' if waiting else ')')


def headline_figure(runs: Sequence[studies.RunResult], out: str) -> dict[str, dict[str, studies.Band]]:
  """Tracked-network test top-1 per method: mean line, min–max band over seeds; returns {config: {method: Band}}."""
  by_config: dict[str, dict[str, list[studies.RunResult]]] = {}
  for run in runs:
    by_config.setdefault(run.config, {}).setdefault(run.method, []).append(run)
  fig, axes = _panels(len(by_config), cols=2)
  plotted: dict[str, dict[str, studies.Band]] = {}
  handles, labels = [], []
  styles = group_styles([r.method for r in runs])
  for ax, (name, groups) in zip(axes, by_config.items()):
    plotted[name] = {}
    for method, members in groups.items():
      band = studies.band([studies.curve(r.records, f'eval/top1/{r.network}') for r in members])
      plotted[name][method] = band
      label = headline_label(method, members)
      line = _draw_band(ax, band, styles[method].colour, label, styles[method].linestyle)
      if label not in labels:
        handles.append(line)
        labels.append(label)
    # Config name and measure on two lines: one line of a long config name runs into the legend beside the panel.
    ax.set(title=f'{name + chr(10) if name else ""}test top-1 (%), mean and min–max over seeds', xlabel='epoch')
    ax.grid(alpha=0.3)
  _legend_outside(fig, handles, labels)
  _save(fig, out)
  return plotted


def networks_figure(runs: Sequence[studies.RunResult], out: str) -> dict[str, dict[str, studies.Band]]:
  """Every network's test top-1 (mean over seeds), one panel per group; returns {group: {network: Band}}."""
  groups = group_runs(runs)
  colours = _run_network_colours(runs)
  fig, axes = _panels(len(groups))
  plotted: dict[str, dict[str, studies.Band]] = {}
  legend: dict[str, Any] = {}
  for ax, (label, members) in zip(axes, groups.items()):
    networks = sorted({k[len('eval/top1/'):] for r in members for rec in r.records for k in rec
                       if k.startswith('eval/top1/')}, key=studies.network_sort_key)
    plotted[label] = {}
    for network in networks:
      band = studies.band([studies.curve(r.records, f'eval/top1/{network}') for r in members])
      plotted[label][network] = band
      legend.setdefault(network, _draw_band(ax, band, colours[network], network, fill=False))
    evaluated = evaluated_seeds(members)
    ax.set(title=f'{label}: test top-1 (%), mean over {evaluated} evaluated seed{"" if evaluated == 1 else "s"}',
           xlabel='epoch')
    ax.grid(alpha=0.3)
  names = sorted(legend, key=studies.network_sort_key)
  _legend_outside(fig, [legend[n] for n in names], names)
  _save(fig, out)
  return plotted


def losses_figure(runs: Sequence[studies.RunResult], out: str) -> dict[str, dict[tuple[str, str], studies.Band]]:
  """One panel per loss term; colour = network, line style = group; returns {term: {(group, network): Band}}."""
  groups = group_runs(runs)
  colours, styles = _run_network_colours(runs), group_styles(list(groups))
  terms: dict[str, set[str]] = {}
  for members in groups.values():
    for run in members:
      for term, networks in studies.loss_terms(run.records).items():
        terms.setdefault(term, set()).update(networks)
  fig, axes = _panels(len(terms))
  plotted: dict[str, dict[tuple[str, str], studies.Band]] = {}
  for ax, (term, networks) in zip(axes, terms.items()):
    plotted[term] = {}
    for label, members in groups.items():
      for network in sorted(networks, key=studies.network_sort_key):
        key = 'loss/total' if term == 'total' else f'{network}/{term}'
        curves = [c for c in (studies.curve(r.records, key) for r in members) if len(c[0])]
        if curves:
          band = studies.band(curves)
          plotted[term][(label, network)] = band
          _draw_band(ax, band, colours[network], f'{label}: {network}', styles[label].linestyle, fill=False)
    ax.set(title='loss/total' if term == 'total' else f'<network>/{term}', xlabel='epoch')
    ax.grid(alpha=0.3)
  networks = sorted({n for names in terms.values() for n in names}, key=studies.network_sort_key)
  handles = [Line2D([], [], color=colours[n]) for n in networks]
  labels = list(networks)
  if len(groups) > 1:
    handles += [Line2D([], [], color='k', linestyle=styles[label].linestyle) for label in groups]
    labels += list(groups)
  _legend_outside(fig, handles, labels)
  _save(fig, out)
  return plotted


_SCHEDULE_PANELS = (('learning_rate/networks', 'learning rate: students, leader, fusion (SGD)', True),
                    ('learning_rate/decoders', 'learning rate: decoders (Adam)', True),
                    ('lambda_scale', 'λ warm-up factor (scales λ_div, λ_f, λ_sd; ffsd)', False))


def schedules_figure(runs: Sequence[studies.RunResult], out: str, config: Any = None
                     ) -> dict[str, dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]]:
  """Learning rates and λ warm-up per group: the exact schedule from the config as a line, the logged values as dots.

  The logged `learning_rate/*` and `lambda_scale` are means over a logging window, so a window across a step of the
  schedule logs a value between the two (0.055 where the rate drops from 0.1 to 0.01): the dots are labelled
  'logged window mean' and the line, evaluated step by step, is the schedule.

  Args:
    runs: the runs; each group's first run gives the config (its config.json, else `config`), steps per epoch and
      total steps.
    out: the PNG path.
    config: a config (ConfigDict or dict) for runs without config.json; None draws only the logged values.

  Returns:
    {key: {group: {'config': (epochs, values) or absent, 'logged': (epochs, values)}}}.
  """
  groups = group_runs(runs)
  fig, axes = _panels(len(_SCHEDULE_PANELS))
  plotted: dict[str, dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]] = {k: {} for k, _, _ in _SCHEDULE_PANELS}
  handles, labels = [], []
  styles = group_styles(list(groups))
  for label, members in groups.items():
    run = members[0]
    colour, linestyle = styles[label]
    run_config = run.config_values if run.config_values is not None else config
    spe = studies.steps_per_epoch(run.records)
    total = run.total_steps
    if total is None and run_config is not None and spe:
      max_steps, num_epochs = int(run_config.get('max_steps', -1)), int(run_config.get('num_epochs', 0))
      total = max_steps if max_steps > 0 else num_epochs * spe
    computed = {}
    if run_config is not None and spe and total:
      try:
        computed = studies.schedule_curves(run_config, spe, total)
      except (AttributeError, KeyError, TypeError, ValueError) as error:
        # A config.json of another version (a key missing or renamed): the logged values are still drawn.
        print(f'{label}: schedules not computed from the config ({type(error).__name__}: {error})', file=sys.stderr)
    for ax, (key, title, log_scale) in zip(axes, _SCHEDULE_PANELS):
      plotted[key][label] = {}
      if key in computed:
        plotted[key][label]['config'] = computed[key]
        # steps-pre: the value at x = (c + 1) / spe holds over step c, i.e. for epochs in (c / spe, x].
        (line,) = ax.plot(*computed[key], color=colour, linestyle=linestyle, lw=1.4, label=label,
                          drawstyle='steps-pre')
        if label not in labels:
          handles.append(line)
          labels.append(label)
      logged = studies.curve(run.records, key)
      if len(logged[0]):
        plotted[key][label]['logged'] = logged
        dots_label = f'{label} (logged window mean)'
        dots = ax.plot(*logged, 'o', color=colour, mfc='none', ms=4, lw=0, label=dots_label)[0]
        if dots_label not in labels:
          handles.append(dots)
          labels.append(dots_label)
      ax.set(title=title, xlabel='epoch', yscale='log' if log_scale and ax.has_data() else 'linear')
      ax.grid(alpha=0.3)
  _legend_outside(fig, handles, labels)
  _save(fig, out)
  return plotted


def keys_figure(runs: Sequence[studies.RunResult], patterns: Sequence[str], out: str
                ) -> dict[str, dict[str, studies.Band]]:
  """One panel per metrics key matching any fnmatch pattern: mean and min–max band per group; {key: {group: Band}}.

  Raises:
    StudyError: no key matches.
  """
  all_keys = sorted({k for r in runs for rec in r.records for k in rec if k not in ('step', 'epoch', 'time')})
  keys = [k for k in all_keys if any(fnmatch.fnmatchcase(k, p) for p in patterns)]
  if not keys:
    raise studies.StudyError(f'No metrics key matches {", ".join(patterns)}; choose --keys from: '
                             f'{", ".join(all_keys)}.')
  groups = group_runs(runs)
  fig, axes = _panels(len(keys))
  plotted: dict[str, dict[str, studies.Band]] = {}
  handles: dict[str, Any] = {}
  styles = group_styles(list(groups))
  for ax, key in zip(axes, keys):
    plotted[key] = {}
    for label, members in groups.items():
      curves = [c for c in (studies.curve(r.records, key) for r in members) if len(c[0])]
      if curves:
        plotted[key][label] = studies.band(curves)
        handles.setdefault(label, _draw_band(ax, plotted[key][label], styles[label].colour, label,
                                             styles[label].linestyle))
    ax.set(title=key, xlabel='epoch')
    ax.grid(alpha=0.3)
  _legend_outside(fig, list(handles.values()), list(handles))
  _save(fig, out)
  return plotted


def check_figures(figures: Sequence[str], keys: Sequence[str]) -> None:
  """Checks the figure names (and that 'keys' has --keys) before anything is drawn.

  Raises:
    StudyError: an unknown figure, or the keys figure without keys.
  """
  unknown = [f for f in figures if f not in FIGURES + ('keys',)]
  if unknown:
    raise studies.StudyError(f'Unknown figure {", ".join(map(repr, unknown))}; choose --figures from '
                             f'{",".join(FIGURES + ("keys",))}.')
  if 'keys' in figures and not keys:
    raise studies.StudyError("The keys figure needs --keys (comma-separated keys or patterns, e.g. 'leader/*').")


def plot(runs: Sequence[studies.RunResult], out: str, figures: Sequence[str] = FIGURES,
         keys: Sequence[str] = (), config: Any = None) -> dict[str, str]:
  """Writes the chosen figures to `<out>_<figure>.png` (`out` without .png); returns {figure: path}.

  Raises:
    StudyError: an unknown figure, the keys figure without keys, or keys that match nothing.
  """
  check_figures(figures, keys)
  out = out[:-len('.png')] if out.endswith('.png') else out
  if os.path.dirname(out):
    os.makedirs(os.path.dirname(out), exist_ok=True)
  draw = {'headline': headline_figure, 'networks': networks_figure, 'losses': losses_figure,
          'schedules': lambda r, path: schedules_figure(r, path, config),
          'keys': lambda r, path: keys_figure(r, keys, path)}
  paths = {}
  for figure in figures:
    paths[figure] = f'{out}_{figure}.png'
    draw[figure](runs, paths[figure])
  return paths


def main(argv: list[str] | None = None) -> int:
  """Draws the figures and prints their paths; returns the exit status (a user error exits with one line)."""
  parser = studies.ArgumentParser(prog=os.path.basename(__file__), description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('paths', nargs='+', help='study roots or workdirs; label=path sets the method (group) label')
  parser.add_argument('--out', default='metrics', help='output prefix: writes <out>_<figure>.png')
  parser.add_argument('--figures', help=f'comma-separated, from {",".join(FIGURES + ("keys",))}')
  parser.add_argument('--keys', default='', help="comma-separated metrics keys or patterns (e.g. 'leader/*')")
  parser.add_argument('--config', help='config file for the schedules of runs without WORKDIR/config.json')
  parser.add_argument('--verbosity', type=int, default=0, help='1: show the traceback of an error too')
  args = parser.parse_args(argv)
  keys = [k for k in args.keys.split(',') if k]
  figures = [f for f in args.figures.split(',') if f] if args.figures else (['keys'] if keys else list(FIGURES))
  if keys and 'keys' not in figures:
    figures.append('keys')
  with errors.report_errors(verbose=args.verbosity >= 1):
    check_figures(figures, keys)
    config = studies.load_config_file(args.config, REPO_ROOT) if args.config else None
    paths = plot(studies.collect_runs(args.paths), args.out, figures, keys, config)
  for path in paths.values():
    print(path)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
