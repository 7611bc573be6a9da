"""What a compiled program does per step, read from the compiler's output: collectives, kernels, memory, FLOPs.

Pure functions over a `jax.stages.Compiled` (any backend, including the compile-only GPU and TPU targets of
scripts/aot_compile.py). They read the scheduled, partitioned program (`compiled.as_text()`, one device's share) and
`compiled.memory_analysis()`; scripts/benchmark.py and scripts/aot_compile.py report them.

Counts are static: an instruction inside a while loop's body counts once, not once per iteration, and an
asynchronous pair (`all-reduce-start` / `all-reduce-done`, or `async-start` / `async-update` / `async-done` around a
wrapped collective) counts once.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterator

from ffsd_jax import run_record

COLLECTIVE_KINDS = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')
# The opcodes that stand for one collective: the synchronous form and the start of the asynchronous pair (whose
# `-done` half is the same collective and is not counted again).
_COLLECTIVE_OPCODES = {**{kind: kind for kind in COLLECTIVE_KINDS},
                       **{f'{kind}-start': kind for kind in COLLECTIVE_KINDS}}
# Opcodes that run other computations as part of the step's control flow, so their kernels run on the device: a
# loop body, a conditional's branch, a plain call (XLA:GPU wraps runs of kernels into command buffers (CUDA graphs)
# as calls), an asynchronously started computation. Fused computations (`fusion`) and reducers (`to_apply` of
# reduce, all-reduce, ...) are the inside of one kernel and are not followed for kernels.
_CONTROL_FLOW_OPCODES = ('while', 'conditional', 'call', 'async-start')
_KERNEL_OPCODES = ('fusion', 'custom-call')

_HEADER = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$')
# The opcode is the first lower-case word followed by '(' after the '=': the shape before it holds no such word
# (element types are followed by '[', TPU layout tags such as T(8,128) and S(1) are upper-case).
_OPCODE = re.compile(r'(?:^|[\s)}\]])([a-z][a-z0-9\-]*)\(')
_CALLEES = re.compile(
    r'\b(?:calls|to_apply|body|condition|branch_computations|true_computation|false_computation)='
    r'(\{[^}]*\}|%?[\w.\-]+)')
_NAME = re.compile(r'%?([\w.\-]+)')


@dataclasses.dataclass(frozen=True)
class _Instruction:
  opcode: str
  callees: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Program:
  entry: str
  computations: dict[str, list[_Instruction]]


def _parse_instruction(rest: str) -> _Instruction | None:
  """The opcode and called computations of one instruction, from the text after its '='."""
  # Attributes with free text (op names, backend configs) come after the operands; cutting them keeps a name such
  # as op_name="jit(step)/all-reduce(...)" from being read.
  rest = rest.split(', metadata=', 1)[0].split(', backend_config=', 1)[0]
  opcode = _OPCODE.search(rest)
  if opcode is None:
    return None
  callees = []
  for match in _CALLEES.finditer(rest):
    callees.extend(_NAME.findall(match.group(1)))
  return _Instruction(opcode.group(1), tuple(callees))


def _parse(hlo_text: str) -> _Program:
  """The computations of an HLO module's text, each as its list of instructions, and the entry's name."""
  computations: dict[str, list[_Instruction]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith((' ', '\t')):
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
      continue
    if current is None:
      continue
    if line.strip() == '}':
      current = None
      continue
    instruction = _INSTRUCTION.match(line)
    if instruction:
      parsed = _parse_instruction(instruction.group(1))
      if parsed is not None:
        computations[current].append(parsed)
  if entry is None:
    raise ValueError('The compiled program\'s text has no ENTRY computation.')
  return _Program(entry, computations)


def _program(compiled: Any) -> _Program:
  # A partitioned program has one module per device program; every device runs the same one in data parallelism.
  return _parse(compiled.as_text())


def _walk(program: _Program, follow_opcodes: tuple[str, ...] | None) -> Iterator[_Instruction]:
  """Every instruction of the entry computation and of the computations reached from it, each computation once.

  `follow_opcodes`: the opcodes whose called computations are entered (None: all of them).
  """
  seen, stack = set(), [program.entry]
  while stack:
    name = stack.pop()
    if name in seen or name not in program.computations:
      continue
    seen.add(name)
    for instruction in program.computations[name]:
      yield instruction
      if follow_opcodes is None or instruction.opcode in follow_opcodes:
        stack.extend(instruction.callees)


def collectives(compiled: Any) -> dict[str, int]:
  """How many collectives of each kind one step issues (static count; an async start/done pair counts once).

  Args:
    compiled: a compiled program (`jax.jit(...).lower(...).compile()`).

  Returns:
    {'all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all'} -> count, every key present.
  """
  counts = dict.fromkeys(COLLECTIVE_KINDS, 0)
  # Every called computation is entered: collectives can sit in loop bodies, conditionals, command buffers and the
  # computations wrapped by `async-start` (each computation is visited once, so async-update/-done add nothing).
  for instruction in _walk(_program(compiled), follow_opcodes=None):
    kind = _COLLECTIVE_OPCODES.get(instruction.opcode)
    if kind is not None:
      counts[kind] += 1
  return counts


def kernel_launches(compiled: Any) -> int:
  """The kernels of one step: the fusions and custom calls (e.g. cuDNN convolutions, `__cudnn$conv...`) of the entry
  computation and of the loop bodies, branches and calls it runs (static count: a loop body's kernels count once).

  Collectives, copies and the like are not counted; on CPU the count is of the same fusions, which XLA:CPU runs as
  generated functions rather than launches.
  """
  return sum(1 for instruction in _walk(_program(compiled), follow_opcodes=_CONTROL_FLOW_OPCODES)
             if instruction.opcode in _KERNEL_OPCODES)


_MEMORY_FIELDS = {
    'argument_bytes': 'argument_size_in_bytes',
    'output_bytes': 'output_size_in_bytes',
    'alias_bytes': 'alias_size_in_bytes',
    'temp_bytes': 'temp_size_in_bytes',
    'generated_code_bytes': 'generated_code_size_in_bytes',
}


def memory_per_device(compiled: Any) -> dict[str, int | None]:
  """One device's memory for the program, from XLA's buffer assignment (`compiled.memory_analysis()`).

  Returns:
    {'argument_bytes', 'output_bytes', 'alias_bytes', 'temp_bytes', 'generated_code_bytes', 'peak_bytes'}; every
    value None on a backend without memory analysis. `peak_bytes` = arguments + outputs - aliased (donated) outputs +
    temporaries: what must fit on the device at once (arguments + temporaries when every output is donated).
  """
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    stats = None  # Some backends do not implement it (it raises NotImplementedError or a runtime error).
  if stats is None:
    return {**dict.fromkeys(_MEMORY_FIELDS), 'peak_bytes': None}
  result = {key: int(getattr(stats, field)) for key, field in _MEMORY_FIELDS.items()}
  result['peak_bytes'] = (result['argument_bytes'] + result['output_bytes'] - result['alias_bytes'] +
                          result['temp_bytes'])
  return result


def flops(compiled: Any) -> float | None:
  """FLOPs of one step on one device from XLA's cost analysis, or None where the backend gives none."""
  return run_record.compiled_flops(compiled)
