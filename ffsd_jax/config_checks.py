"""Config checks: values validated before anything is compiled or written, and config changes on resume.

- `validate_config(config)` rejects every value the code cannot use (a zero interval, a non-positive temperature, an
  unknown method, a NaN, ...) with one line per problem that names the key, the value, the allowed range and the fix.
- `parse_flags(argv)` is main.py's absl flags parser: it parses the flags, turns the errors that `config_flags` raises
  (unknown `--config.KEY`, missing config file) into one line each, validates the config, and exits with status 2.
- `config_changes` / `check_resume_config` / `record_config_changes` compare the config saved in a checkpoint with the
  current one: keys that change the optimisation (`OPTIMISATION_KEYS`, and any unclassified key) need
  `--config.allow_config_change=True`; accepted changes are appended to `WORKDIR/config_changes.jsonl`.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import numbers
import os
import re
import sys
import time
import traceback
from typing import Any, Iterable, Mapping, NoReturn, Sequence

from absl import flags
import ml_collections

from ffsd_jax import errors
from ffsd_jax import methods
from ffsd_jax import models
from ffsd_jax.data import normalization
from ffsd_jax.data import sources
from ffsd_jax.train_state import COMPUTE_DTYPES
from ffsd_jax.train_state import LR_SCHEDULES

CONFIG_CHANGES_FILE = 'config_changes.jsonl'
# Exit status of main.py for a bad command line or config, apart from a run that fails (1).
USAGE_EXIT_CODE = 2

# Keys that may change on resume without changing what is trained: intervals, retention, run length, where the data
# and caches live, worker and runtime settings.
FREE_KEYS = frozenset({
    'log_every_steps', 'eval_every_epochs', 'checkpoint_every_steps', 'keep_checkpoints',
    # Extending a run: the lr boundaries are absolute epochs, not fractions of the run (under lr_schedule='cosine',
    # which anneals over num_epochs, config_changes counts num_epochs as an optimisation change).
    'num_epochs', 'max_steps',
    'data_dir', 'image_folder', 'data_cache_dir', 'num_data_workers',
    'distributed', 'cpu_library_fusions', 'allow_config_change',
    'network_parallelism',  # The mesh shape: the same training; checkpoints hold each network (docs/architecture.md).
    'eval_batch_size',  # Eval-mode networks see each example independently of the batch it is in.
    'eval_top5',  # Read with config.get: adds top-5 metrics only.
    'skip_bad_images',  # Turning it on is how a run that stopped on a corrupt image continues.
    'jax_cache_dir',  # Where compiled executables are cached; they do not change what is computed.
    'init_leader_from', 'init_students_from_leader',  # Read on a fresh start only; a resume ignores them.
})
# Keys that change the optimisation (or what the best checkpoint is measured on): a resume with other values would
# silently be another run, so it needs --config.allow_config_change=True. Unclassified keys are treated like these.
OPTIMISATION_KEYS = frozenset({
    'learning_rate', 'decoder_learning_rate', 'lr_schedule', 'lr_boundaries', 'lr_decay', 'momentum',
    'weight_decay', 'fusion_weight_decay', 'decoder_weight_decay',
    'temperature', 'lambda_diversity', 'lambda_fusion', 'lambda_self_distillation', 'lambda_warmup_epochs',
    'compute_dtype', 'batch_norm_statistics', 'normalization', 'image_size', 'eval_resize_size',
    'synthetic_num_eval_examples',
    'validation_examples_per_class',  # Changes the training set and what the best checkpoint is selected on.
    'batch_images_per_class',  # Changes which examples every batch holds.
    'kdcl_teacher', 'kdcl_kl_weight', 'kdcl_temperature', 'one_temperature', 'one_rampup_epochs',
    'pcl_temperature', 'pcl_ema_decay', 'pcl_rampup_epochs',
    'okddip_temperature', 'okddip_kl_weight', 'okddip_rampup_epochs',
    'mcl_contrast_temperature', 'mcl_temperature', 'mcl_vcl_weight', 'mcl_soft_vcl_weight', 'mcl_icl_weight',
    'mcl_soft_icl_weight',
})
# Keys whose change is refused elsewhere, with its own message: the architecture (checkpointing.ARCHITECTURE_KEYS,
# checked before any restore) and what the data iterator's state records (dataset name, global batch size, seed,
# number of training examples; only the last one yields to allow_config_change, in the data iterator).
CHECKED_ELSEWHERE_KEYS = frozenset({
    'model', 'method', 'num_students', 'num_classes', 'one_shared_stages', 'pcl_shared_stages',
    'okddip_shared_stages', 'mcl_shared_stages', 'mcl_embedding_dim',
    'dataset', 'tfds_name', 'batch_size', 'seed', 'synthetic_num_train_examples',
})
FREE, OPTIMISATION, CHECKED_ELSEWHERE = 'free', 'optimisation', 'checked_elsewhere'
# Keys the code gained after runs may have been checkpointed, with the value that computes what the code did before
# they existed: a resume after an upgrade that finds one added at that value changes nothing.
NEUTRAL_WHEN_ADDED = {'validation_examples_per_class': 0, 'batch_images_per_class': 0,
                      'batch_norm_statistics': 'global', 'network_parallelism': 1}


class ConfigError(errors.UserError, ValueError):
  """A config that cannot run; the message has one line per problem."""

  exit_code = errors.EXIT_USAGE


class ConfigChangeError(ConfigError):
  """A resume whose config changes the optimisation of the checkpointed run."""


# ----------------------------------------------------------------------------------------------------------------------
# Validation.

# key: (minimum, fix). Integer keys read with `config.KEY` (required).
_MIN_INTS = {
    'log_every_steps': (1, 'set --config.log_every_steps=50'),
    'checkpoint_every_steps': (1, 'set --config.checkpoint_every_steps=1000'),
    'eval_every_epochs': (1, 'set --config.eval_every_epochs=1'),
    'keep_checkpoints': (1, 'set --config.keep_checkpoints=2'),
    'batch_size': (1, 'set --config.batch_size=128'),
    'eval_batch_size': (1, 'set --config.eval_batch_size=128'),
    'lambda_warmup_epochs': (0, 'set --config.lambda_warmup_epochs=5 (0 turns the warm-up off)'),
}
# The class counts of the TFDS datasets, for the suggested fix.
_NUM_CLASSES = {'cifar100': 100, 'cifar10': 10, 'imagenet2012': 1000}
# Integer keys read with `config.get` (optional: None or absent means the code's default).
_OPTIONAL_MIN_INTS = {
    'seed': (0, 'set --config.seed=0'),
    'network_parallelism': (1, 'set --config.network_parallelism=1 (every network on every device)'),
    'num_data_workers': (-1, 'set --config.num_data_workers=-1 (the host\'s spare cores) or 0 (the main process)'),
    'synthetic_num_train_examples': (1, 'set --config.synthetic_num_train_examples=50000'),
    'synthetic_num_eval_examples': (1, 'set --config.synthetic_num_eval_examples=10000'),
    'validation_examples_per_class': (0, 'set --config.validation_examples_per_class=0 (no validation split)'),
    'batch_images_per_class': (0, 'set --config.batch_images_per_class=0 (shuffled epochs)'),
}
# key: (strictly positive?, fix). Float keys; NaN and inf are always rejected.
_FLOATS = {
    'learning_rate': (True, 'set --config.learning_rate=0.1'),
    'decoder_learning_rate': (True, 'set --config.decoder_learning_rate=0.001'),
    'lr_decay': (True, 'set --config.lr_decay=0.1'),
    'temperature': (True, 'set --config.temperature=2.0'),
    'weight_decay': (False, 'set --config.weight_decay=0.0001 (0 turns it off)'),
    'fusion_weight_decay': (False, 'set --config.fusion_weight_decay=0.00001 (0 turns it off)'),
    'decoder_weight_decay': (False, 'set --config.decoder_weight_decay=0.0001 (0 turns it off)'),
}
_BOOLS = ('distributed', 'cpu_library_fusions', 'allow_config_change', 'skip_bad_images', 'init_students_from_leader')


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _line(key: str, value: Any, requirement: str, fix: str) -> str:
  return f'config.{key}={value!r}: must be {requirement}; {fix}'


def _choice(problems: list[str], config: Any, key: str, choices: Sequence[str], *,
            optional: bool = False) -> bool:
  """Appends a problem unless config[key] is one of `choices`; returns whether it is."""
  value = config.get(key)
  if optional and value is None:
    return True
  if value in choices:
    return True
  problems.append(_line(key, value, f'one of {", ".join(choices)}' + (' or None' if optional else ''),
                        f'set --config.{key}={nearest_choice(value, choices)}'))
  return False


def nearest_choice(value: Any, choices: Sequence[str]) -> str:
  """The valid choice closest to `value` in spelling (e.g. resnet19 -> resnet18), else the first one."""
  close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
  return close[0] if close else str(choices[0])


def config_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every problem of `config`, one line each (empty when it can run); see `validate_config`."""
  problems: list[str] = []

  def check_int(key: str, minimum: int, fix: str, optional: bool = False) -> bool:
    value = config.get(key)
    if optional and value is None:
      return True
    if _is_int(value) and value >= minimum:
      return True
    problems.append(_line(key, value, f'an integer >= {minimum}', fix))
    return False

  for key, (minimum, fix) in _MIN_INTS.items():
    check_int(key, minimum, fix)
  for key, (minimum, fix) in _OPTIONAL_MIN_INTS.items():
    check_int(key, minimum, fix, optional=True)

  # Run length: max_steps > 0 replaces num_epochs (train_loop: total_steps = max_steps or num_epochs · steps/epoch).
  max_steps = config.get('max_steps')
  if not (_is_int(max_steps) and (max_steps == -1 or max_steps >= 1)):
    problems.append(_line('max_steps', max_steps, '-1 (train num_epochs) or an integer >= 1',
                          'set --config.max_steps=-1'))
  elif max_steps > 0:
    check_int('num_epochs', 0, 'set --config.num_epochs=299')
  else:
    check_int('num_epochs', 1, 'set --config.num_epochs=299, or --config.max_steps to a number of steps')

  for key, (positive, fix) in _FLOATS.items():
    value = config.get(key)
    if not (_is_finite_number(value) and (value > 0 if positive else value >= 0)):
      problems.append(_line(key, value, 'a finite number ' + ('> 0' if positive else '>= 0'), fix))
  for key in sorted(k for k in config.keys() if k.startswith('lambda_') and k != 'lambda_warmup_epochs'):
    value = config.get(key)
    if not (_is_finite_number(value) and value >= 0):
      problems.append(_line(key, value, 'a finite number >= 0', f'set --config.{key}=0 to turn the term off'))
  momentum = config.get('momentum')
  if not (_is_finite_number(momentum) and 0 <= momentum < 1):
    problems.append(_line('momentum', momentum, 'a number in [0, 1)', 'set --config.momentum=0.9'))

  boundaries = config.get('lr_boundaries')
  if not (isinstance(boundaries, (tuple, list)) and all(_is_int(b) and b >= 1 for b in boundaries) and
          all(a < b for a, b in zip(boundaries, boundaries[1:]))):
    problems.append(_line('lr_boundaries', boundaries, 'strictly increasing epochs >= 1 (or empty)',
                          "set --config.lr_boundaries='(150, 225)'"))

  method_ok = _choice(problems, config, 'method', methods.method_names())
  _choice(problems, config, 'compute_dtype', COMPUTE_DTYPES)
  _choice(problems, config, 'lr_schedule', LR_SCHEDULES)
  _choice(problems, config, 'dataset', sources.ALL_DATASETS)
  _choice(problems, config, 'normalization', sorted(normalization.MEAN_STD), optional=True)
  _choice(problems, config, 'batch_norm_statistics', BATCH_NORM_STATISTICS, optional=True)

  if method_ok:
    method = methods.method_class(config.get('method'))
    minimum = method.min_students
    check_int('num_students', minimum, f'set --config.num_students=2 (method {config.get("method")!r} needs '
              f'>= {minimum})')
    problems.extend(method(config).check_config())
    problems.extend(network_parallelism_problems(config, method(config)))

  classes = _NUM_CLASSES.get(config.get('dataset'))
  if config.get('num_classes') != 0 or config.get('dataset') == 'synthetic':  # 0: the dataset's own count.
    check_int('num_classes', 2, f'set --config.num_classes={classes or 0} (0 takes the dataset\'s count)')
  image_size = config.get('image_size')
  model = config.get('model')
  try:
    spec = models.get_spec(model)
  except ValueError:
    spec = None
    problems.append(_line('model', model, f'one of {", ".join(models.BACKBONES)} (or an alias)',
                          f'set --config.model={nearest_choice(model, models.BACKBONES)}'))
  image_size_ok = check_int('image_size', 1, f'set --config.image_size={spec.input_size if spec else 32}')
  if image_size_ok and spec is not None:
    # The networks' own input-size rule (FFSDModel checks it only when first called, inside compilation).
    try:
      spec.check_input_size(image_size, image_size)
    except ValueError as error:
      problems.append(f'config.image_size={image_size!r}: {error} Set --config.image_size={spec.input_size}.')
  resize = config.get('eval_resize_size')
  if resize is not None and _is_int(image_size) and not (_is_int(resize) and resize >= image_size):
    problems.append(_line('eval_resize_size', resize, f'None or an integer >= image_size ({image_size}): the eval '
                          'images are resized to it, then centre-cropped to image_size',
                          f'set --config.eval_resize_size={round(image_size * 256 / 224)} or leave it unset (None: '
                          'image_size·256/224)'))

  for key in _BOOLS:
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
      problems.append(_line(key, value, 'True or False', f'set --config.{key}=False'))
  return problems


BATCH_NORM_STATISTICS = ('global', 'device')


def network_parallelism_problems(config: ml_collections.ConfigDict, method: methods.Method) -> list[str]:
  """[] when `network_parallelism` and `batch_norm_statistics` fit the method's networks, else one line each saying
  why, with the valid values."""
  size = config.get('network_parallelism', 1)
  names = method.stacked_networks()
  problems = []
  if config.get('batch_norm_statistics') == 'device' and not names:
    problems.append(f"config.batch_norm_statistics='device': method {method.name!r} cannot run its networks in the "
                    f"networks-parallel step that computes them ({method.network_parallel_refusal}); set "
                    "--config.batch_norm_statistics=global.")
  if not _is_int(size) or size <= 1:
    return problems  # < 1 and non-integers are reported with the other integer keys.
  if not names:
    problems.append(f'config.network_parallelism={size}: method {method.name!r} cannot split its networks over '
                    f'devices ({method.network_parallel_refusal}); set --config.network_parallelism=1.')
  elif len(names) % size:
    valid = ', '.join(str(d) for d in range(1, len(names) + 1) if len(names) % d == 0)
    problems.append(f'config.network_parallelism={size}: must divide the {len(names)} networks of method '
                    f'{method.name!r} ({", ".join(names)}); valid values: {valid}.')
  return problems


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every value the training, evaluation and export code reads, before anything is compiled or written.

  Raises:
    ConfigError: one line per problem, e.g.
      "config.log_every_steps=0: must be an integer >= 1; set --config.log_every_steps=50".
  """
  problems = config_problems(config)
  if problems:
    raise ConfigError('\n'.join(problems))


# ----------------------------------------------------------------------------------------------------------------------
# The command line (main.py).


def _fail(message: str) -> NoReturn:
  sys.stderr.write(message.rstrip('\n') + '\n')
  sys.exit(USAGE_EXIT_CODE)


def _one_line(text: str) -> str:
  return ' '.join(str(text).split())


def flag_value(argv: Sequence[str], name: str) -> str | None:
  """The value of --NAME in argv (the last one wins, as in absl), or None."""
  value = None
  for i, arg in enumerate(argv):
    match = re.match(rf'^-{{1,2}}{re.escape(name)}(=(.*))?$', arg)
    if match and match.group(1) is not None:
      value = match.group(2)
    elif match and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _override_paths(argv: Sequence[str], name: str) -> list[str]:
  """The KEY paths of every --NAME.KEY[=VALUE] / --noNAME.KEY in argv (config_flags' own pattern)."""
  pattern = re.compile(rf'^-{{1,2}}(no)?{re.escape(name)}\.')
  return [arg.split('=', 1)[0].split('.', 1)[1] for arg in argv if pattern.match(arg)]


def _display_path(path: str) -> str:
  relative = os.path.relpath(path)
  return path if relative.startswith('..') else relative


def _describe_load_error(error: BaseException) -> str:
  """'Type: message (file:line)', the line being the innermost frame outside this module and installed packages."""
  if isinstance(error, SyntaxError) and error.filename:
    return f'{type(error).__name__}: {error.msg} ({_display_path(error.filename)}:{error.lineno})'
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if f.filename != __file__ and 'site-packages' not in f.filename and not f.filename.startswith('<')]
  location = f' ({_display_path(frames[-1].filename)}:{frames[-1].lineno})' if frames else ''
  return f'{type(error).__name__}: {_one_line(error)}{location}'


def _load_config_file(path: str) -> Any:
  """`get_config(*args)` of the config file in `path` ('file.py' or 'file.py:args'), as config_flags calls it."""
  filename, *args = path.split(':', 1)
  spec = importlib.util.spec_from_file_location('ffsd_config_check', filename)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def _unknown_key(config: ml_collections.ConfigDict, key_path: str, filename: str) -> str | None:
  """A one-line message when `key_path` (e.g. 'foo' or 'a.b') is not a key of `config`, else None."""
  node, walked = config, []
  for part in key_path.split('.'):
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
      return f'Config key {".".join(walked)!r} of {filename} is a value, not a group: no --config.{key_path}.'
    if part not in node:
      keys = sorted(node.keys())
      prefix = '.'.join(walked + [''])
      close = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
      hint = (f'did you mean {" or ".join(repr(prefix + k) for k in close)}?' if close else
              f'valid keys: {", ".join(prefix + k for k in keys)}')
      return f'Unknown config key {key_path!r} in {filename} ({hint})'
    node, walked = node[part], walked + [part]
  return None


def _describe_flags_failure(argv: Sequence[str], name: str, error: BaseException | None) -> str:
  """One line saying why the flags (or the config file behind --NAME) cannot be used."""
  try:
    argv = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)
  except Exception:  # pylint: disable=broad-except
    pass  # A bad --flagfile: absl's own error (below) names it.
  path = flag_value(argv, name)
  if path is not None:
    filename = path.split(':', 1)[0]
    if not filename or not os.path.exists(filename):
      return f'Config file {filename or "(empty path)"} not found (--{name}={path}).'
    if not os.path.isfile(filename):
      return f'Config file {filename} is not a file (--{name}={path}).'
    try:
      config = _load_config_file(path)
    except Exception as load_error:  # pylint: disable=broad-except
      return f'Config file {filename} failed to load: {_describe_load_error(load_error)}'
    if not isinstance(config, ml_collections.ConfigDict):
      return f'Config file {filename}: get_config() returned {type(config).__name__}, not an ml_collections.ConfigDict.'
    for key_path in _override_paths(argv, name):
      message = _unknown_key(config, key_path, filename)
      if message:
        return message
  if error is None:
    return f'The config of --{name} could not be loaded.'
  if isinstance(error, flags.Error):
    return f'Flags parsing error: {_one_line(error)}'
  return f'Flags parsing error: {type(error).__name__}: {_one_line(error)}'


def parse_flags(argv: Sequence[str], config_flag: str = 'config') -> list[str]:
  """absl flags parser for `app.run(main, flags_parser=parse_flags)`: parses, loads and validates the config.

  Every error (a bad flag, an unknown --config.KEY, a missing or broken config file, an invalid config value) is
  written to stderr as one line (one per problem for invalid values), without a traceback, and the process exits with
  status 2 before main() runs: nothing is compiled and no workdir is created.

  Returns:
    The arguments left after the flags (absl's FLAGS(argv)).
  """
  try:
    remaining = flags.FLAGS(list(argv))
  except Exception as error:  # pylint: disable=broad-except
    # config_flags lets AttributeError/KeyError (unknown key) and OSError (missing file) escape, beside flags.Error.
    _fail(_describe_flags_failure(argv, config_flag, error))
  config = flags.FLAGS[config_flag].value
  if not isinstance(config, ml_collections.ConfigDict):
    # A missing file without overrides parses: config_flags defers the error to the first attribute access.
    _fail(_describe_flags_failure(argv, config_flag, None))
  try:
    validate_config(config)
  except ConfigError as error:
    _fail(str(error))
  return remaining


# ----------------------------------------------------------------------------------------------------------------------
# Config changes on resume.


def key_kind(key: str) -> str:
  """FREE, OPTIMISATION or CHECKED_ELSEWHERE for a (possibly dotted) key; unclassified keys are OPTIMISATION."""
  for candidate in (key, key.split('.', 1)[0]):
    if candidate in FREE_KEYS:
      return FREE
    if candidate in CHECKED_ELSEWHERE_KEYS:
      return CHECKED_ELSEWHERE
  return OPTIMISATION


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = _json_form(value)
  return flat


def _json_form(value: Any) -> Any:
  # The saved config went through JSON (tuples became lists); compare the current one in the same form.
  if isinstance(value, (tuple, list)):
    return [_json_form(v) for v in value]
  return value


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Every added, removed or changed key between the saved and the current config (JSON forms), sorted by key.

  Each change is {'key', 'change': 'changed'|'added'|'removed', 'old' (unless added), 'new' (unless removed),
  'kind': FREE|OPTIMISATION|CHECKED_ELSEWHERE}. Nested groups are compared key by key ('group.key').
  """
  old, new = _flatten(saved), _flatten(current)
  method = new.get('method')
  changes = []
  for key in sorted(old.keys() | new.keys()):
    if key in old and key in new:
      if old[key] == new[key] and type(old[key]) is type(new[key]) or _same_number(old[key], new[key]):
        continue
      change = {'key': key, 'change': 'changed', 'old': old[key], 'new': new[key]}
    elif key in new:
      change = {'key': key, 'change': 'added', 'new': new[key]}
    else:
      change = {'key': key, 'change': 'removed', 'old': old[key]}
    change['kind'] = key_kind(key)
    if methods.is_other_methods_key(key, method) and old.get('method') == method:
      change['kind'] = FREE  # Another method's key (e.g. mcl_temperature in an FFSD run) does not enter this run.
    elif change['change'] == 'added' and key in NEUTRAL_WHEN_ADDED and new[key] == NEUTRAL_WHEN_ADDED[key]:
      change['kind'] = FREE
    elif key == 'num_epochs' and 'cosine' in (old.get('lr_schedule'), new.get('lr_schedule')):
      change['kind'] = OPTIMISATION  # The cosine schedule anneals over num_epochs: a longer run changes every lr.
    changes.append(change)
  return changes


def _same_number(a: Any, b: Any) -> bool:
  # 2 and 2.0 are the same setting (a float key set from an int); True and 1 are not.
  numeric = (_is_int(a) or isinstance(a, float)) and (_is_int(b) or isinstance(b, float))
  return numeric and a == b


def format_change(change: Mapping[str, Any]) -> str:
  """'config.learning_rate: 0.1 in the checkpoint, 0.05 now' (or 'absent ...' for an added/removed key)."""
  old = repr(change['old']) if 'old' in change else 'absent'
  new = repr(change['new']) if 'new' in change else 'absent'
  return f'config.{change["key"]}: {old} in the checkpoint, {new} now'


def _total_steps(config: Mapping[str, Any], steps_per_epoch: int) -> int:
  max_steps = config.get('max_steps') or -1
  return max_steps if max_steps > 0 else int(config.get('num_epochs') or 0) * steps_per_epoch


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], allow_change: bool, *,
                        steps_per_epoch: int | None = None, checkpoint_step: int | None = None
                        ) -> list[dict[str, Any]]:
  """The changes between the checkpoint's config and the current one; refuses optimisation changes unless allowed.

  Changes of CHECKED_ELSEWHERE keys are returned but neither refused nor allowed here: the architecture check and the
  data iterator refuse them with their own messages. With `steps_per_epoch` and `checkpoint_step`, a resume that
  would end an unfinished run earlier than it was set to (a forgotten --config.num_epochs) is refused too.

  Raises:
    ConfigChangeError: some OPTIMISATION (or unclassified) key changed, or the run is shortened, and `allow_change`
      is False.
  """
  if steps_per_epoch is not None and checkpoint_step is not None and not allow_change:
    planned, now = _total_steps(saved, steps_per_epoch), _total_steps(current, steps_per_epoch)
    if checkpoint_step < planned and now < planned:
      raise ConfigChangeError(
          f'The checkpointed run (step {checkpoint_step}) was set to train {planned} steps (num_epochs='
          f'{saved.get("num_epochs")}, max_steps={saved.get("max_steps")}), but this config stops at {now} '
          f'(num_epochs={current.get("num_epochs")}, max_steps={current.get("max_steps")}). Pass the same run length '
          'to finish it, or --config.allow_config_change=True to end it earlier.')
  changes = config_changes(saved, current)
  blocking = [c for c in changes if c['kind'] == OPTIMISATION]
  if blocking and not allow_change:
    raise ConfigChangeError(
        'The config changes the optimisation of the checkpointed run: ' +
        '; '.join(format_change(c) for c in blocking) +
        '. Restore these values to continue the same run, or pass --config.allow_config_change=True to resume with '
        f'them (the changes are then recorded in WORKDIR/{CONFIG_CHANGES_FILE}).')
  return changes


def record_config_changes(workdir: str, step: int, changes: Iterable[Mapping[str, Any]]) -> None:
  """Appends {"step", "time", "changes"} as one line to WORKDIR/config_changes.jsonl (nothing when no changes).

  One append-mode write of the whole line, then fsync: a kill leaves at most a torn last line, which the next write
  moves to a line of its own and `read_config_changes` skips.
  """
  changes = [dict(c) for c in changes]
  if not changes:
    return
  line = json.dumps({'step': int(step), 'time': time.time(), 'changes': changes}) + '\n'
  path = os.path.join(workdir, CONFIG_CHANGES_FILE)
  fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b'\n':
      line = '\n' + line  # A torn last line from a killed write: keep it out of this record.
    data = line.encode()
    while data:
      data = data[os.write(fd, data):]
    os.fsync(fd)
  finally:
    os.close(fd)


def read_config_changes(workdir: str) -> list[dict[str, Any]]:
  """The records of WORKDIR/config_changes.jsonl in order ([] when absent); torn lines are skipped."""
  path = os.path.join(workdir, CONFIG_CHANGES_FILE)
  if not os.path.exists(path):
    return []
  records = []
  with open(path, encoding='utf-8', errors='replace') as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict):
        records.append(record)
  return records


# ----------------------------------------------------------------------------------------------------------------------
# The workdir's own config for --mode eval/export.


def saved_config_flag(workdir: str, saved_config_file: str, config_flag: str = 'config') -> str:
  """`--config=<saved_config_file>:WORKDIR`: the config the run in `workdir` trained with (its config.json, read by
  configs/saved.py), so --config.KEY overrides still apply on top; one line and exit status 2 when it has none."""
  saved = os.path.join(workdir, 'config.json')
  if not os.path.isfile(saved):
    _fail(f'{saved} not found, so the config the run trained with is unknown: pass it with --{config_flag} '
          'configs/<name>.py (and the --config.KEY overrides the run used).')
  return f'--{config_flag}={saved_config_file}:{workdir}'


def with_saved_config(argv: Sequence[str], saved_config_file: str, config_flag: str = 'config') -> list[str]:
  """main.py's `argv` with the workdir's own config (`saved_config_flag`) for `--mode eval/export` without --config.

  Training keeps needing --config; so does a workdir without config.json.
  """
  argv = list(argv)
  if flag_value(argv, config_flag) is not None:
    return argv
  mode, workdir = flag_value(argv, 'mode') or 'train', flag_value(argv, 'workdir')
  if mode == 'train' or not workdir:
    _fail(f'--{config_flag} is required: the experiment config file, e.g. --{config_flag} configs/smoke.py.' +
          ('' if mode == 'train' else ' (With --workdir, --mode eval/export read the config the run trained with.)'))
  return argv[:1] + [saved_config_flag(workdir, saved_config_file, config_flag)] + argv[1:]
