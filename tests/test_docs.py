"""Every section citation in the repository points at a section of docs/method.md that exists.

The code, tests and documents cite the method as "docs/method.md §N" (or "§N.M"). These tests fail when a `.py` or
`.md` file of the repository cites a section number that docs/method.md does not have, or when a file still points at
the external working note the citations used to refer to, which is not part of the repository.
"""

import pathlib
import re
import subprocess

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
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
