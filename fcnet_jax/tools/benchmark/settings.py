"""The benchmark's options, defined once: each is a field of `Settings` with its flag default and help text.

`define_flags` turns the fields into absl flags, `resolve_settings` turns the flag values (strings, 0 = "the
backend's default") into the checked, typed `Settings` the runner reads.
"""

import dataclasses
import re
from typing import Any, Dict, Optional, Tuple

from absl import flags
import ml_collections

from fcnet_jax.models import fcnet

SECTIONS = ("train", "infer", "matmul", "stages")
STAGE_MODES = ("infer", "train")

# Defaults per backend: the full matrix on accelerators, a small one on CPU where compiling dominates.
ACCELERATOR_DEFAULTS = dict(
  train_batch_sizes=(8, 32),
  infer_batch_sizes=(1, 32),
  repeats=20,
  calls_per_repeat=5,
  latency_repeats=100,
  matmul_size=8192,
)
CPU_DEFAULTS = dict(
  train_batch_sizes=(8,), infer_batch_sizes=(1, 8), repeats=5, calls_per_repeat=2, latency_repeats=20, matmul_size=1024
)


def _option(flag_default: Any, help_text: str) -> Any:
  """A `Settings` field that is also a command-line flag (its type is the type of `flag_default`)."""
  return dataclasses.field(metadata={"flag_default": flag_default, "help": help_text})


@dataclasses.dataclass(frozen=True)
class Settings:
  """Resolved run settings: the flags with the backend's defaults filled in, checked."""

  sections: Tuple[str, ...] = _option("train,infer,matmul", f"Comma-separated, of {list(SECTIONS)}.")
  dtypes: Tuple[str, ...] = _option("", "Compute dtypes; empty: bfloat16,float32 on accelerators, the config's on CPU.")
  train_batch_sizes: Tuple[int, ...] = _option("", "Per-device training batches; empty: 8,32 (accelerators), 8 (CPU).")
  infer_batch_sizes: Tuple[int, ...] = _option(
    "", "Per-device inference batches; empty: 1,32 (accelerators), 1,8 (CPU)."
  )
  repeats: int = _option(0, "Timed repeats per variant (median reported); 0: 20 (accelerators), 5 (CPU).")
  calls_per_repeat: int = _option(0, "Back-to-back calls per timed repeat; 0: 5 (accelerators), 2 (CPU).")
  warmup: int = _option(2, "Untimed calls after compiling.")
  latency_repeats: int = _option(0, "Synchronous inference calls timed one by one; 0: 100 / 20 (CPU).")
  matmul_size: int = _option(0, "n of the n×n×n peak matmul; 0: 8192 (accelerators), 1024 (CPU).")
  stage_batch_size: int = _option(0, "Per-device batch of the stage timing; 0: the largest inference batch.")
  stage_modes: Tuple[str, ...] = _option(
    "infer", "Stage timing modes: infer (forward) and/or train (forward+backward)."
  )
  diagnose_variant: Optional[Tuple[str, int]] = _option(
    "", "DTYPE:BATCH train variant for --hlo_report/--profile_dir; empty: the first dtype at the largest batch."
  )
  hlo_report: bool = _option(False, "Analyse the lowered and compiled HLO of the diagnosed train variant.")
  hlo_dump_dir: str = _option("", "Also write that variant's HLO texts here.")
  profile_dir: str = _option(
    "",
    "Trace --profile_steps steps of the diagnosed train variant and of the smallest inference batch here "
    "(subfolders profile/, profile_infer/) and summarise the device time.",
  )
  profile_steps: int = _option(3, "Steps inside the profiler trace.")
  compile_only: bool = _option(False, "Lower and compile only (compile time, XLA memory, HLO report).")
  seed: int = _option(0, "Seed of the random weights and batches.")
  # Derived, not a flag: the latency-critical inference variant that --profile_dir traces too.
  profile_infer_variant: Optional[Tuple[str, int]] = None


def option_defaults() -> Dict[str, Any]:
  """Flag name → flag default, for every option."""
  return {f.name: f.metadata["flag_default"] for f in dataclasses.fields(Settings) if "flag_default" in f.metadata}


def define_flags(registry: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one absl flag per option in `registry` (its kind from the default's type)."""
  define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, str: flags.DEFINE_string}
  for field in dataclasses.fields(Settings):
    if "flag_default" in field.metadata:
      default = field.metadata["flag_default"]
      define[type(default)](field.name, default, field.metadata["help"], flag_values=registry)


def flag_values(parsed: flags.FlagValues = flags.FLAGS) -> Dict[str, Any]:
  """The parsed value of every option's flag."""
  return {name: parsed[name].value for name in option_defaults()}


def _names(flag: str, value: str, allowed: Tuple[str, ...]) -> Tuple[str, ...]:
  items = tuple(v.strip() for v in value.split(",") if v.strip())
  bad = [v for v in items if v not in allowed]
  if bad:
    raise ValueError(f"--{flag}={value!r}: unknown {bad}; expected some of {list(allowed)}")
  return items


def _sizes(flag: str, value: str, default: Tuple[int, ...]) -> Tuple[int, ...]:
  if not value:
    return tuple(default)
  try:
    items = tuple(int(v) for v in value.split(",") if v.strip())
  except ValueError:
    items = ()
  if not items or min(items) < 1:
    raise ValueError(f"--{flag}={value!r}: expected comma-separated positive integers")
  return items


def resolve_settings(config: ml_collections.ConfigDict, platform: str, **values: Any) -> Settings:
  """Flag values (any subset of the options; the rest take their flag defaults) → `Settings`.

  Fills "" / 0 with the backend's defaults and checks every value, raising ValueError naming the flag.
  """
  raw = option_defaults()
  unknown = sorted(set(values) - set(raw))
  if unknown:
    raise TypeError(f"unknown benchmark options {unknown}; expected some of {sorted(raw)}")
  raw.update(values)
  defaults = CPU_DEFAULTS if platform == "cpu" else ACCELERATOR_DEFAULTS
  sections = _names("sections", raw["sections"], SECTIONS)
  if raw["dtypes"]:
    dtypes = _names("dtypes", raw["dtypes"], tuple(fcnet.DTYPES))
  else:  # The comparison that matters on accelerators is bf16 vs fp32; on CPU only the configured one.
    dtypes = (config.model.dtype,) if platform == "cpu" else ("bfloat16", "float32")
  for flag in (
    "repeats",
    "calls_per_repeat",
    "latency_repeats",
    "matmul_size",
    "warmup",
    "stage_batch_size",
    "profile_steps",
  ):
    if raw[flag] < 0:
      raise ValueError(f"--{flag}={raw[flag]}: must be ≥ 0")
  train_sizes = _sizes("train_batch_sizes", raw["train_batch_sizes"], defaults["train_batch_sizes"])
  infer_sizes = _sizes("infer_batch_sizes", raw["infer_batch_sizes"], defaults["infer_batch_sizes"])
  hlo_report, profile_dir = raw["hlo_report"], raw["profile_dir"]
  diagnose = None
  if raw["diagnose_variant"]:
    match = re.fullmatch(r"(\w+):(\d+)", raw["diagnose_variant"])
    if not match or match.group(1) not in dtypes or int(match.group(2)) not in train_sizes:
      raise ValueError(
        f"--diagnose_variant={raw['diagnose_variant']!r}: expected DTYPE:BATCH among the train "
        f"variants {[f'{d}:{b}' for d in dtypes for b in train_sizes]}"
      )
    diagnose = (match.group(1), int(match.group(2)))
  elif (hlo_report or profile_dir) and "train" in sections:
    diagnose = (dtypes[0], max(train_sizes))
  if hlo_report and "train" not in sections:
    raise ValueError("--hlo_report diagnoses a train variant: add 'train' to --sections")
  if profile_dir and not {"train", "infer"} & set(sections):
    raise ValueError(
      "--profile_dir traces the diagnosed train variant and the smallest inference batch: add "
      "'train' or 'infer' to --sections"
    )
  # The latency-critical inference variant (batch 1 by default) is traced too: its time is launch-bound.
  profile_infer = (dtypes[0], min(infer_sizes)) if profile_dir and "infer" in sections else None
  return Settings(
    sections=sections,
    dtypes=dtypes,
    train_batch_sizes=train_sizes,
    infer_batch_sizes=infer_sizes,
    repeats=raw["repeats"] or defaults["repeats"],
    calls_per_repeat=raw["calls_per_repeat"] or defaults["calls_per_repeat"],
    warmup=raw["warmup"],
    latency_repeats=raw["latency_repeats"] or defaults["latency_repeats"],
    matmul_size=raw["matmul_size"] or defaults["matmul_size"],
    stage_batch_size=raw["stage_batch_size"] or max(infer_sizes),
    stage_modes=_names("stage_modes", raw["stage_modes"], STAGE_MODES),
    diagnose_variant=diagnose,
    hlo_report=hlo_report,
    hlo_dump_dir=raw["hlo_dump_dir"],
    profile_dir=profile_dir,
    profile_steps=raw["profile_steps"],
    compile_only=raw["compile_only"],
    seed=raw["seed"],
    profile_infer_variant=profile_infer,
  )
