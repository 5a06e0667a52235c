"""Speed, memory and utilisation of FCNet's real train / predict steps on synthetic device-resident batches.

    python -m fcnet_jax.tools.benchmark --config=configs/refcoco_r101.py --out=bench.json
    python -m fcnet_jax.tools.benchmark --config=configs/tiny.py --out=r.json      # ~1 min on 2 CPU cores

Runs without TensorFlow: batches are synthetic (uint8 image B×S×S×3, uint8 0/1 mask B×S×S, int32 CLIP tokens
B×L, bool valid B) and live on the devices, so only the model, `train.train_step` (jitted over the mesh with the
state donated, as `train.Trainer`) and `train.predict_step` are timed. Weights are random.

Sections (--sections, comma-separated):
  train    images/s per (dtype, per-device batch) of the full train step (forward, backward, Adam), compile
           time, XLA's static memory estimate and the device's peak memory (`memory_stats`, None on CPU).
  infer    images/s of `predict_step` per (dtype, batch) and its synchronous latency (median, p90).
  matmul   a large jnp.dot per dtype, timed here: the matrix-multiply peak that utilisation is measured against.
  stages   where the forward (and, with --stage_modes=train, the backward) time goes: image encoder, text
           encoder, neck+EGM+ECM ("fusion"), decoder, mask head (and the Adam update), each jitted separately.
Diagnostics of one train variant (--diagnose_variant): --hlo_report counts fusions, transposes, convolution
layouts and dtypes, attention kernels, host transfers and donation in the compiled HLO; --profile_dir traces a
few steps with `jax.profiler.trace` and summarises where device time goes, and does the same for the smallest
inference batch (ops per call and the device's busy fraction tell launch-bound from compute-bound).

Timing: compile and warm-up calls are excluded; each repeat issues calls back to back and waits for the results
with `block_until_ready`; numbers are medians over repeats. Utilisation = achieved FLOP/s ÷ the measured matmul
peak of the same dtype, with FLOPs from XLA's cost analysis of the forward pass (`summary.forward_flops`; XLA
counts a multiply-add as 2) — training counts 3× the forward FLOPs per image (forward + 2× for the backward).
The JSON (--out) is rewritten after every variant, so an interrupted run keeps what it measured; a short table is
printed last.
"""
import collections
import dataclasses
import functools
import glob
import json
import os
import re
import subprocess
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import app
from absl import flags
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fcnet_jax import sharding
from fcnet_jax import train
from fcnet_jax.models import fcnet
from fcnet_jax.tools import summary

SOS, EOS = 49406, 49407
SECTIONS = ("train", "infer", "matmul", "stages")
STAGE_MODES = ("infer", "train")
GIB = 2.0 ** 30

# Defaults per backend: the full matrix on accelerators, a small one on CPU where compiling dominates.
ACCELERATOR_DEFAULTS = dict(train_batch_sizes=(8, 32), infer_batch_sizes=(1, 32), repeats=20,
                            calls_per_repeat=5, latency_repeats=100, matmul_size=8192)
CPU_DEFAULTS = dict(train_batch_sizes=(8,), infer_batch_sizes=(1, 8), repeats=5, calls_per_repeat=2,
                    latency_repeats=20, matmul_size=1024)


@dataclasses.dataclass
class Settings:
  """Resolved run settings (flags with the backend defaults filled in)."""
  sections: Tuple[str, ...]
  dtypes: Tuple[str, ...]
  train_batch_sizes: Tuple[int, ...]
  infer_batch_sizes: Tuple[int, ...]
  repeats: int
  calls_per_repeat: int
  warmup: int
  latency_repeats: int
  matmul_size: int
  stage_batch_size: int
  stage_modes: Tuple[str, ...]
  diagnose_variant: Optional[Tuple[str, int]]
  profile_infer_variant: Optional[Tuple[str, int]]
  hlo_report: bool
  hlo_dump_dir: str
  profile_dir: str
  profile_steps: int
  compile_only: bool
  seed: int = 0


def resolve_settings(config: ml_collections.ConfigDict, platform: str, *, sections: str = "train,infer,matmul",
                     dtypes: str = "", train_batch_sizes: str = "", infer_batch_sizes: str = "",
                     repeats: int = 0, calls_per_repeat: int = 0, warmup: int = 2, latency_repeats: int = 0,
                     matmul_size: int = 0, stage_batch_size: int = 0, stage_modes: str = "infer",
                     diagnose_variant: str = "", hlo_report: bool = False, hlo_dump_dir: str = "",
                     profile_dir: str = "", profile_steps: int = 3, compile_only: bool = False,
                     seed: int = 0) -> Settings:
  """Fills "" / 0 with the backend's defaults and checks every value, naming the flag that is wrong."""
  defaults = CPU_DEFAULTS if platform == "cpu" else ACCELERATOR_DEFAULTS

  def names(flag, value, allowed):
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in allowed]
    if bad:
      raise ValueError(f"--{flag}={value!r}: unknown {bad}; expected some of {list(allowed)}")
    return items

  def sizes(flag, value, default):
    if not value:
      return tuple(default)
    try:
      items = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as e:
      raise ValueError(f"--{flag}={value!r}: expected comma-separated positive integers") from e
    if not items or min(items) < 1:
      raise ValueError(f"--{flag}={value!r}: expected comma-separated positive integers")
    return items

  section_list = names("sections", sections, SECTIONS)
  if dtypes:
    dtype_list = names("dtypes", dtypes, tuple(fcnet.DTYPES))
  else:  # The comparison that matters on accelerators is bf16 vs fp32; on CPU only the configured one.
    dtype_list = (config.model.dtype,) if platform == "cpu" else ("bfloat16", "float32")
  for flag, value in (("repeats", repeats), ("calls_per_repeat", calls_per_repeat),
                      ("latency_repeats", latency_repeats), ("matmul_size", matmul_size),
                      ("warmup", warmup), ("stage_batch_size", stage_batch_size), ("profile_steps", profile_steps)):
    if value < 0:
      raise ValueError(f"--{flag}={value}: must be ≥ 0")
  train_sizes = sizes("train_batch_sizes", train_batch_sizes, defaults["train_batch_sizes"])
  infer_sizes = sizes("infer_batch_sizes", infer_batch_sizes, defaults["infer_batch_sizes"])
  diagnose = None
  if diagnose_variant:
    match = re.fullmatch(r"(\w+):(\d+)", diagnose_variant)
    if not match or match.group(1) not in dtype_list or int(match.group(2)) not in train_sizes:
      raise ValueError(f"--diagnose_variant={diagnose_variant!r}: expected DTYPE:BATCH among the train variants "
                       f"{[f'{d}:{b}' for d in dtype_list for b in train_sizes]}")
    diagnose = (match.group(1), int(match.group(2)))
  elif (hlo_report or profile_dir) and "train" in section_list:
    diagnose = (dtype_list[0], max(train_sizes))
  if hlo_report and "train" not in section_list:
    raise ValueError("--hlo_report diagnoses a train variant: add 'train' to --sections")
  if profile_dir and not {"train", "infer"} & set(section_list):
    raise ValueError("--profile_dir traces the diagnosed train variant and the smallest inference batch: add "
                     "'train' or 'infer' to --sections")
  # The latency-critical inference variant (batch 1 by default) is traced too: its time is launch-bound.
  profile_infer = (dtype_list[0], min(infer_sizes)) if profile_dir and "infer" in section_list else None
  return Settings(
      sections=section_list, dtypes=dtype_list, train_batch_sizes=train_sizes, infer_batch_sizes=infer_sizes,
      repeats=repeats or defaults["repeats"], calls_per_repeat=calls_per_repeat or defaults["calls_per_repeat"],
      warmup=warmup, latency_repeats=latency_repeats or defaults["latency_repeats"],
      matmul_size=matmul_size or defaults["matmul_size"], stage_batch_size=stage_batch_size or max(infer_sizes),
      stage_modes=names("stage_modes", stage_modes, STAGE_MODES), diagnose_variant=diagnose,
      profile_infer_variant=profile_infer,
      hlo_report=hlo_report, hlo_dump_dir=hlo_dump_dir, profile_dir=profile_dir, profile_steps=profile_steps,
      compile_only=compile_only, seed=seed)


# ----------------------------------------------------------------------------------------------------- inputs


def synthetic_batch(rng: np.random.Generator, batch_size: int, image_size: int,
                    context_length: int) -> Dict[str, np.ndarray]:
  """A host batch shaped like `input_pipeline`'s training batches (never all zeros: zeros can time faster).

  image B×S×S×3 uint8 noise; mask B×S×S uint8 0/1 with a random rectangle per example; tokens B×L int32
  [SOS] words [EOS] 0…; valid B bool (all True).
  """
  images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
  masks = np.zeros((batch_size, image_size, image_size), np.uint8)
  tokens = np.zeros((batch_size, context_length), np.int32)
  for b in range(batch_size):
    top, left = rng.integers(0, image_size // 2, 2)
    height, width = rng.integers(image_size // 8, image_size // 2, 2)
    masks[b, top:top + height, left:left + width] = 1
    words = int(rng.integers(1, context_length - 1))
    tokens[b, 0] = SOS
    tokens[b, 1:words + 1] = rng.integers(1, 49000, words)
    tokens[b, words + 1] = EOS
  return {"image": images, "mask": masks, "tokens": tokens, "valid": np.ones((batch_size,), bool)}


def random_variables(abstract: Any, seed: int) -> Any:
  """NumPy variables for the shapes in `abstract` (from `summary.abstract_variables`), drawn on the host.

  The model's own initialisers are skipped on purpose: jitting `model.init` compiles one threefry expansion per
  parameter (79 s for the tiny config on 2 CPU cores). Scales keep activations finite through the deep trunk:
  normals with std 1/√fan_in for kernels, 0.02 for embeddings, ones for norm scales and variances, zeros for
  biases and means.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    shape = tuple(leaf.shape)
    if name in ("scale", "var"):
      return np.ones(shape, np.float32)
    if name in ("bias", "mean"):
      return np.zeros(shape, np.float32)
    if name in ("embedding", "positional_embedding"):
      std = 0.02
    elif len(shape) == 3 and name == "kernel":  # DenseGeneral: (in, heads, head_dim) or (heads, head_dim, out).
      parent = str(getattr(path[-2], "key", path[-2])) if len(path) > 1 else ""
      std = 1.0 / np.sqrt(shape[0] * shape[1] if parent in ("out", "c_proj") else shape[0])
    else:
      std = 1.0 / np.sqrt(max(int(np.prod(shape[:-1])), 1))
    return (rng.standard_normal(shape) * std).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def create_benchmark_state(config: ml_collections.ConfigDict, model: fcnet.FCNet, mesh: jax.sharding.Mesh,
                           seed: int) -> train.TrainState:
  """A replicated `train.TrainState` with random weights and the real optimiser (`train.create_optimizer`)."""
  variables = random_variables(summary.abstract_variables(model), seed)
  learning_rate_fn = train.create_learning_rate_fn(config, steps_per_epoch=1000, total_steps=50_000)
  tx = train.create_optimizer(config, learning_rate_fn)

  def create(params, batch_stats, rng):
    return train.TrainState.create(apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats,
                                   dropout_rng=rng)

  return jax.jit(create, out_shardings=sharding.replicated_sharding(mesh))(
      variables["params"], variables.get("batch_stats", {}), jax.random.key(seed))


def model_with_dtype(config: ml_collections.ConfigDict, dtype: str) -> fcnet.FCNet:
  model_config = config.model.to_dict()
  model_config["dtype"] = dtype
  return fcnet.build_model(model_config)


# ----------------------------------------------------------------------------------------------------- timing


def time_calls(call: Callable[[], Any], repeats: int, calls_per_repeat: int) -> List[float]:
  """Seconds per call, one value per repeat: `calls_per_repeat` calls back to back, then one wait for all."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    outputs = [call() for _ in range(calls_per_repeat)]
    jax.block_until_ready(outputs)
    times.append((time.perf_counter() - start) / calls_per_repeat)
  return times


def time_latency(call: Callable[[], Any], repeats: int) -> List[float]:
  """Seconds from dispatch to ready for each of `repeats` single, synchronous calls."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return times


def timing_stats(seconds: Sequence[float]) -> Dict[str, float]:
  values = np.asarray(seconds, np.float64)
  return {"median_s": float(np.median(values)), "p90_s": float(np.percentile(values, 90)),
          "min_s": float(values.min()), "n": int(values.size)}


def memory_in_use() -> Dict[str, Optional[int]]:
  """Bytes in use and the process's peak so far on the first local device (None where not reported: CPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  stats = stats or {}
  return {"bytes_in_use": stats.get("bytes_in_use"), "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
          "bytes_limit": stats.get("bytes_limit")}


def compiled_memory(compiled: Any) -> Optional[Dict[str, float]]:
  """XLA's static buffer assignment for one device: arguments + outputs − aliased (donated) + temporaries."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if analysis is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
  out = {f: int(getattr(analysis, f, 0) or 0) for f in fields}
  out["total_gib"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"]
                      + out["temp_size_in_bytes"]) / GIB
  return out


def cost_flops(lowered_or_compiled: Any) -> Optional[float]:
  try:
    cost = lowered_or_compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


def git_commit(path: str) -> Dict[str, Any]:
  """The commit measured: $FCNET_COMMIT where set (a copied tree, e.g. on a lent machine, can hold a stale .git),
  else HEAD of the repository holding `path` and whether the tree has changes (None where git is unavailable)."""
  declared = os.environ.get("FCNET_COMMIT")
  if declared:
    return {"commit": declared, "dirty": None, "commit_source": "FCNET_COMMIT"}
  def git(*args):
    return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, timeout=20, check=True).stdout
  try:
    return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(git("status", "--porcelain").strip())}
  except Exception:  # pylint: disable=broad-except
    return {"commit": None, "dirty": None}


# ----------------------------------------------------------------------------------------------------- matmul


def measure_matmul_peak(dtype: str, size: int, repeats: int, calls_per_repeat: int,
                        warmup: int) -> Dict[str, Any]:
  """FLOP/s of one size×size×size `jnp.dot` in `dtype` (random data, default precision, as the model uses)."""
  key_a, key_b = jax.random.split(jax.random.key(1))
  a = jax.random.normal(key_a, (size, size), fcnet.DTYPES[dtype])
  b = jax.random.normal(key_b, (size, size), fcnet.DTYPES[dtype])
  dot = jax.jit(jnp.dot).lower(a, b).compile()
  for _ in range(max(warmup, 1)):
    jax.block_until_ready(dot(a, b))
  stats = timing_stats(time_calls(lambda: dot(a, b), repeats, calls_per_repeat))
  flops = 2.0 * size ** 3
  return {"size": size, **stats, "tflops": flops / stats["median_s"] / 1e12,
          "default_matmul_precision": str(getattr(jax.config, "jax_default_matmul_precision", None))}


# ----------------------------------------------------------------------------------------------------- stages


def _stage_image(module: fcnet.FCNet, images, train_mode):
  return module.encode_image(images, train_mode)


def _stage_text(module: fcnet.FCNet, tokens):
  return module.encode_text(tokens)


def _stage_fusion(module: fcnet.FCNet, f_v2, f_v3, f_v4, f_t, eos, padding_mask, train_mode):
  """Vision neck → EGM → ECM exactly as `FCNet.__call__`: (F_v B×H/16×W/16×C, memory B×M×C, memory mask)."""
  text_mask = jnp.logical_not(padding_mask)
  f_v = module.neck(f_v2, f_v3, f_v4, train_mode)
  if module.use_egm:
    memory = module.emphasis_generation(f_v, f_t, text_mask, train_mode)
    if module.use_ecm:
      memory = module.emphasis_calibration(memory, module.text_global_proj(eos))
    return f_v, memory, None
  return f_v, module.word_proj(f_t), text_mask


def _stage_decoder(module: fcnet.FCNet, f_v, memory, memory_mask, train_mode):
  return module.decoder(f_v, memory, memory_mask, train_mode)


def _stage_head(module: fcnet.FCNet, f_q, train_mode):
  return module.mask_head(f_q, train_mode)


# name → (method, top-level parameter modules it owns); inputs of each stage are outputs of earlier ones.
STAGES = collections.OrderedDict([
    ("image_encoder", (_stage_image, ("image_encoder",))),
    ("text_encoder", (_stage_text, ("text_encoder",))),
    ("fusion", (_stage_fusion, ("neck", "emphasis_generation", "text_global_proj", "emphasis_calibration",
                                "word_proj"))),
    ("decoder", (_stage_decoder, ("decoder",))),
    ("mask_head", (_stage_head, ("mask_head",))),
])


def stage_inputs(name: str, images, tokens, outputs: Mapping[str, Any], train_mode: bool) -> Tuple[Any, ...]:
  """Positional arguments of stage `name` (after the module) given earlier stages' outputs."""
  if name == "image_encoder":
    return (images, train_mode)
  if name == "text_encoder":
    return (tokens,)
  if name == "fusion":
    return (*outputs["image_encoder"], *outputs["text_encoder"], train_mode)
  if name == "decoder":
    return (*outputs["fusion"], train_mode)
  return (outputs["decoder"], train_mode)


def stage_forward_fn(model: fcnet.FCNet, name: str) -> Callable[..., Any]:
  """jit-able (variables, *inputs) → the stage's outputs with running BatchNorm statistics (inference)."""
  method = STAGES[name][0]
  def forward(variables, *args):
    return model.apply(variables, *args, method=method)
  return forward


def stage_train_fn(model: fcnet.FCNet, name: str) -> Callable[..., Any]:
  """jit-able (variables, dropout_rng, cotangent_key, *inputs) → (gradients of the stage's own parameters,
  gradients of its floating inputs).

  Forward in training mode (batch statistics, dropout) and the backward pass for a random normal cotangent per
  floating output (drawn from `cotangent_key` split once per output, inside the timed function). Only the stage's
  own parameters and its incoming activations are differentiated (not the images, as in the train step), so no
  zero gradients of other modules are written.
  """
  method, owned = STAGES[name]

  def forward_backward(variables, dropout_rng, cotangent_key, *args):
    params = variables["params"]
    own = {k: v for k, v in params.items() if k in owned}
    others = {k: v for k, v in params.items() if k not in owned}
    leaves, treedef = jax.tree.flatten(args)
    # Activations between stages get gradients; the input images do not (as in the train step).
    float_positions = [i for i, x in enumerate(leaves) if name != "image_encoder"
                       and isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)]

    def f(own_params, float_leaves):
      merged = list(leaves)
      for position, value in zip(float_positions, float_leaves):
        merged[position] = value
      out, _ = model.apply({"params": {**others, **own_params}, "batch_stats": variables["batch_stats"]},
                           *jax.tree.unflatten(treedef, merged), method=method, mutable=["batch_stats"],
                           rngs={"dropout": dropout_rng})
      return [x for x in jax.tree.leaves(out) if jnp.issubdtype(x.dtype, jnp.floating)]

    out, vjp = jax.vjp(f, own, [leaves[i] for i in float_positions])
    keys = jax.random.split(cotangent_key, len(out))
    cotangents = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, out)]
    return vjp(cotangents)

  return forward_backward


def static_train_argnums(name: str, num_args: int) -> Tuple[int, ...]:
  """Index in (variables, *inputs) of the bool `train` argument (static under jit): the last input."""
  return () if name == "text_encoder" else (num_args,)


# ----------------------------------------------------------------------------------------------------- HLO


@dataclasses.dataclass
class HloInstruction:
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


def _parse_instruction(line: str, computation: str) -> Optional[HloInstruction]:
  if line.startswith("ROOT "):
    line = line[5:]
  name, sep, rest = line.partition(" = ")
  if not sep:
    return None
  rest = rest.lstrip()
  if rest.startswith("("):  # Tuple shape: skip to the matching parenthesis.
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        break
    shape, rest = rest[:i + 1], rest[i + 1:].lstrip()
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
  depth = 0
  for i in range(start, len(line)):
    depth += line[i] == "{"
    depth -= line[i] == "}"
    if depth == 0:
      return line[start + 1:i]
  return ""


def _element_type(shape: str) -> str:
  match = re.search(r"\b(bf16|f16|f32|f64|s8|u8|s32|u32|s64|u64|pred|f8\w*)\[", shape)
  return match.group(1) if match else "?"


def _elements(shape: str) -> int:
  match = re.search(r"\[([\d,]*)\]", shape)
  if not match or not match.group(1):
    return 1
  return int(np.prod([int(d) for d in match.group(1).split(",")]))


_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "s8": 1, "u8": 1, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
          "pred": 1}
HOST_OPCODES = ("infeed", "outfeed", "send", "recv", "send-done", "recv-done")
COLLECTIVE_OPCODES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
                      "all-reduce-start", "all-gather-start", "collective-permute-start")


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
  fused = set(fusion_kinds) | {name for insts in computations.values() for inst in insts
                               for name in re.findall(r"to_apply=%?([\w.\-]+)", inst.text)}
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
      "transpose_copy_gib": move_bytes / GIB,
      "transposes_all": opcodes.get("transpose", 0),
      "custom_call_targets": dict(targets),
      "host_transfers": host_transfers,
      "collectives": {op: opcodes[op] for op in COLLECTIVE_OPCODES if opcodes.get(op)},
      "while_loops": opcodes.get("while", 0),
      "attention_fused_kernels": attention_kernels,
      "attention_implementation": ("cuDNN fused attention (fMHA custom call)" if attention_kernels else
                                   "XLA einsum + softmax (logits B×heads×T×S materialised)"),
      "input_output_aliases": aliases.count("-alias)"),
      "buffer_donors": donors.count("("),
  }
  if expect_dtype is not None and expect_dtype != "float32":
    report["f32_convs_and_matmuls"] = len(f32_compute)
    report["f32_examples"] = [name for name, _ in collections.Counter(
        _short_op_name(n) for n in f32_compute).most_common(examples)]
  return report


def _short_op_name(op_name: str) -> str:
  """Drops the jit/transpose wrappers of a JAX op_name, keeping the module path."""
  parts = [p for p in op_name.split("/") if not p.startswith(("jit(", "jvp(", "transpose(", "vmap("))]
  return "/".join(parts[-4:])


# ----------------------------------------------------------------------------------------------------- profile


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
  lowered = name.lower()
  for category, pattern in PROFILE_CATEGORIES:
    if re.search(pattern, lowered):
      return category
  return "other"


def hlo_categories(text: str) -> Dict[str, str]:
  """Top-level HLO instruction name → category (what a fusion computes decides the fusion's category)."""
  computations, _, fusion_kinds = parse_hlo(text)
  body_category = {}
  for name in fusion_kinds:
    opcodes = {inst.opcode for inst in computations.get(name, [])}
    body_category[name] = ("convolution" if "convolution" in opcodes else "matmul" if "dot" in opcodes else
                           "reduction" if opcodes & {"reduce", "reduce-window"} else
                           "transpose/copy" if opcodes <= {"parameter", "transpose", "copy", "bitcast"} else
                           "elementwise fusion")
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
  """"%fusion.12 = bf16[…] fusion(…)" or "fusion.12" → "fusion.12"."""
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
      "file": files[-1], "source": source, "steps": steps, "total_ms": total_ms,
      "per_step_ms": total_ms / max(steps, 1), "ops_per_step": sum(n for _, n in ops.values()) / max(steps, 1),
      "categories_ms_per_step": {k: v / max(steps, 1) for k, v in
                                 sorted(categories.items(), key=lambda item: -item[1])},
      "top_ops": [{"name": name[:120], "category": names.get(_hlo_name(name), categorize(name)),
                   "ms_per_step": ms / max(steps, 1), "share": ms / total_ms if total_ms else None, "count": n}
                  for name, (ms, n) in ranked],
  }
  if by_name and kernels:
    kernel_total = sum(ms for ms, _ in kernels.values())
    result["top_kernels"] = [{"name": name[:120], "ms_per_step": ms / max(steps, 1),
                              "share": ms / kernel_total if kernel_total else None, "count": n}
                             for name, (ms, n) in sorted(kernels.items(), key=lambda item: -item[1][0])[:top]]
  return result


# ----------------------------------------------------------------------------------------------------- runner


class Benchmark:
  """Runs the sections for one config and keeps every number in `self.results` (written to `out`)."""

  def __init__(self, config: ml_collections.ConfigDict, settings: Settings, out: str = "",
               config_name: str = ""):
    self.config, self.settings, self.out = config, settings, out
    self.mesh = sharding.create_mesh()
    self.devices = jax.device_count()
    self.model = fcnet.build_model(config.model)
    device = jax.local_devices()[0]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    self.results: Dict[str, Any] = {
        "config": config_name, "backend": jax.default_backend(), "device_kind": device.device_kind,
        "device_count": self.devices, "process_count": jax.process_count(),
        "jax_version": jax.__version__, "jaxlib_version": _jaxlib_version(),
        "flax_version": flax.__version__, "python": sys.version.split()[0], **git_commit(repo),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {k: v for k, v in dataclasses.asdict(settings).items()},
        "model": {}, "matmul_peak": {}, "train": [], "inference": [], "stages": {}, "diagnostics": {},
        "errors": [],
    }
    self.forward_flops = None
    self._lowered = None  # Of the variant compiled last (its HLO report needs it).
    self._compiled_text = None

  # -- bookkeeping

  def save(self):
    self.results["tensorflow_loaded"] = "tensorflow" in sys.modules
    if self.out:
      os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
      tmp = f"{self.out}.tmp"
      with open(tmp, "w") as f:
        json.dump(self.results, f, indent=2, default=str)
      os.replace(tmp, self.out)

  def log(self, message: str):
    print(f"[benchmark] {message}", flush=True)

  # -- sections

  def run(self) -> Dict[str, Any]:
    self.describe_model()
    state = create_benchmark_state(self.config, self.model, self.mesh, self.settings.seed)
    rng = np.random.default_rng(self.settings.seed)
    # dtype-major, training first (the targets' numbers come first under a time limit), ascending batch: the
    # process's peak memory after a training variant is then that variant's own peak, the largest so far.
    # (After training, inference's `peak_bytes_in_use` is that high-water mark; its `xla_memory` is its own.)
    for dtype in self.settings.dtypes:
      if "train" in self.settings.sections:
        for batch in sorted(self.settings.train_batch_sizes):
          result = self._guarded(f"train {dtype} b{batch}", lambda: self.run_train(state, dtype, batch, rng))
          if result is not None:
            state = result
          elif any(x.is_deleted() for x in jax.tree.leaves(state)):  # Donated, then the variant failed.
            state = create_benchmark_state(self.config, self.model, self.mesh, self.settings.seed)
      if "infer" in self.settings.sections:
        for batch in self.settings.infer_batch_sizes:
          self._guarded(f"infer {dtype} b{batch}", lambda: self.run_infer(state, dtype, batch, rng))
    if "stages" in self.settings.sections:
      for dtype in self.settings.dtypes[:1]:
        self._guarded(f"stages {dtype}", lambda: self.run_stages(state, dtype, rng))
    if "matmul" in self.settings.sections:
      for dtype in self.settings.dtypes:
        self._guarded(f"matmul {dtype}", lambda: self.run_matmul(dtype))
    self.fill_utilisation()
    self.results["targets"] = check_targets(self.results)
    self.save()
    return self.results

  def _guarded(self, what: str, fn: Callable[[], Any]) -> Any:
    """Runs one variant; an error (e.g. out of memory at batch 32) is recorded and the run goes on."""
    try:
      result = fn()
    except Exception as e:  # pylint: disable=broad-except
      message = f"{what}: {type(e).__name__}: {str(e)[:2000]}"
      self.log(f"FAILED {message}")
      self.results["errors"].append(message)
      result = None
    self.save()
    return result

  def describe_model(self):
    variables = summary.abstract_variables(self.model)
    per_module = {name: int(sum(np.prod(x.shape) for x in jax.tree.leaves(sub)))
                  for name, sub in variables["params"].items()}
    self.forward_flops = summary.forward_flops(self.model, variables)
    self.results["model"] = {
        "params": int(sum(per_module.values())), "params_per_module": per_module,
        "forward_gflops_per_image": self.forward_flops / 1e9, "image_size": self.model.image_size,
        "context_length": self.model.context_length, "config_dtype": self.model.dtype,
        "flops_note": "XLA cost analysis of the inference forward pass at batch 1; a multiply-add counts 2"}
    self.log(f"model: {self.results['model']['params'] / 1e6:.2f} M parameters, "
             f"{self.forward_flops / 1e9:.3f} GFLOPs per image")

  def _batch(self, rng, per_device_batch: int) -> Dict[str, jax.Array]:
    local = per_device_batch * jax.local_device_count()
    host = synthetic_batch(rng, local, self.model.image_size, self.model.context_length)
    return sharding.global_batch(host, self.mesh)

  def run_infer(self, state: train.TrainState, dtype: str, per_device_batch: int, rng):
    s = self.settings
    model = model_with_dtype(self.config, dtype)
    state = state.for_inference()  # What Trainer.evaluate passes too: no optimiser moments to flatten per call.
    batch = self._batch(rng, per_device_batch)
    predict = jax.jit(functools.partial(train.predict_step, model=model),
                      in_shardings=(sharding.replicated_sharding(self.mesh), sharding.batch_sharding(self.mesh)),
                      out_shardings=sharding.batch_sharding(self.mesh))
    result = {"dtype": dtype, "per_device_batch": per_device_batch,
              "global_batch": per_device_batch * self.devices, "memory_before": memory_in_use()}
    with sharding.use_mesh(self.mesh):
      compiled = self._compile(predict, (state, batch), result)
    if not s.compile_only:
      call = lambda: compiled(state, batch)
      with sharding.use_mesh(self.mesh):
        for _ in range(max(s.warmup, 1)):
          jax.block_until_ready(call())
        throughput = timing_stats(time_calls(call, s.repeats, s.calls_per_repeat))
        latency = timing_stats(time_latency(call, s.latency_repeats))
      result.update({
          "call_s": throughput, "images_per_s": result["global_batch"] / throughput["median_s"],
          "latency_ms_median": latency["median_s"] * 1e3, "latency_ms_p90": latency["p90_s"] * 1e3,
          "latency_ms_min": latency["min_s"] * 1e3})
      result["achieved_tflops"] = self.forward_flops * result["images_per_s"] / 1e12
      if s.profile_dir and s.profile_infer_variant == (dtype, per_device_batch):
        with sharding.use_mesh(self.mesh):
          self._diagnostic("profile_infer", lambda: self.profile(call, compiled, result, "profile_infer",
                                                                 result["call_s"]["median_s"]))
    result["memory"] = memory_in_use()
    self.results["inference"].append(result)
    self.log(_variant_line("infer", result))
    del batch

  def run_train(self, state: train.TrainState, dtype: str, per_device_batch: int, rng) -> train.TrainState:
    s = self.settings
    model = model_with_dtype(self.config, dtype)
    batch = self._batch(rng, per_device_batch)
    step = train.jit_train_step(self.config, model, self.mesh)
    result = {"dtype": dtype, "per_device_batch": per_device_batch,
              "global_batch": per_device_batch * self.devices}
    result["memory_before"] = memory_in_use()
    with sharding.use_mesh(self.mesh):
      compiled = self._compile(step, (state, batch), result)
    diagnose = s.diagnose_variant == (dtype, per_device_batch)
    if diagnose and s.hlo_report:
      self._diagnostic("hlo", lambda: self.report_hlo(compiled, dtype, per_device_batch,
                                                      len(jax.tree.leaves(state))))
    if s.compile_only:
      result["memory"] = memory_in_use()
      self.results["train"].append(result)
      self.log(_variant_line("train", result))
      return state
    holder = {"state": state}

    def call():
      holder["state"], metrics = compiled(holder["state"], batch)
      return metrics

    with sharding.use_mesh(self.mesh):
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(max(s.warmup, 1)):
          jax.block_until_ready(call())
      result["donation_warnings"] = [str(w.message)[:300] for w in caught if "donat" in str(w.message).lower()]
      times = timing_stats(time_calls(call, s.repeats, s.calls_per_repeat))
      result.update({"step_s": times, "images_per_s": result["global_batch"] / times["median_s"]})
      result["achieved_tflops"] = 3 * self.forward_flops * result["images_per_s"] / 1e12
      result["memory"] = memory_in_use()
      if diagnose and s.profile_dir:
        self._diagnostic("profile", lambda: self.profile(call, compiled, result, "profile",
                                                         result["step_s"]["median_s"], self._compiled_text))
    self.results["train"].append(result)
    self.log(_variant_line("train", result))
    del batch
    return holder["state"]

  def _compile(self, jitted, args, result: Dict[str, Any]):
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    result.update({"lower_s": lowered_at - start, "compile_s": time.perf_counter() - lowered_at,
                   "xla_memory": compiled_memory(compiled)})
    flops = cost_flops(lowered)
    if flops is not None:
      result["xla_gflops_per_image"] = flops / result["global_batch"] / 1e9
    self._lowered = lowered  # Kept for the HLO report of this variant.
    return compiled

  def _diagnostic(self, name: str, fn: Callable[[], Any]):
    """A failing diagnostic is recorded without losing the timings of its variant."""
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      self.log(f"diagnostic {name} failed: {type(e).__name__}: {e}")
      self.results["diagnostics"][name] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}

  def report_hlo(self, compiled, dtype: str, per_device_batch: int, state_leaves: int):
    compiled_text = compiled.as_text()
    lowered_text = self._lowered.as_text(dialect="hlo", debug_info=True)
    report = {"variant": f"{dtype}:{per_device_batch}", "state_leaves": state_leaves,
              "lowered": hlo_report(lowered_text, dtype), "compiled": hlo_report(compiled_text, dtype)}
    self.results["diagnostics"]["hlo"] = report
    self._compiled_text = compiled_text
    if self.settings.hlo_dump_dir:
      os.makedirs(self.settings.hlo_dump_dir, exist_ok=True)
      for kind, text in (("lowered", lowered_text), ("compiled", compiled_text)):
        with open(os.path.join(self.settings.hlo_dump_dir, f"train_{dtype}_b{per_device_batch}.{kind}.hlo"),
                  "w") as f:
          f.write(text)
    self.save()

  def profile(self, call: Callable[[], Any], compiled, result: Dict[str, Any], name: str, timed_s: float,
              hlo_text: Optional[str] = None):
    """Traces `profile_steps` calls into <profile_dir>/<name> and keeps the summary as diagnostics[name].

    `busy_fraction` (device time of the ops / the timed call) well below 1 with many ops per step means the
    call is bound by launching kernels (host), not by the device's arithmetic or memory.
    """
    s = self.settings
    trace_dir = os.path.join(s.profile_dir, name)
    jax.block_until_ready(call())
    with jax.profiler.trace(trace_dir):
      outputs = [call() for _ in range(s.profile_steps)]
      jax.block_until_ready(outputs)
    hlo_text = hlo_text or compiled.as_text()  # The HLO report's text of this variant, where it made one.
    summary_ = summarize_profile(trace_dir, s.profile_steps, hlo_text)
    summary_["variant"] = f"{result['dtype']}:{result['per_device_batch']}"
    summary_["timed_step_ms"] = timed_s * 1e3
    if summary_.get("per_step_ms"):
      summary_["busy_fraction"] = summary_["per_step_ms"] / summary_["timed_step_ms"]
    self.results["diagnostics"][name] = summary_

  def run_matmul(self, dtype: str):
    s = self.settings
    self.results["matmul_peak"][dtype] = measure_matmul_peak(dtype, s.matmul_size, s.repeats,
                                                             s.calls_per_repeat, s.warmup)
    self.log(f"matmul {dtype} {s.matmul_size}³: {self.results['matmul_peak'][dtype]['tflops']:.3f} TFLOP/s")

  def run_stages(self, state: train.TrainState, dtype: str, rng):
    s = self.settings
    model = model_with_dtype(self.config, dtype)
    batch = self._batch(rng, s.stage_batch_size)
    images, tokens = train.model_inputs(batch, fcnet.DTYPES[dtype])
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    report = {"dtype": dtype, "per_device_batch": s.stage_batch_size,
              "global_batch": s.stage_batch_size * self.devices}
    # Forward in inference mode, stage by stage: each stage's outputs are the next one's inputs.
    outputs, forward_rows = {}, collections.OrderedDict()
    for name in STAGES:
      args = stage_inputs(name, images, tokens, outputs, False)
      static = static_train_argnums(name, len(args))
      lowered = jax.jit(stage_forward_fn(model, name), static_argnums=static).lower(variables, *args)
      compiled = lowered.compile()
      dynamic = _drop_static((variables, *args), static)
      outputs[name] = jax.block_until_ready(compiled(*dynamic))
      if "infer" in s.stage_modes:
        forward_rows[name] = self._stage_row(lowered, compiled, dynamic)
    modes = {}
    if "infer" in s.stage_modes:
      modes["infer"] = forward_rows
    if "train" in s.stage_modes:
      train_rows = collections.OrderedDict()
      for name in STAGES:  # Training-mode forward + backward, fed the same activations as above.
        args = stage_inputs(name, images, tokens, outputs, True)
        call_args = (variables, jax.random.key(2), jax.random.key(3), *args)
        static = tuple(i + 2 for i in static_train_argnums(name, len(args)))
        lowered = jax.jit(stage_train_fn(model, name), static_argnums=static).lower(*call_args)
        train_rows[name] = self._stage_row(lowered, lowered.compile(), _drop_static(call_args, static))
      train_rows["optimizer"] = self._time_optimizer(state)
      modes["train"] = train_rows
    for mode, rows in modes.items():
      total = sum(r["ms"] for r in rows.values())
      for row in rows.values():
        row["share"] = row["ms"] / total if total else None
      entry = {"stages": rows, "sum_ms": total}
      if mode == "infer":
        entry["forward_gflops_sum"] = sum(r["gflops"] or 0 for r in rows.values())
        entry["full_forward_ms"], entry["max_abs_diff_vs_full"] = self._full_forward(
            model, state, batch, outputs["mask_head"])
      report[mode] = entry
      self.log(f"stages {mode} {dtype} b{s.stage_batch_size}: " + ", ".join(
          f"{n} {r['ms']:.2f} ms" for n, r in rows.items()) + f" (sum {total:.2f} ms)")
    self.results["stages"] = report

  def _stage_row(self, lowered, compiled, args) -> Dict[str, Any]:
    s = self.settings
    jax.block_until_ready(compiled(*args))
    times = timing_stats(time_calls(lambda: compiled(*args), s.repeats, s.calls_per_repeat))
    flops = cost_flops(lowered)
    return {"ms": times["median_s"] * 1e3, "gflops": flops / 1e9 if flops else None,
            "achieved_tflops": flops / times["median_s"] / 1e12 if flops else None}

  def _full_forward(self, model, state, batch, stage_logits) -> Tuple[float, float]:
    """Time of the whole `predict_step` at the stage batch, and its difference from the chained stages."""
    s = self.settings
    predict = jax.jit(functools.partial(train.predict_step, model=model)).lower(state, batch).compile()
    probabilities = predict(state, batch)
    times = timing_stats(time_calls(lambda: predict(state, batch), s.repeats, s.calls_per_repeat))
    diff = float(jnp.max(jnp.abs(probabilities - jax.nn.sigmoid(stage_logits.astype(jnp.float32)))))
    return times["median_s"] * 1e3, diff

  def _time_optimizer(self, state: train.TrainState) -> Dict[str, Any]:
    """The Adam update of every parameter (`TrainState.apply_gradients`) for random gradients."""
    s = self.settings
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params)
    update = jax.jit(lambda st, g: st.apply_gradients(grads=g, batch_stats=st.batch_stats))
    lowered = update.lower(state, grads)
    compiled = lowered.compile()
    jax.block_until_ready(compiled(state, grads))
    times = timing_stats(time_calls(lambda: compiled(state, grads), s.repeats, s.calls_per_repeat))
    params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    return {"ms": times["median_s"] * 1e3, "gflops": None, "achieved_tflops": None,
            "gib_moved_estimate": params * 4 * 7 / GIB}  # Read p, g, m, v; write p, m, v (float32).

  def fill_utilisation(self):
    peaks = self.results["matmul_peak"]
    for row in self.results["train"] + self.results["inference"]:
      peak = peaks.get(row["dtype"], {}).get("tflops")
      achieved = row.get("achieved_tflops")
      row["matmul_peak_tflops"] = peak
      row["utilisation"] = achieved / peak if achieved and peak else None


def _drop_static(args: Sequence[Any], static: Sequence[int]) -> Tuple[Any, ...]:
  """A compiled (AOT) function takes only the non-static arguments."""
  return tuple(a for i, a in enumerate(args) if i not in static)


def _jaxlib_version() -> Optional[str]:
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top
    return jaxlib.__version__
  except Exception:  # pylint: disable=broad-except
    return None


def _gib(value: Optional[float]) -> str:
  return "-" if value is None else f"{value / GIB:.2f}"


def _fmt(value: Optional[float], spec: str = ".1f") -> str:
  return "-" if value is None else format(value, spec)


def _percent(fraction: Optional[float]) -> str:
  return "-" if fraction is None else f"{100 * fraction:.1f}%"


def _variant_line(kind: str, r: Mapping[str, Any]) -> str:
  speed = f"{r['images_per_s']:.1f} img/s" if "images_per_s" in r else "compiled only"
  return (f"{kind} {r['dtype']} batch {r['per_device_batch']}/device: {speed}, compile {r['compile_s']:.1f} s, "
          f"XLA memory {_fmt((r.get('xla_memory') or {}).get('total_gib'), '.2f')} GiB")


# The issue's targets for the R101 model on one H200 (the PyTorch CRIS R101 peer there: training 153.8 images/s
# bf16 at batch 32 and 57.7 fp16 at batch 8; inference 25 ms at batch 1 and 325.7 images/s at batch 32).
# (section, dtype or None = best measured dtype, per-device batch, field, comparison, bound)
TARGETS = (
    ("train", "bfloat16", 32, "images_per_s", ">=", 310.0),
    ("train", "bfloat16", 8, "images_per_s", ">=", 175.0),
    ("inference", None, 1, "latency_ms_median", "<=", 6.0),
    ("inference", None, 32, "images_per_s", ">=", 650.0),
    ("train", "bfloat16", 32, "memory_gib", "<=", 24.0),
)


def check_targets(results: Mapping[str, Any]) -> List[Dict[str, Any]]:
  """Each target with the measured value (None when not measured) and whether it is met.

  `memory_gib` is the device's peak (`peak_bytes_in_use`), or XLA's static estimate where the device reports
  none (CPU) — `memory_source` says which.
  """
  checks = []
  for section, dtype, batch, field, comparison, bound in TARGETS:
    rows = [r for r in results.get(section, []) if r["per_device_batch"] == batch
            and (dtype is None or r["dtype"] == dtype)]
    values = []
    for r in rows:
      if field == "memory_gib":
        peak = (r.get("memory") or {}).get("peak_bytes_in_use")
        value = peak / GIB if peak is not None else (r.get("xla_memory") or {}).get("total_gib")
        source = "peak_bytes_in_use" if peak is not None else "xla_memory_analysis"
      else:
        value, source = r.get(field), None
      if value is not None:
        values.append((value, r["dtype"], source))
    best = (min if comparison == "<=" else max)(values, default=None)
    check = {"section": section, "dtype": dtype or "any", "per_device_batch": batch, "field": field,
             "target": f"{comparison} {bound:g}", "value": best[0] if best else None,
             "measured_dtype": best[1] if best else None,
             "met": None if best is None else (best[0] <= bound if comparison == "<=" else best[0] >= bound)}
    if field == "memory_gib" and best:
      check["memory_source"] = best[2]
    checks.append(check)
  return checks


def format_table(results: Mapping[str, Any]) -> str:
  """The short summary printed last."""
  model = results["model"]
  lines = [f"FCNet benchmark — config {results['config'] or '?'} on {results['device_count']}× "
           f"{results['device_kind']} ({results['backend']}), jax {results['jax_version']}, "
           f"commit {(results.get('commit') or '?')[:10]}{'+' if results.get('dirty') else ''}",
           f"params {model.get('params', 0) / 1e6:.2f} M, forward {_fmt(model.get('forward_gflops_per_image'), '.2f')}"
           f" GFLOPs/image (XLA, multiply-add = 2)"]
  peaks = results["matmul_peak"]
  if peaks:
    lines.append("matmul peak: " + ", ".join(f"{d} {p['tflops']:.2f} TFLOP/s (n={p['size']})"
                                               for d, p in peaks.items()))
  header = (f"{'':6}{'dtype':>10}{'batch':>7}{'compile_s':>11}{'images/s':>11}{'ms/call':>10}"
            f"{'lat_med':>9}{'lat_p90':>9}{'TFLOP/s':>9}{'util':>7}{'peak_GiB':>10}{'xla_GiB':>9}")
  lines.append(header)
  for kind, rows in (("train", results["train"]), ("infer", results["inference"])):
    for r in rows:
      call = r.get("step_s") or r.get("call_s") or {}
      lines.append(
          f"{kind:6}{r['dtype']:>10}{r['per_device_batch']:>7}{r['compile_s']:>11.1f}"
          f"{_fmt(r.get('images_per_s')):>11}{_fmt(call.get('median_s') and call['median_s'] * 1e3, '.2f'):>10}"
          f"{_fmt(r.get('latency_ms_median'), '.2f'):>9}{_fmt(r.get('latency_ms_p90'), '.2f'):>9}"
          f"{_fmt(r.get('achieved_tflops'), '.3f'):>9}{_percent(r.get('utilisation')):>7}"
          f"{_gib((r.get('memory') or {}).get('peak_bytes_in_use')):>10}"
          f"{_fmt((r.get('xla_memory') or {}).get('total_gib'), '.2f'):>9}")
  stages = results.get("stages") or {}
  for mode in STAGE_MODES:
    if mode in stages:
      entry = stages[mode]
      lines.append(f"stages ({mode}, {stages['dtype']}, batch {stages['per_device_batch']}/device): " + ", ".join(
          f"{n} {r['ms']:.2f} ms ({100 * (r['share'] or 0):.0f}%)" for n, r in entry["stages"].items()))
  hlo = (results.get("diagnostics") or {}).get("hlo")
  if hlo:
    c = hlo["compiled"]
    lines.append(f"HLO ({hlo['variant']}): {c['fusions']} fusions, {c['convolutions']} convs "
                 f"{c['convolution_layouts']}, {c['transposes_top_level']} transposes + {c['copies_top_level']} "
                 f"copies ({c['transpose_copy_gib']:.2f} GiB), attention: {c['attention_implementation']}, "
                 f"host transfers {len(c['host_transfers'])}, aliased outputs {c['input_output_aliases']}/"
                 f"{hlo['state_leaves']} state leaves")
  for key, what in (("profile", "train"), ("profile_infer", "infer")):
    profile = (results.get("diagnostics") or {}).get(key)
    if profile and "categories_ms_per_step" in profile:
      busy = (f", {profile['ops_per_step']:.0f} ops, device busy {100 * profile['busy_fraction']:.0f}% of "
              f"{profile['timed_step_ms']:.2f} ms" if profile.get("busy_fraction") and "ops_per_step" in profile
              else "")
      lines.append(f"profile {what} ({profile['variant']}, {profile['per_step_ms']:.2f} ms/step on device{busy}): "
                   + ", ".join(f"{k} {v:.2f}" for k, v in list(profile["categories_ms_per_step"].items())[:6]))
  if str(results.get("config", "")).startswith("refcoco_r101"):
    for c in check_targets(results):
      verdict = {True: "met", False: "MISSED", None: "not measured"}[c["met"]]
      source = (f" (XLA's static estimate on {results['backend']}, not a device peak)"
                if c.get("memory_source") == "xla_memory_analysis" else "")
      lines.append(f"target {c['section']} {c['dtype']} batch {c['per_device_batch']} {c['field']} {c['target']}: "
                   f"{_fmt(c['value'], '.2f')} {verdict}{source}")
  for error in results.get("errors", []):
    lines.append(f"ERROR {error[:200]}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- CLI


def define_flags():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", "configs/tiny.py", "Configuration file (configs/*.py).")
  flags.DEFINE_string("out", "", "Write the results as JSON here (rewritten after every variant).")
  flags.DEFINE_string("sections", "train,infer,matmul", f"Comma-separated, of {list(SECTIONS)}.")
  flags.DEFINE_string("dtypes", "", "Compute dtypes; empty: bfloat16,float32 on accelerators, the config's on CPU.")
  flags.DEFINE_string("train_batch_sizes", "", "Per-device training batches; empty: 8,32 (accelerators), 8 (CPU).")
  flags.DEFINE_string("infer_batch_sizes", "", "Per-device inference batches; empty: 1,32 (accelerators), 1,8 (CPU).")
  flags.DEFINE_integer("repeats", 0, "Timed repeats per variant (median reported); 0: 20 (accelerators), 5 (CPU).")
  flags.DEFINE_integer("calls_per_repeat", 0, "Back-to-back calls per timed repeat; 0: 5 (accelerators), 2 (CPU).")
  flags.DEFINE_integer("warmup", 2, "Untimed calls after compiling.")
  flags.DEFINE_integer("latency_repeats", 0, "Synchronous inference calls timed one by one; 0: 100 / 20 (CPU).")
  flags.DEFINE_integer("matmul_size", 0, "n of the n×n×n peak matmul; 0: 8192 (accelerators), 1024 (CPU).")
  flags.DEFINE_integer("stage_batch_size", 0, "Per-device batch of the stage timing; 0: the largest inference batch.")
  flags.DEFINE_string("stage_modes", "infer", "Stage timing modes: infer (forward) and/or train (forward+backward).")
  flags.DEFINE_string("diagnose_variant", "", "DTYPE:BATCH train variant for --hlo_report/--profile_dir; empty: "
                      "the first dtype at the largest batch.")
  flags.DEFINE_bool("hlo_report", False, "Analyse the lowered and compiled HLO of the diagnosed train variant.")
  flags.DEFINE_string("hlo_dump_dir", "", "Also write that variant's HLO texts here.")
  flags.DEFINE_string("profile_dir", "", "Trace --profile_steps steps of the diagnosed train variant and of the "
                      "smallest inference batch here (subfolders profile/, profile_infer/) and summarise the "
                      "device time.")
  flags.DEFINE_integer("profile_steps", 3, "Steps inside the profiler trace.")
  flags.DEFINE_bool("compile_only", False, "Lower and compile only (compile time, XLA memory, HLO report).")
  flags.DEFINE_integer("seed", 0, "Seed of the random weights and batches.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  config = FLAGS.config
  config_file = config_flags.get_config_filename(FLAGS["config"])
  config_name = os.path.splitext(os.path.basename(config_file))[0]
  overrides = config_flags.get_override_values(FLAGS["config"])
  if overrides:
    config_name += " " + " ".join(f"{k}={v}" for k, v in flax.traverse_util.flatten_dict(
        overrides, sep=".").items())
  try:
    settings = resolve_settings(
        config, jax.default_backend(), sections=FLAGS.sections, dtypes=FLAGS.dtypes,
        train_batch_sizes=FLAGS.train_batch_sizes, infer_batch_sizes=FLAGS.infer_batch_sizes,
        repeats=FLAGS.repeats, calls_per_repeat=FLAGS.calls_per_repeat, warmup=FLAGS.warmup,
        latency_repeats=FLAGS.latency_repeats, matmul_size=FLAGS.matmul_size,
        stage_batch_size=FLAGS.stage_batch_size, stage_modes=FLAGS.stage_modes,
        diagnose_variant=FLAGS.diagnose_variant, hlo_report=FLAGS.hlo_report, hlo_dump_dir=FLAGS.hlo_dump_dir,
        profile_dir=FLAGS.profile_dir, profile_steps=FLAGS.profile_steps, compile_only=FLAGS.compile_only,
        seed=FLAGS.seed)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  benchmark = Benchmark(config, settings, FLAGS.out, config_name)
  results = benchmark.run()
  print(format_table(results), flush=True)
  if results["errors"]:
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
