"""A reader of XLA's HLO module text, and the counts in it that say whether a step runs as intended.

Works on both `lowered.as_text(dialect="hlo")` (what JAX asked for) and `compiled.as_text()` (what XLA made of
it): fusions, convolution layouts and dtypes, matmuls by dtype, transposes and copies outside fusions, fused
attention kernels, host transfers, collectives and input/output aliasing (donation).
"""

import collections
import dataclasses
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from fcnet_jax.tools.benchmark import timing


@dataclasses.dataclass
class HloInstruction:
  """One instruction of an HLO computation: its name, opcode, result shape, full text and computation."""

  name: str
  opcode: str
  shape: str
  text: str
  computation: str


def parse_hlo(text: str) -> Tuple[Dict[str, List[HloInstruction]], str, Dict[str, str]]:
  """HLO module text → ({computation: instructions}, entry computation name, {fusion computation: kind})."""
  computations: Dict[str, List[HloInstruction]] = {}
  entry, current = "", None
  header = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*(->.*)?\{\s*$")
  for line in text.splitlines():
    stripped = line.strip()
    if not stripped or stripped.startswith("HloModule") or stripped.startswith("//"):
      continue
    if stripped == "}":
      current = None
      continue
    if current is None:
      match = header.match(stripped)
      if match and " = " not in stripped.split("(")[0]:
        current = match.group(2)
        computations[current] = []
        if match.group(1):
          entry = current
      continue
    instruction = _parse_instruction(stripped, current)
    if instruction is not None:
      computations[current].append(instruction)
  fusion_kinds = {}
  for instructions in computations.values():
    for inst in instructions:
      if inst.opcode == "fusion":
        called = re.search(r"calls=%?([\w.\-]+)", inst.text)
        kind = re.search(r"kind=(\w+)", inst.text)
        if called:
          fusion_kinds[called.group(1)] = kind.group(1) if kind else "?"
  return computations, entry, fusion_kinds


def _closing(text: str, start: int, opening: str, closing: str) -> int:
  """Index of the bracket that closes the one at `text[start]` (nesting allowed); -1 when it is never closed."""
  depth = 0
  for index in range(start, len(text)):
    depth += text[index] == opening
    depth -= text[index] == closing
    if depth == 0:
      return index
  return -1


def _parse_instruction(line: str, computation: str) -> Optional[HloInstruction]:
  if line.startswith("ROOT "):
    line = line[5:]
  name, sep, rest = line.partition(" = ")
  if not sep:
    return None
  rest = rest.lstrip()
  if rest.startswith("("):  # Tuple shape: skip to the matching parenthesis.
    end = _closing(rest, 0, "(", ")")
    end = len(rest) - 1 if end < 0 else end
    shape, rest = rest[: end + 1], rest[end + 1 :].lstrip()
  else:
    shape, _, rest = rest.partition(" ")
  match = re.match(r"([a-z][\w\-]*)\(", rest)
  if not match:
    return None
  return HloInstruction(name.strip().lstrip("%"), match.group(1), shape, line, computation)


def _braced(line: str, key: str) -> str:
  """The text inside the braces after `key` in `line` (nested braces allowed); "" when absent."""
  start = line.find(key)
  if start < 0:
    return ""
  start += len(key)
  end = _closing(line, start, "{", "}")
  return line[start + 1 : end] if end >= 0 else ""


def _element_type(shape: str) -> str:
  match = re.search(r"\b(bf16|f16|f32|f64|s8|u8|s32|u32|s64|u64|pred|f8\w*)\[", shape)
  return match.group(1) if match else "?"


def _elements(shape: str) -> int:
  match = re.search(r"\[([\d,]*)\]", shape)
  if not match or not match.group(1):
    return 1
  return int(np.prod([int(d) for d in match.group(1).split(",")]))


_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "s8": 1, "u8": 1, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "pred": 1}
HOST_OPCODES = ("infeed", "outfeed", "send", "recv", "send-done", "recv-done")
COLLECTIVE_OPCODES = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "collective-permute",
  "all-to-all",
  "all-reduce-start",
  "all-gather-start",
  "collective-permute-start",
)


def _op_name(inst: HloInstruction) -> str:
  match = re.search(r'op_name="([^"]*)"', inst.text)
  return match.group(1) if match else ""


def hlo_report(text: str, expect_dtype: Optional[str] = None, examples: int = 8) -> Dict[str, Any]:
  """Counts in one HLO module's text (lowered or compiled) that say whether the step runs as intended.

  Args:
    text: `lowered.as_text(dialect="hlo")` or `compiled.as_text()`.
    expect_dtype: the compute dtype of the variant ("bfloat16", …): convolutions and dots whose result is
      float32 are then listed (by their JAX op_name) as candidates for unintended float32 compute.
    examples: how many op_names to keep per list.

  Returns:
    A JSON-able dict: instruction and fusion counts, convolution layouts/dtypes, matmuls by dtype, transposes
    and copies outside fusions (each a pass over memory on GPU), custom-call targets, host transfers,
    collectives, whether attention runs as a fused (cuDNN fMHA) kernel, and input/output aliasing (donation).
  """
  computations, entry, fusion_kinds = parse_hlo(text)
  # Fused computations and reducer bodies (to_apply=) run inside other kernels; the rest launch work.
  fused = set(fusion_kinds) | {
    name
    for insts in computations.values()
    for inst in insts
    for name in re.findall(r"to_apply=%?([\w.\-]+)", inst.text)
  }
  all_instructions = [inst for insts in computations.values() for inst in insts]
  top_level = [inst for inst in all_instructions if inst.computation not in fused]
  opcodes = collections.Counter(inst.opcode for inst in all_instructions)
  targets = collections.Counter()
  conv_layouts, conv_dtypes, matmul_dtypes = collections.Counter(), collections.Counter(), collections.Counter()
  f32_compute: List[str] = []
  host_transfers: List[str] = []
  for inst in all_instructions:
    target = re.search(r'custom_call_target="([^"]+)"', inst.text)
    target = target.group(1) if target else ""
    if target:
      targets[target] += 1
    lowered_target = target.lower()
    is_conv = inst.opcode == "convolution" or "conv" in lowered_target
    is_matmul = inst.opcode == "dot" or any(t in lowered_target for t in ("gemm", "matmul", "cublas"))
    dtype = _element_type(inst.shape)
    if is_conv:
      labels = re.search(r"dim_labels=([\w>\-]+)", inst.text)
      conv_layouts[labels.group(1) if labels else "?"] += 1
      conv_dtypes[dtype] += 1
    if is_matmul:
      matmul_dtypes[dtype] += 1
    if (is_conv or is_matmul) and dtype == "f32":
      f32_compute.append(_op_name(inst) or inst.name)
    if inst.opcode in HOST_OPCODES or (target and any(t in lowered_target for t in ("callback", "host"))):
      host_transfers.append(f"{inst.opcode} {target} {_op_name(inst)}".strip())
  moves = [inst for inst in top_level if inst.opcode in ("transpose", "copy")]
  move_bytes = sum(_elements(inst.shape) * _BYTES.get(_element_type(inst.shape), 4) for inst in moves)
  attention_kernels = sum(n for t, n in targets.items() if "fmha" in t.lower() or "flash" in t.lower())
  header = next((line for line in text.splitlines() if line.startswith("HloModule")), "")
  aliases, donors = _braced(header, "input_output_alias="), _braced(header, "buffer_donor=")
  report = {
    "instructions": len(all_instructions),
    "top_level_instructions": len(top_level),
    "entry": entry,
    "fusions": len([i for i in top_level if i.opcode == "fusion"]),
    "fusion_kinds": dict(collections.Counter(fusion_kinds.values())),
    "opcodes_top": dict(opcodes.most_common(15)),
    "convolutions": sum(conv_dtypes.values()),
    "convolution_layouts": dict(conv_layouts),
    "convolution_dtypes": dict(conv_dtypes),
    "matmul_dtypes": dict(matmul_dtypes),
    "transposes_top_level": sum(1 for i in moves if i.opcode == "transpose"),
    "copies_top_level": sum(1 for i in moves if i.opcode == "copy"),
    "transpose_copy_gib": move_bytes / timing.GIB,
    "transposes_all": opcodes.get("transpose", 0),
    "custom_call_targets": dict(targets),
    "host_transfers": host_transfers,
    "collectives": {op: opcodes[op] for op in COLLECTIVE_OPCODES if opcodes.get(op)},
    "while_loops": opcodes.get("while", 0),
    "attention_fused_kernels": attention_kernels,
    "attention_implementation": (
      "cuDNN fused attention (fMHA custom call)"
      if attention_kernels
      else "XLA einsum + softmax (logits B×heads×T×S materialised)"
    ),
    "input_output_aliases": aliases.count("-alias)"),
    "buffer_donors": donors.count("("),
  }
  if expect_dtype is not None and expect_dtype != "float32":
    report["f32_convs_and_matmuls"] = len(f32_compute)
    report["f32_examples"] = [
      name for name, _ in collections.Counter(_short_op_name(n) for n in f32_compute).most_common(examples)
    ]
  return report


def _short_op_name(op_name: str) -> str:
  """Drops the jit/transpose wrappers of a JAX op_name, keeping the module path."""
  parts = [p for p in op_name.split("/") if not p.startswith(("jit(", "jvp(", "transpose(", "vmap("))]
  return "/".join(parts[-4:])
