"""The benchmark run: every section and variant for one config, each result saved as soon as it exists.

Variants run dtype-major, training first (the targets' numbers come first under a time limit), ascending batch:
the process's peak memory after a training variant is then that variant's own peak, the largest so far. (After
training, inference's `peak_bytes_in_use` is that high-water mark; its `xla_memory` is its own.) A variant that
fails (e.g. out of memory at batch 32) is recorded in `errors` and the run goes on.
"""

import dataclasses
import functools
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Optional
import warnings

import flax
import jax
import ml_collections
import numpy as np

from fcnet_jax import evaluate
from fcnet_jax import fileio
from fcnet_jax import sharding
from fcnet_jax import train
from fcnet_jax.models import fcnet
from fcnet_jax.tools import summary
from fcnet_jax.tools.benchmark import hlo
from fcnet_jax.tools.benchmark import inputs
from fcnet_jax.tools.benchmark import profile as profile_lib
from fcnet_jax.tools.benchmark import report
from fcnet_jax.tools.benchmark import settings as settings_lib
from fcnet_jax.tools.benchmark import stages
from fcnet_jax.tools.benchmark import timing


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


def _jaxlib_version() -> Optional[str]:
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top

    return jaxlib.__version__
  except Exception:  # pylint: disable=broad-except
    return None


class Benchmark:
  """Runs the sections for one config and keeps every number in `self.results` (written to `out`)."""

  def __init__(
    self, config: ml_collections.ConfigDict, settings: settings_lib.Settings, out: str = "", config_name: str = ""
  ):
    self.config, self.settings, self.out = config, settings, out
    self.mesh = sharding.create_mesh()
    self.devices = jax.device_count()
    self.model = fcnet.build_model(config.model)
    device = jax.local_devices()[0]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    self.results: Dict[str, Any] = {
      "config": config_name,
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "device_count": self.devices,
      "process_count": jax.process_count(),
      "jax_version": jax.__version__,
      "jaxlib_version": _jaxlib_version(),
      "flax_version": flax.__version__,
      "python": sys.version.split()[0],
      **git_commit(repo),
      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      "settings": dataclasses.asdict(settings),
      "model": {},
      "matmul_peak": {},
      "train": [],
      "inference": [],
      "stages": {},
      "diagnostics": {},
      "errors": [],
    }
    self.forward_flops = None
    self._lowered = None  # Of the variant compiled last (its HLO report needs it).
    self._compiled_text = None

  # -- bookkeeping

  def save(self):
    self.results["tensorflow_loaded"] = "tensorflow" in sys.modules
    if self.out:
      fileio.write_json(self.out, self.results)

  def log(self, message: str):
    print(f"[benchmark] {message}", flush=True)

  def _guarded(self, what: str, fn: Callable[[], Any]) -> Any:
    """Runs one variant; an error is recorded and the run goes on."""
    try:
      result = fn()
    except Exception as e:  # pylint: disable=broad-except
      message = f"{what}: {type(e).__name__}: {str(e)[:2000]}"
      self.log(f"FAILED {message}")
      self.results["errors"].append(message)
      result = None
    self.save()
    return result

  def _diagnostic(self, name: str, fn: Callable[[], Any]):
    """A failing diagnostic is recorded without losing the timings of its variant."""
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      self.log(f"diagnostic {name} failed: {type(e).__name__}: {e}")
      self.results["diagnostics"][name] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}

  # -- sections

  def run(self) -> Dict[str, Any]:
    """Every section of the settings; returns (and has saved) the results."""
    s = self.settings
    self.describe_model()
    state = inputs.create_benchmark_state(self.config, self.model, self.mesh, s.seed)
    rng = np.random.default_rng(s.seed)
    for dtype in s.dtypes:
      if "train" in s.sections:
        for batch in sorted(s.train_batch_sizes):
          result = self._guarded(f"train {dtype} b{batch}", functools.partial(self.run_train, state, dtype, batch, rng))
          if result is not None:
            state = result
          elif any(x.is_deleted() for x in jax.tree.leaves(state)):  # Donated, then the variant failed.
            state = inputs.create_benchmark_state(self.config, self.model, self.mesh, s.seed)
      if "infer" in s.sections:
        for batch in s.infer_batch_sizes:
          self._guarded(f"infer {dtype} b{batch}", functools.partial(self.run_infer, state, dtype, batch, rng))
    if "stages" in s.sections:
      for dtype in s.dtypes[:1]:
        self._guarded(f"stages {dtype}", functools.partial(self.run_stages, state, dtype, rng))
    if "matmul" in s.sections:
      for dtype in s.dtypes:
        self._guarded(f"matmul {dtype}", functools.partial(self.run_matmul, dtype))
    self.fill_utilisation()
    self.results["targets"] = report.check_targets(self.results)
    self.save()
    return self.results

  def describe_model(self):
    described = summary.model_summary(self.config.model)
    self.forward_flops = described["forward_gflops_per_image"] * 1e9
    self.results["model"] = {
      "params": described["params"],
      "params_per_module": described["params_per_module"],
      "forward_gflops_per_image": described["forward_gflops_per_image"],
      "image_size": self.model.image_size,
      "context_length": self.model.context_length,
      "config_dtype": self.model.dtype,
      "flops_note": "XLA cost analysis of the inference forward pass at batch 1; a multiply-add counts 2",
    }
    self.log(f"model: {described['params'] / 1e6:.2f} M parameters, {self.forward_flops / 1e9:.3f} GFLOPs per image")

  def _batch(self, rng: np.random.Generator, per_device_batch: int) -> Dict[str, jax.Array]:
    local = per_device_batch * jax.local_device_count()
    host = inputs.synthetic_batch(rng, local, self.model.image_size, self.model.context_length)
    return sharding.global_batch(host, self.mesh)

  def run_infer(self, state: train.TrainState, dtype: str, per_device_batch: int, rng: np.random.Generator):
    s = self.settings
    model = inputs.model_with_dtype(self.config, dtype)
    state = state.for_inference()  # What evaluation passes too: no optimiser moments to flatten per call.
    batch = self._batch(rng, per_device_batch)
    predict = jax.jit(
      functools.partial(evaluate.predict_step, model=model),
      in_shardings=(sharding.replicated_sharding(self.mesh), sharding.batch_sharding(self.mesh)),
      out_shardings=sharding.batch_sharding(self.mesh),
    )
    result = self._variant(dtype, per_device_batch)
    with sharding.use_mesh(self.mesh):
      compiled = self._compile(predict, (state, batch), result)
    if not s.compile_only:
      call = lambda: compiled(state, batch)
      with sharding.use_mesh(self.mesh):
        for _ in range(max(s.warmup, 1)):
          jax.block_until_ready(call())
        throughput = timing.timing_stats(timing.time_calls(call, s.repeats, s.calls_per_repeat))
        latency = timing.timing_stats(timing.time_latency(call, s.latency_repeats))
      result.update(
        {
          "call_s": throughput,
          "images_per_s": result["global_batch"] / throughput["median_s"],
          "latency_ms_median": latency["median_s"] * 1e3,
          "latency_ms_p90": latency["p90_s"] * 1e3,
          "latency_ms_min": latency["min_s"] * 1e3,
        }
      )
      result["achieved_tflops"] = self.forward_flops * result["images_per_s"] / 1e12
      if s.profile_dir and s.profile_infer_variant == (dtype, per_device_batch):
        with sharding.use_mesh(self.mesh):
          self._diagnostic(
            "profile_infer", lambda: self.profile(call, compiled, result, "profile_infer", result["call_s"]["median_s"])
          )
    result["memory"] = timing.memory_in_use()
    self.results["inference"].append(result)
    self.log(report.variant_line("infer", result))

  def run_train(
    self, state: train.TrainState, dtype: str, per_device_batch: int, rng: np.random.Generator
  ) -> train.TrainState:
    s = self.settings
    model = inputs.model_with_dtype(self.config, dtype)
    batch = self._batch(rng, per_device_batch)
    step = train.jit_train_step(self.config, model, self.mesh)
    result = self._variant(dtype, per_device_batch)
    with sharding.use_mesh(self.mesh):
      compiled = self._compile(step, (state, batch), result)
    diagnose = s.diagnose_variant == (dtype, per_device_batch)
    if diagnose and s.hlo_report:
      self._diagnostic("hlo", lambda: self.report_hlo(compiled, dtype, per_device_batch, len(jax.tree.leaves(state))))
    if s.compile_only:
      result["memory"] = timing.memory_in_use()
      self.results["train"].append(result)
      self.log(report.variant_line("train", result))
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
      times = timing.timing_stats(timing.time_calls(call, s.repeats, s.calls_per_repeat))
      result.update({"step_s": times, "images_per_s": result["global_batch"] / times["median_s"]})
      # Training counts 3× the forward FLOPs per image (forward + 2× for the backward).
      result["achieved_tflops"] = 3 * self.forward_flops * result["images_per_s"] / 1e12
      result["memory"] = timing.memory_in_use()
      if diagnose and s.profile_dir:
        self._diagnostic(
          "profile",
          lambda: self.profile(call, compiled, result, "profile", result["step_s"]["median_s"], self._compiled_text),
        )
    self.results["train"].append(result)
    self.log(report.variant_line("train", result))
    return holder["state"]

  def _variant(self, dtype: str, per_device_batch: int) -> Dict[str, Any]:
    """The record of one measured (dtype, batch) variant, before timing."""
    return {
      "dtype": dtype,
      "per_device_batch": per_device_batch,
      "global_batch": per_device_batch * self.devices,
      "memory_before": timing.memory_in_use(),
    }

  def _compile(self, jitted: Any, args: Any, result: Dict[str, Any]) -> Any:
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    result.update(
      {
        "lower_s": lowered_at - start,
        "compile_s": time.perf_counter() - lowered_at,
        "xla_memory": timing.compiled_memory(compiled),
      }
    )
    flops = summary.xla_flops(lowered)
    if flops is not None:
      result["xla_gflops_per_image"] = flops / result["global_batch"] / 1e9
    self._lowered = lowered  # Kept for the HLO report of this variant.
    return compiled

  def report_hlo(self, compiled: Any, dtype: str, per_device_batch: int, state_leaves: int):
    compiled_text = compiled.as_text()
    lowered_text = self._lowered.as_text(dialect="hlo", debug_info=True)
    self.results["diagnostics"]["hlo"] = {
      "variant": f"{dtype}:{per_device_batch}",
      "state_leaves": state_leaves,
      "lowered": hlo.hlo_report(lowered_text, dtype),
      "compiled": hlo.hlo_report(compiled_text, dtype),
    }
    self._compiled_text = compiled_text
    if self.settings.hlo_dump_dir:
      for kind, text in (("lowered", lowered_text), ("compiled", compiled_text)):
        fileio.atomic_write(
          os.path.join(self.settings.hlo_dump_dir, f"train_{dtype}_b{per_device_batch}.{kind}.hlo"), text
        )
    self.save()

  def profile(
    self,
    call: Callable[[], Any],
    compiled: Any,
    result: Dict[str, Any],
    name: str,
    timed_s: float,
    hlo_text: Optional[str] = None,
  ):
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
    summarized = profile_lib.summarize_profile(trace_dir, s.profile_steps, hlo_text)
    summarized["variant"] = f"{result['dtype']}:{result['per_device_batch']}"
    summarized["timed_step_ms"] = timed_s * 1e3
    if summarized.get("per_step_ms"):
      summarized["busy_fraction"] = summarized["per_step_ms"] / summarized["timed_step_ms"]
    self.results["diagnostics"][name] = summarized

  def run_matmul(self, dtype: str):
    s = self.settings
    self.results["matmul_peak"][dtype] = timing.measure_matmul_peak(
      dtype, s.matmul_size, s.repeats, s.calls_per_repeat, s.warmup
    )
    self.log(f"matmul {dtype} {s.matmul_size}³: {self.results['matmul_peak'][dtype]['tflops']:.3f} TFLOP/s")

  def run_stages(self, state: train.TrainState, dtype: str, rng: np.random.Generator):
    s = self.settings
    batch = self._batch(rng, s.stage_batch_size)
    timer = stages.StageTimer(inputs.model_with_dtype(self.config, dtype), s, self.log)
    self.results["stages"] = {
      "dtype": dtype,
      "per_device_batch": s.stage_batch_size,
      "global_batch": s.stage_batch_size * self.devices,
      **timer.run(state, batch),
    }

  def fill_utilisation(self):
    """Utilisation = achieved FLOP/s ÷ the measured matmul peak of the same dtype."""
    peaks = self.results["matmul_peak"]
    for row in self.results["train"] + self.results["inference"]:
      peak = peaks.get(row["dtype"], {}).get("tflops")
      achieved = row.get("achieved_tflops")
      row["matmul_peak_tflops"] = peak
      row["utilisation"] = achieved / peak if achieved and peak else None
