"""Where device time goes in a `jax.profiler.trace`: the newest xplane file, summarised by category and op.

Ops are put in categories (convolution, matmul, attention, transposes/copies, reductions, elementwise fusions,
collectives) by their kernel name, or, where the HLO text of the traced program is given, by what the HLO
instruction computes.
"""

import collections
import glob
import os
import re
from typing import Any, Dict, List

import jax

from fcnet_jax.tools.benchmark import hlo

PROFILE_CATEGORIES = (  # First match wins: cuDNN convolutions are implicit GEMMs, so they come before matmul;
  # layout kernels first, but by their own names: convolution kernel names carry layouts ("…_nhwckrsc_nchw").
  ("transpose/copy", r"nchwtonhwc|nhwctonchw|transpose|copy|memcpy|memset"),
  ("attention", r"fmha|flash|attention|softmax"),
  ("convolution", r"conv|fprop|dgrad|wgrad|implicit_gemm|cudnn"),
  ("matmul", r"gemm|matmul|\bdot|cublas|nvjet|xmma|cutlass|wgmma|triton"),
  ("collective", r"nccl|all-reduce|all_reduce|allreduce|all-gather"),
  ("reduction", r"reduce"),
  ("elementwise fusion", r"fusion|loop|elementwise"),
)
_PROFILE_SKIP = re.compile(r"threadpool|await|wait|^end:|pjrt|execute|thunkexecutor|^\$|python|steps?$")


def categorize(name: str) -> str:
  """The category of a kernel, custom-call target or HLO opcode, by its name (first match in the table)."""
  lowered = name.lower()
  for category, pattern in PROFILE_CATEGORIES:
    if re.search(pattern, lowered):
      return category
  return "other"


def hlo_categories(text: str) -> Dict[str, str]:
  """Top-level HLO instruction name → category (what a fusion computes decides the fusion's category)."""
  computations, _, fusion_kinds = hlo.parse_hlo(text)
  body_category = {}
  for name in fusion_kinds:
    opcodes = {inst.opcode for inst in computations.get(name, [])}
    body_category[name] = (
      "convolution"
      if "convolution" in opcodes
      else "matmul"
      if "dot" in opcodes
      else "reduction"
      if opcodes & {"reduce", "reduce-window"}
      else "transpose/copy"
      if opcodes <= {"parameter", "transpose", "copy", "bitcast"}
      else "elementwise fusion"
    )
  out = {}
  for name, instructions in computations.items():
    if name in fusion_kinds:
      continue
    for inst in instructions:
      if inst.opcode == "fusion":
        called = re.search(r"calls=%?([\w.\-]+)", inst.text)
        out[inst.name] = body_category.get(called.group(1) if called else "", "elementwise fusion")
      elif inst.opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', inst.text)
        out[inst.name] = categorize(target.group(1) if target else inst.name)
      else:
        out[inst.name] = categorize(inst.opcode)
  return out


def _hlo_name(event_name: str) -> str:
  """ "%fusion.12 = bf16[…] fusion(…)" or "fusion.12" → "fusion.12"."""
  return event_name.strip().lstrip("%").split(" ")[0]


def summarize_profile(trace_dir: str, steps: int, hlo_text: str = "", top: int = 15) -> Dict[str, Any]:
  """Where device time goes in the newest `*.xplane.pb` under `trace_dir` (from `jax.profiler.trace`).

  GPU: the device plane's "XLA Ops" line (HLO instructions, categorised through `hlo_text`) and its kernels.
  CPU: the XLA executor threads of the host plane. Times are totals over the traced steps and per step.
  """
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
  if not files:
    return {"error": f"no *.xplane.pb under {trace_dir}"}
  profile = jax.profiler.ProfileData.from_file(files[-1])
  names = hlo_categories(hlo_text) if hlo_text else {}
  by_name: Dict[str, List[float]] = collections.defaultdict(lambda: [0.0, 0])
  kernels: Dict[str, List[float]] = collections.defaultdict(lambda: [0.0, 0])
  source = ""
  for plane in profile.planes:
    is_device = plane.name.startswith("/device:")
    if not is_device and plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      if is_device:
        if line.name == "XLA Ops":
          target = by_name
        elif line.name.startswith("Stream") or "stream" in line.name.lower():
          target = kernels
        else:
          continue
      elif line.name.startswith("tf_XLA"):
        target = by_name
      else:
        continue
      source = source or plane.name
      for event in line.events:
        if event.duration_ns <= 0 or _PROFILE_SKIP.search(event.name.lower()):
          continue
        target[event.name][0] += event.duration_ns / 1e6
        target[event.name][1] += 1
    if is_device and (by_name or kernels):
      break  # The first device is representative under data parallelism.
  ops = by_name or kernels
  total_ms = sum(ms for ms, _ in ops.values())
  categories: Dict[str, float] = collections.defaultdict(float)
  for name, (ms, _) in ops.items():
    categories[names.get(_hlo_name(name), categorize(name))] += ms
  ranked = sorted(ops.items(), key=lambda item: -item[1][0])[:top]
  result = {
    "file": files[-1],
    "source": source,
    "steps": steps,
    "total_ms": total_ms,
    "per_step_ms": total_ms / max(steps, 1),
    "ops_per_step": sum(n for _, n in ops.values()) / max(steps, 1),
    "categories_ms_per_step": {k: v / max(steps, 1) for k, v in sorted(categories.items(), key=lambda item: -item[1])},
    "top_ops": [
      {
        "name": name[:120],
        "category": names.get(_hlo_name(name), categorize(name)),
        "ms_per_step": ms / max(steps, 1),
        "share": ms / total_ms if total_ms else None,
        "count": n,
      }
      for name, (ms, n) in ranked
    ],
  }
  if by_name and kernels:
    kernel_total = sum(ms for ms, _ in kernels.values())
    result["top_kernels"] = [
      {
        "name": name[:120],
        "ms_per_step": ms / max(steps, 1),
        "share": ms / kernel_total if kernel_total else None,
        "count": n,
      }
      for name, (ms, n) in sorted(kernels.items(), key=lambda item: -item[1][0])[:top]
    ]
  return result
