"""The documents point only at things that exist.

Section citations: the code, tests and documents cite the method as "docs/method.md §N" (or "§N.M"). These tests fail
when a `.py` or `.md` file of the repository cites a section number that docs/method.md does not have, or when a file
still points at the external working note the citations used to refer to, which is not part of the repository.

Names: they also fail when README.md or docs/*.md names, in backticks (or a fenced block, for paths), a repository
path, a test, a Python module, function, class, member or config key that the repository does not have
(`stale_references`; what each kind of span is checked against is in its docstring).
"""

import ast
import dataclasses
import functools
import glob
import pathlib
import re
import subprocess

import pytest

THIS_FILE = pathlib.Path(__file__).resolve()
REPO_ROOT = THIS_FILE.parents[1]
METHOD = REPO_ROOT / 'docs' / 'method.md'
SECTION_SIGN = '\u00a7'
# The external note's file name, built so that this file does not mention it itself.
EXTERNAL_NOTE = 'ffsd_' + 'reference.md'
_NUMBER = r'\d+(?:\.\d+)*'
# "§6.1", "§ 6", and the upper end of a range such as "§6.1–§6.4" or "§8.1–8.3".
CITATION = re.compile(SECTION_SIGN + rf'\s*({_NUMBER})(?:\s*[–-]\s*{SECTION_SIGN}?\s*({_NUMBER}))?')
HEADING = re.compile(rf'^#+\s*{SECTION_SIGN}({_NUMBER})\b', re.MULTILINE)
SKIPPED_DIRS = {'.git', '.venv', 'venv', 'node_modules', '__pycache__', '.pytest_cache'}


def repository_files() -> list[pathlib.Path]:
  """The `.py` and `.md` files git tracks or would track (untracked but not ignored), else every such file."""
  try:
    listed = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z', '--', '*.py',
                             '*.md'], cwd=REPO_ROOT, capture_output=True, check=True, timeout=60).stdout
    paths = [REPO_ROOT / name for name in listed.decode().split('\0') if name]
  except (OSError, subprocess.SubprocessError):
    paths = [path for path in REPO_ROOT.rglob('*') if path.suffix in ('.py', '.md')
             and not SKIPPED_DIRS.intersection(path.relative_to(REPO_ROOT).parts)]
  return sorted(path for path in paths if path.is_file())


def method_sections() -> set[str]:
  return set(HEADING.findall(METHOD.read_text(encoding='utf-8')))


def test_method_sections_are_numbered_in_order():
  sections = HEADING.findall(METHOD.read_text(encoding='utf-8'))
  assert len(sections) == len(set(sections)), 'a section number is used twice'
  top = [int(s) for s in sections if '.' not in s]
  assert top == list(range(1, len(top) + 1)), f'top-level sections are not §1, §2, ... in order: {top}'
  for section in sections:
    if '.' in section:
      assert section.rsplit('.', 1)[0] in sections, f'{SECTION_SIGN}{section} has no parent section'


def test_every_section_citation_exists():
  sections = method_sections()
  assert sections, f'no numbered section headings found in {METHOD}'
  missing = []
  for path in repository_files():
    text = path.read_text(encoding='utf-8', errors='replace')
    for line_number, line in enumerate(text.splitlines(), start=1):
      for match in CITATION.finditer(line):
        for number in match.groups():
          if number is not None and number not in sections:
            missing.append(f'{path.relative_to(REPO_ROOT)}:{line_number}: {SECTION_SIGN}{number}: {line.strip()}')
  assert not missing, 'citations of sections that docs/method.md does not have:\n' + '\n'.join(missing)


def test_no_file_points_at_the_external_note():
  offenders = [f'{path.relative_to(REPO_ROOT)}:{line_number}: {line.strip()}'
               for path in repository_files()
               for line_number, line in enumerate(path.read_text(encoding='utf-8', errors='replace').splitlines(), 1)
               if EXTERNAL_NOTE in line]
  assert not offenders, f'files that point at {EXTERNAL_NOTE}, which is not in the repository:\n' + '\n'.join(offenders)


@pytest.mark.parametrize('text, expected', [
    (f'docs/method.md {SECTION_SIGN}6.1', [('6.1', None)]),
    (f'{SECTION_SIGN}6.1–{SECTION_SIGN}6.4 and {SECTION_SIGN} 12', [('6.1', '6.4'), ('12', None)]),
    (f'({SECTION_SIGN}12.5-12.7)', [('12.5', '12.7')]),
])
def test_citation_pattern(text, expected):
  assert [match.groups() for match in CITATION.finditer(text)] == expected


# ---------------------------------------------------------------------------------------------------------------------
# Names and paths in README.md and docs/*.md.

MARKDOWN_DOCS = ('README.md', 'docs/*.md')
# Repository paths: under one of these folders, or one of these top-level files. Other paths in the docs are outputs
# (runs/..., WORKDIR/...), data outside the repository or other repositories' files (utils/ramps.py), never checked.
# Braces are expanded: 'configs/x_{a,b}.py'.
REPO_PATH = re.compile(r'(?<![\w./~$<>-])(?:(?:ffsd_jax|scripts|configs|tests|docs)/'
                       r'(?:[^\s`\'"()\[\],;:|{}]|\{[^{}\s`]*\})*'
                       r'|main\.py|pyproject\.toml|requirements[\w-]*\.txt)(?![\w/-])')
# A path right after one of these is written by the command ('--out docs/figures/results_x' is a file-name prefix).
OUTPUT_OPTION = re.compile(r'(?:--(?:out\w*|csv|workdir|root)\s*=?|>)\s*$')
# A placeholder in a path ('<name>.py', '…'): only the folder before it is checked.
PATH_PLACEHOLDER = re.compile(r'<|…|\.\.\.')
# 'tests/test_x.py::test_y', 'test_x.py::TestC::test_y[param]' (the parametrization suffix is not checked).
TEST_REFERENCE = re.compile(r'(?<![\w/.])(?:tests/)?(test_\w+\.py)((?:::\w+)+)(?:\[[^\]`]*\])?')
# A whole span '::test_y' continues the last test file named before it in the same paragraph or table row.
TEST_CHAIN = re.compile(r'::(\w+(?:::\w+)*)(?:\[[^\]]*\])?')
# A whole span that names one Python object: 'a.b.c', optionally called ('f(x, y)') and annotated ('f(x) -> T').
PYTHON_NAME = re.compile(r'(?P<name>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?:\(.*\))?(?:\s*->\s*[\w.]+)?')
PYTHON_IMPORT = re.compile(r'from\s+(?P<module>[\w.]+)\s+import\s+(?P<names>\w+(?:\s*,\s*\w+)*)')
CONFIG_FLAG = re.compile(r'--config\.([a-z_]\w*)')
# 'one.py', 'config.json', 'leader.msgpack' are file names, not attribute chains.
FILE_NAME = re.compile(r'\.(?:py|md|json|jsonl|txt|toml|sh|png|msgpack|pth|safetensors|gz|whl|csv|jax_export)$')
# A bare name that reads as code: an underscore ('lambda_fusion', '_train') or a capital inside a word ('FFSDModel').
CODE_LIKE = re.compile(r'_|[a-z][A-Z]|[A-Z]{2}[a-z]')
# Names of other code bases that the docs quote in backticks; they are in no Python file of this repository.
EXTERNAL_NAMES = frozenset({
    'AvgPool', 'ConvTranspose2d',  # PyTorch.
    'attention_loss', 'densenet_40',  # The official FFSD code (SJLeo/FFSD).
    'ONE_ResNet', 'get_current_consistency_weight',  # The official ONE code.
    'en_fc', 'compute_rampup_weight',  # The public PCL implementation.
    'ynn_fusion', 'transpose_copy_fusion', 'bitcast_broadcast_fusion', 'wrapped_broadcast',  # XLA's fusion kinds.
})
# Base classes that add no member a doc would cite; any other base from outside the repository may add members.
EMPTY_BASES = frozenset({'object', 'ABC', 'NamedTuple', 'Generic', 'Protocol'})
# A code span may wrap onto the next line of its paragraph, never across a blank line.
CODE_SPAN = re.compile(r'(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)', re.DOTALL)
FENCE = re.compile(r'^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$', re.MULTILINE | re.DOTALL)
LINK = re.compile(r'\[[^\]\n]*\]\(([^)\s]+)\)')


@dataclasses.dataclass
class ClassInfo:
  members: set[str]
  bases: list[str]


@dataclasses.dataclass
class CodeIndex:
  """What the docs may name: files, modules and their top-level names, classes, tests, config keys, known names."""
  root: pathlib.Path
  modules: dict[str, set[str]]  # 'ffsd_jax.objective' -> its top-level names (imports included).
  module_classes: dict[str, dict[str, ClassInfo]]
  classes: dict[str, list[ClassInfo]]  # Class name -> every class of that name.
  short_modules: dict[str, list[str]]  # 'objective' -> ['ffsd_jax.objective'].
  tests: dict[str, set[str]]  # 'test_docs.py' -> {'test_x', 'TestC', 'TestC::test_y', ...}.
  config_keys: set[str]
  known_names: set[str]  # Identifiers of the code, words of its (non-docstring) strings and shell scripts.


def _top_level_statements(body):
  for node in body:
    yield node
    if isinstance(node, (ast.If, ast.Try, ast.With)):
      for block in ('body', 'orelse', 'finalbody'):
        yield from _top_level_statements(getattr(node, block, []))
      for handler in getattr(node, 'handlers', []):
        yield from _top_level_statements(handler.body)


def _bound_names(node) -> set[str]:
  """Names a top-level or class-body statement binds."""
  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
    return {node.name}
  if isinstance(node, (ast.Import, ast.ImportFrom)):
    return {alias.asname or alias.name.split('.')[0] for alias in node.names}
  targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
      node, (ast.AnnAssign, ast.AugAssign)) else []
  return {name.id for target in targets for name in ast.walk(target) if isinstance(name, ast.Name)}


def _class_info(node: ast.ClassDef) -> ClassInfo:
  members = set().union(*(_bound_names(item) for item in _top_level_statements(node.body)))
  for item in ast.walk(node):  # Instance attributes: self.x = ... in any method.
    if isinstance(item, ast.Attribute) and isinstance(item.ctx, ast.Store) and isinstance(item.value, ast.Name) \
        and item.value.id == 'self':
      members.add(item.attr)
  bases = [base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else '?'
           for base in node.bases]
  return ClassInfo(members, bases)


def _docstrings(tree) -> set[int]:
  return {id(node.body[0].value) for node in ast.walk(tree)
          if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body
          and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def _code_words(tree) -> set[str]:
  """Every identifier the code binds or uses, and the words of its strings other than docstrings."""
  docstrings, words = _docstrings(tree), set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      words.add(node.name)
    elif isinstance(node, ast.Name):
      words.add(node.id)
    elif isinstance(node, ast.Attribute):
      words.add(node.attr)
    elif isinstance(node, ast.arg):
      words.add(node.arg)
    elif isinstance(node, ast.keyword) and node.arg:
      words.add(node.arg)
    elif isinstance(node, ast.alias):
      words.update(node.name.split('.') + ([node.asname] if node.asname else []))
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
      words.update(re.findall(r'[A-Za-z_]\w*', node.value))
  return words


def build_code_index(root: pathlib.Path) -> CodeIndex:
  """Parses (never imports) every Python file of the repository."""
  index = CodeIndex(root, {}, {}, {}, {}, {}, set(), set())
  for path in repository_files():
    if path.suffix != '.py':
      continue
    relative = path.relative_to(root)
    tree = ast.parse(path.read_text(encoding='utf-8'), filename=str(relative))
    if path != THIS_FILE:  # This file quotes stale names on purpose (the checker's own tests).
      index.known_names |= _code_words(tree)
    if relative.parts[0] == 'tests' and relative.name.startswith('test_') and len(relative.parts) == 2:
      names = index.tests.setdefault(relative.name, set())
      for node in tree.body:
        names |= _bound_names(node)
        if isinstance(node, ast.ClassDef):
          names |= {f'{node.name}::{item.name}' for item in node.body if isinstance(item, ast.FunctionDef)}
    if relative.parts[0] == 'configs':
      index.config_keys |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                            and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name)
                            and node.value.id == 'config'}
    if relative.parts[0] not in ('ffsd_jax', 'scripts', 'configs'):
      continue
    parts = relative.with_suffix('').parts
    module = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
    statements = list(_top_level_statements(tree.body))
    index.modules.setdefault(module, set()).update(*(_bound_names(node) for node in statements))
    classes = {node.name: _class_info(node) for node in statements if isinstance(node, ast.ClassDef)}
    index.module_classes.setdefault(module, {}).update(classes)
    for name, info in classes.items():
      index.classes.setdefault(name, []).append(info)
    if relative.parts[0] != 'configs':  # 'default', 'smoke' are words; configs are named as 'configs.default'.
      index.short_modules.setdefault(module.rsplit('.', 1)[-1], []).append(module)
  for module in list(index.modules):  # A package's submodules are its attributes.
    if '.' in module:
      parent, child = module.rsplit('.', 1)
      index.modules.setdefault(parent, set()).add(child)
  for path in root.glob('scripts/*.sh'):
    index.known_names |= set(re.findall(r'[A-Za-z_]\w*', path.read_text(encoding='utf-8')))
  index.short_modules.pop('ffsd_jax', None)
  return index


@functools.cache
def repository_index() -> CodeIndex:
  return build_code_index(REPO_ROOT)


def _has_member(index: CodeIndex, infos: list[ClassInfo], member: str, seen: frozenset = frozenset()) -> bool:
  """Whether one of the classes, or a base class, defines `member`; a base from outside the repository may."""
  for info in infos:
    if member in info.members:
      return True
    for base in info.bases:
      if base in EMPTY_BASES or base in seen:
        continue
      if base not in index.classes or _has_member(index, index.classes[base], member, seen | {base}):
        return True
  return False


def _module_problem(index: CodeIndex, module: str, rest: list[str]) -> str | None:
  while rest and f'{module}.{rest[0]}' in index.modules:
    module, rest = f'{module}.{rest[0]}', rest[1:]
  if not rest:
    return None
  if rest[0] not in index.modules[module]:
    return f'{module} has no top-level name {rest[0]!r}'
  classes = index.module_classes.get(module, {})
  if len(rest) > 1 and rest[0] in classes and not _has_member(index, [classes[rest[0]]], rest[1]):
    return f'class {module}.{rest[0]} has no member {rest[1]!r}'
  return None


def python_name_problem(index: CodeIndex, name: str) -> str | None:
  """Why `name` ('a.b.c' or a bare name) is not in the repository, or None.

  Checked: chains that start with 'ffsd_jax', 'scripts' or 'configs', with a module's own name ('objective.x',
  'heads.X', 'benchmark.x'; each module of that name is tried), with a class of the repository ('Method.x', through
  its bases) or with 'config' (a config key); and bare names that read as code, against every identifier and string
  of the code (`CodeIndex.known_names`) and `EXTERNAL_NAMES`. Other chains ('jax.jit', 'nn.Dense', 'opt.data_path')
  name other code and pass.
  """
  parts = name.split('.')
  if len(parts) == 1:
    if not CODE_LIKE.search(name) or name in index.known_names or name in EXTERNAL_NAMES:
      return None
    if re.fullmatch(r'\w+_[ijklm]', name) and any(f'{name[:-1]}{n}' in index.known_names for n in range(10)):
      return None  # 'student_i' stands for 'student_0', 'student_1', ...
    return 'no Python file of the repository has this name'
  if FILE_NAME.search(name):
    return None
  if parts[0] in ('ffsd_jax', 'scripts', 'configs'):
    if parts[0] not in index.modules:
      return f'there is no module {parts[0]}'
    return _module_problem(index, parts[0], parts[1:])
  if parts[0] in index.short_modules:
    problems = [_module_problem(index, module, parts[1:]) for module in index.short_modules[parts[0]]]
    return None if None in problems else '; '.join(problems)
  if parts[0] in index.classes:
    if _has_member(index, index.classes[parts[0]], parts[1]):
      return None
    return f'class {parts[0]} has no member {parts[1]!r}'
  if parts[0] == 'config' and len(parts) == 2 and parts[1] not in index.config_keys:
    return f'no config of configs/ sets config.{parts[1]}'
  return None


def _expand_braces(path: str) -> list[str]:
  match = re.search(r'\{([^{}]*)\}', path)
  if not match:
    return [path]
  return [expanded for option in match.group(1).split(',')
          for expanded in _expand_braces(path[:match.start()] + option + path[match.end():])]


def path_problem(root: pathlib.Path, path: str) -> str | None:
  """Why the repository path `path` (braces expanded, '*' globbed, placeholders cut off) does not exist, or None."""
  path = path.rstrip('.')
  placeholder = PATH_PLACEHOLDER.search(path)
  if placeholder:
    path = path[:placeholder.start()].rpartition('/')[0] + '/'
  for expanded in _expand_braces(path):
    if '*' in expanded:
      exists = bool(glob.glob(expanded, root_dir=root))
    else:
      exists = (root / expanded).is_dir() if expanded.endswith('/') else (root / expanded).exists()
    if not exists:
      return f'{expanded} does not exist'
  return None


def _test_problem(index: CodeIndex, test_file: str, names: str) -> str | None:
  if test_file not in index.tests:
    return f'tests/{test_file} does not exist'
  names = names.lstrip(':')
  if names not in index.tests[test_file]:
    return f'tests/{test_file} has no top-level test {names}'
  return None


def _line_of(text: str, offset: int) -> int:
  return text.count('\n', 0, offset) + 1


def _blank(match: re.Match) -> str:
  """The match with everything but its newlines replaced by spaces: offsets and line numbers are kept."""
  return re.sub(r'[^\n]', ' ', match.group(0))


def stale_references(markdown: str, index: CodeIndex, doc_dir: pathlib.Path) -> list[str]:
  """'LINE: `span`: problem' for every name or path in `markdown` that the repository does not have.

  Inline code spans are checked for repository paths (`REPO_PATH`, `path_problem`), tests (`TEST_REFERENCE`,
  `TEST_CHAIN`), `--config.KEY` flags, 'from M import N' and whole-span Python names (`python_name_problem`); fenced
  blocks for paths, tests and flags only (their code's local names are not the repository's); relative Markdown links
  must point at files. Shell commands, metric names ('eval/top1/leader'), JSON keys and math are left alone: they
  match none of these forms, or only as other code's names.
  """
  problems = []
  lines = markdown.split('\n')
  # Paragraph or table-row number of each line: a '::test' chain continues a test file of the same one.
  blocks, block = [], 0
  for line in lines:
    block += not line.strip() or line.lstrip().startswith('|')
    blocks.append(block)

  def check_paths_tests_flags(text: str, offset: int):
    for match in REPO_PATH.finditer(text):
      if OUTPUT_OPTION.search(text, 0, match.start()):
        continue
      if problem := path_problem(index.root, match.group(0)):
        problems.append((_line_of(markdown, offset + match.start()), match.group(0), problem))
    for match in TEST_REFERENCE.finditer(text):
      if problem := _test_problem(index, match.group(1), match.group(2)):
        problems.append((_line_of(markdown, offset + match.start()), match.group(0), problem))
    for match in CONFIG_FLAG.finditer(text):
      if match.group(1) not in index.config_keys:
        problems.append((_line_of(markdown, offset + match.start()), match.group(0),
                         f'no config of configs/ sets config.{match.group(1)}'))

  for fence in FENCE.finditer(markdown):
    check_paths_tests_flags(fence.group(0), fence.start())
  prose = FENCE.sub(_blank, markdown)
  last_test_file = None  # (block, file name)
  for span in CODE_SPAN.finditer(prose):
    text, line = ' '.join(span.group(2).split()), _line_of(prose, span.start())
    check_paths_tests_flags(span.group(2), span.start(2))
    references = list(TEST_REFERENCE.finditer(text))
    if references:
      last_test_file = (blocks[line - 1], references[-1].group(1))
    if chain := TEST_CHAIN.fullmatch(text):
      if last_test_file is None or last_test_file[0] != blocks[line - 1]:
        problems.append((line, text, 'no test file is named before it in its paragraph or table row'))
      elif problem := _test_problem(index, last_test_file[1], chain.group(1)):
        problems.append((line, text, problem))
    if imported := PYTHON_IMPORT.fullmatch(text):
      names = [f'{imported["module"]}.{name.strip()}' for name in imported['names'].split(',')]
    elif name := PYTHON_NAME.fullmatch(text):
      names = [name['name']]
    else:
      names = []
    for name in names:
      if problem := python_name_problem(index, name):
        problems.append((line, text, problem))
  for link in LINK.finditer(CODE_SPAN.sub(_blank, prose)):
    target = link.group(1).split('#')[0]
    if target and not re.match(r'[a-z][\w+.-]*:', target) and not (doc_dir / target).exists():
      problems.append((_line_of(prose, link.start()), link.group(0), f'the link target {target} does not exist'))
  return [f'{line}: `{text}`: {problem}' for line, text, problem in sorted(set(problems))]


def markdown_docs() -> list[pathlib.Path]:
  return sorted({path for pattern in MARKDOWN_DOCS for path in REPO_ROOT.glob(pattern)})


@pytest.mark.parametrize('doc', [path.relative_to(REPO_ROOT).as_posix() for path in markdown_docs()])
def test_docs_name_only_what_exists(doc):
  path = REPO_ROOT / doc
  problems = stale_references(path.read_text(encoding='utf-8'), repository_index(), path.parent)
  assert not problems, (f'{doc} names what the repository does not have (write the current name; a name of other '
                        'code goes into EXTERNAL_NAMES):\n' + '\n'.join(f'{doc}:{problem}' for problem in problems))


# Ordinary spans the checker must leave alone, and names and paths that exist: no finding.
GOOD_MARKDOWN = '''\
Paths: `ffsd_jax/objective.py`, `configs/cifar100_resnet32_{kdcl,one,pcl}.py`, `ffsd_jax/methods/<name>.py`,
`ffsd_jax/methods/`, `tests/test_*.py`, `main.py`, [methods](methods.md), [the KL](method.md#6-the-objective).
Names: `objective.kl_divergence`, `ffsd_jax.methods.base.Method`, `ffsd_jax.models.ffsd`, `Method.build_model(dtype)`,
`DML.check_config`, `student_logit_terms`, `create_backbone(model, num_classes, dtype)`, `config.num_epochs`,
`from ffsd_jax.objective import kl_divergence, cross_entropy`, `student_i/kl`, `decoder_i`, `en_fc`.
Tests: `tests/test_docs.py::test_citation_pattern[text0-expected0]`, `::test_every_section_citation_exists`,
`test_docs.py::test_method_sections_are_numbered_in_order`.

| row | `test_docs.py::test_citation_pattern`, `::test_every_section_citation_exists` |

Other code and not code: `python main.py --config configs/default.py --workdir runs/x --config.num_epochs=3`,
`--config.KEY=VALUE`, `eval/top1/leader`, `"preempted": true`, `exp(−5(1 − e/E)²)`, `jax.jit`, `nn.Dense`,
`opt.data_path`, `config.json`, `one.py`, `utils/ramps.py`, `WORKDIR/checkpoints/<step>/`, `lambda_scale`,
`drop_last=False`, `a ` `` `b` `` and `x`, `runs/study/results.csv`, `$XDG_CACHE_HOME/ffsd_jax/decoded`.

```
python scripts/study.py run --configs configs/study_cifar10_1k_resnet8.py --root runs/study
python scripts/plot_metrics.py runs/study --out docs/figures/not_a_file_yet
```
'''

# One stale name or path per case: (Markdown, the one finding expected).
STALE_MARKDOWN = [
    ('See `ffsd_jax/no_such_module.py`.', '1: `ffsd_jax/no_such_module.py`: ffsd_jax/no_such_module.py does not exist'),
    ('`configs/cifar100_resnet32_{kdcl,nope}.py`',
     '1: `configs/cifar100_resnet32_{kdcl,nope}.py`: configs/cifar100_resnet32_nope.py does not exist'),
    ('`ffsd_jax/no_such_folder/<name>.py`',
     '1: `ffsd_jax/no_such_folder/<name>.py`: ffsd_jax/no_such_folder/ does not exist'),
    ('text\n\n`objective.no_such_function(x)`',
     "3: `objective.no_such_function(x)`: ffsd_jax.objective has no top-level name 'no_such_function'"),
    ('`ffsd_jax.methods.base.Method.no_such_member`',
     "1: `ffsd_jax.methods.base.Method.no_such_member`: class ffsd_jax.methods.base.Method has no member "
     "'no_such_member'"),
    ('`DML.no_such_member`', "1: `DML.no_such_member`: class DML has no member 'no_such_member'"),
    ('Code: `_student_logit_terms` (CE and KL).',
     '1: `_student_logit_terms`: no Python file of the repository has this name'),
    ('`tests/test_docs.py::test_no_such_test`',
     '1: `tests/test_docs.py::test_no_such_test`: tests/test_docs.py has no top-level test test_no_such_test'),
    ('`test_no_such_file.py::test_x`', '1: `test_no_such_file.py::test_x`: tests/test_no_such_file.py does not exist'),
    ('`test_docs.py::test_citation_pattern`, `::test_no_such_chain`',
     '1: `::test_no_such_chain`: tests/test_docs.py has no top-level test test_no_such_chain'),
    ('`test_docs.py::test_citation_pattern`.\n\n`::test_citation_pattern`',
     '3: `::test_citation_pattern`: no test file is named before it in its paragraph or table row'),
    ('`--config.no_such_key=1`', '1: `--config.no_such_key`: no config of configs/ sets config.no_such_key'),
    ('`config.no_such_key`', '1: `config.no_such_key`: no config of configs/ sets config.no_such_key'),
    ('`from ffsd_jax.export import no_such_loader`',
     "1: `from ffsd_jax.export import no_such_loader`: ffsd_jax.export has no top-level name 'no_such_loader'"),
    ('```\npython scripts/no_such_script.py --workdir runs/x\n```',
     '2: `scripts/no_such_script.py`: scripts/no_such_script.py does not exist'),
    ('See [the note](no_such_doc.md).',
     '1: `[the note](no_such_doc.md)`: the link target no_such_doc.md does not exist'),
    ('| a | `test_docs.py::test_citation_pattern` |\n| b | `::test_citation_pattern` |',
     '2: `::test_citation_pattern`: no test file is named before it in its paragraph or table row'),
]


def test_checker_leaves_ordinary_spans_and_existing_names_alone():
  assert stale_references(GOOD_MARKDOWN, repository_index(), REPO_ROOT / 'docs') == []


@pytest.mark.parametrize('markdown, expected', STALE_MARKDOWN)
def test_checker_finds_each_planted_stale_name(markdown, expected):
  assert stale_references(markdown, repository_index(), REPO_ROOT / 'docs') == [expected]


def test_docs_test_fails_on_a_real_doc_with_a_planted_stale_name():
  text = (REPO_ROOT / 'docs' / 'methods.md').read_text(encoding='utf-8')
  assert stale_references(text, repository_index(), REPO_ROOT / 'docs') == []
  planted = text + '\nThe loss is `dml_objective` in `ffsd_jax/methods/dml.py`.\n'
  line = planted.count('\n')
  assert stale_references(planted, repository_index(), REPO_ROOT / 'docs') == [
      f'{line}: `dml_objective`: no Python file of the repository has this name']
