"""How the benchmark measures: wall time of calls, device and XLA memory, and the matmul peak.

Compile and warm-up calls are excluded by the callers; each repeat issues calls back to back and waits for the
results with `block_until_ready`; numbers are medians over repeats.
"""

import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fcnet_jax.models import fcnet

GIB = 2.0**30


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
  """Median, 90th percentile, minimum and count of a list of durations."""
  values = np.asarray(seconds, np.float64)
  return {
    "median_s": float(np.median(values)),
    "p90_s": float(np.percentile(values, 90)),
    "min_s": float(values.min()),
    "n": int(values.size),
  }


def memory_in_use() -> Dict[str, Optional[int]]:
  """Bytes in use and the process's peak so far on the first local device (None where not reported: CPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  stats = stats or {}
  return {
    "bytes_in_use": stats.get("bytes_in_use"),
    "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
    "bytes_limit": stats.get("bytes_limit"),
  }


def compiled_memory(compiled: Any) -> Optional[Dict[str, float]]:
  """XLA's static buffer assignment for one device: arguments + outputs − aliased (donated) + temporaries."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if analysis is None:
    return None
  fields = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "temp_size_in_bytes",
    "generated_code_size_in_bytes",
  )
  out = {f: int(getattr(analysis, f, 0) or 0) for f in fields}
  out["total_gib"] = (
    out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"] + out["temp_size_in_bytes"]
  ) / GIB
  return out


def measure_matmul_peak(dtype: str, size: int, repeats: int, calls_per_repeat: int, warmup: int) -> Dict[str, Any]:
  """FLOP/s of one size×size×size `jnp.dot` in `dtype` (random data, default precision, as the model uses)."""
  key_a, key_b = jax.random.split(jax.random.key(1))
  a = jax.random.normal(key_a, (size, size), fcnet.DTYPES[dtype])
  b = jax.random.normal(key_b, (size, size), fcnet.DTYPES[dtype])
  dot = jax.jit(jnp.dot).lower(a, b).compile()
  for _ in range(max(warmup, 1)):
    jax.block_until_ready(dot(a, b))
  stats = timing_stats(time_calls(lambda: dot(a, b), repeats, calls_per_repeat))
  flops = 2.0 * size**3
  return {
    "size": size,
    **stats,
    "tflops": flops / stats["median_s"] / 1e12,
    "default_matmul_precision": str(getattr(jax.config, "jax_default_matmul_precision", None)),
  }
