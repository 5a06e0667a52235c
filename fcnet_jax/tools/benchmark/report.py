"""What the benchmark reports: the targets it holds the R101 model to, and the short table printed last."""

from typing import Any, Dict, List, Mapping, Optional

from fcnet_jax.tools.benchmark import settings as settings_lib
from fcnet_jax.tools.benchmark import stages as stages_lib
from fcnet_jax.tools.benchmark import timing


def _gib(value: Optional[float]) -> str:
  return "-" if value is None else f"{value / timing.GIB:.2f}"


def _fmt(value: Optional[float], spec: str = ".1f") -> str:
  return "-" if value is None else format(value, spec)


def _percent(fraction: Optional[float]) -> str:
  return "-" if fraction is None else f"{100 * fraction:.1f}%"


def variant_line(kind: str, r: Mapping[str, Any]) -> str:
  """One line of progress for a measured (or only compiled) train / infer variant."""
  speed = f"{r['images_per_s']:.1f} img/s" if "images_per_s" in r else "compiled only"
  return (
    f"{kind} {r['dtype']} batch {r['per_device_batch']}/device: {speed}, compile {r['compile_s']:.1f} s, "
    f"XLA memory {_fmt((r.get('xla_memory') or {}).get('total_gib'), '.2f')} GiB"
  )


# Targets for the R101 model on one H200 (the PyTorch CRIS R101 peer there: training 153.8 images/s bf16 at
# batch 32 and 57.7 fp16 at batch 8; inference 25 ms at batch 1 and 325.7 images/s at batch 32).
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
    rows = [
      r for r in results.get(section, []) if r["per_device_batch"] == batch and (dtype is None or r["dtype"] == dtype)
    ]
    values = []
    for r in rows:
      if field == "memory_gib":
        peak = (r.get("memory") or {}).get("peak_bytes_in_use")
        value = peak / timing.GIB if peak is not None else (r.get("xla_memory") or {}).get("total_gib")
        source = "peak_bytes_in_use" if peak is not None else "xla_memory_analysis"
      else:
        value, source = r.get(field), None
      if value is not None:
        values.append((value, r["dtype"], source))
    best = (min if comparison == "<=" else max)(values, default=None)
    check = {
      "section": section,
      "dtype": dtype or "any",
      "per_device_batch": batch,
      "field": field,
      "target": f"{comparison} {bound:g}",
      "value": best[0] if best else None,
      "measured_dtype": best[1] if best else None,
      "met": None if best is None else (best[0] <= bound if comparison == "<=" else best[0] >= bound),
    }
    if field == "memory_gib" and best:
      check["memory_source"] = best[2]
    checks.append(check)
  return checks


def format_table(results: Mapping[str, Any]) -> str:
  """The short summary printed last."""
  model = results["model"]
  lines = [
    f"FCNet benchmark — config {results['config'] or '?'} on {results['device_count']}× "
    f"{results['device_kind']} ({results['backend']}), jax {results['jax_version']}, "
    f"commit {(results.get('commit') or '?')[:10]}{'+' if results.get('dirty') else ''}",
    f"params {model.get('params', 0) / 1e6:.2f} M, forward {_fmt(model.get('forward_gflops_per_image'), '.2f')}"
    f" GFLOPs/image (XLA, multiply-add = 2)",
  ]
  peaks = results["matmul_peak"]
  if peaks:
    lines.append(
      "matmul peak: " + ", ".join(f"{d} {p['tflops']:.2f} TFLOP/s (n={p['size']})" for d, p in peaks.items())
    )
  header = (
    f"{'':6}{'dtype':>10}{'batch':>7}{'compile_s':>11}{'images/s':>11}{'ms/call':>10}"
    f"{'lat_med':>9}{'lat_p90':>9}{'TFLOP/s':>9}{'util':>7}{'peak_GiB':>10}{'xla_GiB':>9}"
  )
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
        f"{_fmt((r.get('xla_memory') or {}).get('total_gib'), '.2f'):>9}"
      )
  stages = results.get("stages") or {}
  order = [*stages_lib.STAGES, "optimizer"]  # The JSON's keys are sorted: list the stages in the model's order.
  for mode in settings_lib.STAGE_MODES:
    if mode in stages:
      rows = sorted(
        stages[mode]["stages"].items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)
      )
      lines.append(
        f"stages ({mode}, {stages['dtype']}, batch {stages['per_device_batch']}/device): "
        + ", ".join(f"{n} {r['ms']:.2f} ms ({100 * (r['share'] or 0):.0f}%)" for n, r in rows)
      )
  hlo = (results.get("diagnostics") or {}).get("hlo")
  if hlo:
    c = hlo["compiled"]
    lines.append(
      f"HLO ({hlo['variant']}): {c['fusions']} fusions, {c['convolutions']} convs "
      f"{c['convolution_layouts']}, {c['transposes_top_level']} transposes + {c['copies_top_level']} "
      f"copies ({c['transpose_copy_gib']:.2f} GiB), attention: {c['attention_implementation']}, "
      f"host transfers {len(c['host_transfers'])}, aliased outputs {c['input_output_aliases']}/"
      f"{hlo['state_leaves']} state leaves"
    )
  for key, what in (("profile", "train"), ("profile_infer", "infer")):
    profile = (results.get("diagnostics") or {}).get(key)
    if profile and "categories_ms_per_step" in profile:
      busy = (
        f", {profile['ops_per_step']:.0f} ops, device busy {100 * profile['busy_fraction']:.0f}% of "
        f"{profile['timed_step_ms']:.2f} ms"
        if profile.get("busy_fraction") and "ops_per_step" in profile
        else ""
      )
      lines.append(
        f"profile {what} ({profile['variant']}, {profile['per_step_ms']:.2f} ms/step on device{busy}): "
        + ", ".join(f"{k} {v:.2f}" for k, v in list(profile["categories_ms_per_step"].items())[:6])
      )
  if str(results.get("config", "")).startswith("refcoco_r101"):
    for c in check_targets(results):
      verdict = {True: "met", False: "MISSED", None: "not measured"}[c["met"]]
      source = (
        f" (XLA's static estimate on {results['backend']}, not a device peak)"
        if c.get("memory_source") == "xla_memory_analysis"
        else ""
      )
      lines.append(
        f"target {c['section']} {c['dtype']} batch {c['per_device_batch']} {c['field']} {c['target']}: "
        f"{_fmt(c['value'], '.2f')} {verdict}{source}"
      )
  for error in results.get("errors", []):
    lines.append(f"ERROR {error[:200]}")
  return "\n".join(lines)
