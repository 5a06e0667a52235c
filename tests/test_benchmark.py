"""Tests of the benchmark tool (`fcnet_jax.tools.benchmark`) and of the summary tool it shares its counts with.

The tiny benchmark runs end to end in a subprocess in which `import tensorflow` raises, so a TensorFlow import
anywhere on the benchmark's path fails the test. Its numbers are checked against independent sources: parameter
counts against counts made by hand from the architecture, FLOPs against hand counts of a known convolution /
matmul stack, XLA's own cost analysis of the train step (≈ 3× forward), XLA's buffer assignment
(the donated state), the full forward pass for the separately jitted stages, and `time.sleep` for the clocks.
The HLO parser is checked on a hand-written GPU-style module with known counts.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
import time

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from fcnet_jax import tokenizer
from fcnet_jax.models import fcnet
from fcnet_jax.tools import summary
from fcnet_jax.tools.benchmark import hlo
from fcnet_jax.tools.benchmark import inputs
from fcnet_jax.tools.benchmark import profile
from fcnet_jax.tools.benchmark import report
from fcnet_jax.tools.benchmark import settings
from fcnet_jax.tools.benchmark import stages
from fcnet_jax.tools.benchmark import timing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HIDDEN = "tensorflow is hidden by tests/test_benchmark.py"


def _env_without_tensorflow(tmp_path):
  """A subprocess environment in which `import tensorflow` raises ImportError.

  A `tensorflow` package placed first on the path raises on import. (A finder that refused the name outright
  would also break `importlib.util.find_spec("tensorflow")`, which etils asks before touching any path, without
  importing anything.)
  """
  package = tmp_path / "no_tensorflow" / "tensorflow"
  package.mkdir(parents=True, exist_ok=True)
  (package / "__init__.py").write_text(f"raise ImportError({HIDDEN!r})\n")
  env = dict(os.environ)  # With the suite's fast-compiling XLA_FLAGS (tests/conftest.py), as every test process.
  env["PYTHONPATH"] = os.pathsep.join([str(package.parent), REPO])
  env["JAX_PLATFORMS"] = "cpu"
  return env


def text_encoder_parameters(vocab_size, context_length, width, layers, embed_dim):
  """CLIP's text transformer counted by hand: token and positional embeddings; per layer two LayerNorms
  (2·W each), q/k/v and output projections (4·(W² + W)), the MLP W → 4W → W (8·W² + 5·W); the final LayerNorm
  and the projection to the joint space (W × E, no bias)."""
  per_layer = (
    2 * 2 * width + 4 * (width * width + width) + (width * 4 * width + 4 * width) + (4 * width * width + width)
  )
  return vocab_size * width + context_length * width + layers * per_layer + 2 * width + width * embed_dim


def tiny_text_encoder_parameters():
  m = tiny.get_config().model
  return text_encoder_parameters(m.vocab_size, m.context_length, m.text_width, m.text_layers, m.embed_dim)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("bench")
  env = _env_without_tensorflow(tmp_path)
  hidden = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env, capture_output=True, text=True)
  out = tmp_path / "r.json"
  command = [
    sys.executable,
    "-m",
    "fcnet_jax.tools.benchmark",
    "--config=configs/tiny.py",
    f"--out={out}",
    "--sections=train,infer,matmul,stages",
    "--repeats=3",
    "--calls_per_repeat=2",
    "--latency_repeats=5",
    "--warmup=1",
    "--hlo_report",
    f"--profile_dir={tmp_path / 'profile'}",
    "--profile_steps=1",
  ]
  heads = [_git_head()]
  process = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  heads.append(_git_head())  # Someone may commit while the benchmark runs.
  return {
    "hidden": hidden,
    "process": process,
    "results": json.loads(out.read_text()) if out.exists() else None,
    "heads": heads,
  }


def _git_head():
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
  return head.stdout.strip() if head.returncode == 0 else None


def test_tensorflow_is_really_hidden(tiny_run):
  assert tiny_run["hidden"].returncode != 0
  assert HIDDEN in tiny_run["hidden"].stderr


def test_tiny_benchmark_runs_without_tensorflow(tiny_run):
  process = tiny_run["process"]
  assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
  results = tiny_run["results"]
  assert results["tensorflow_loaded"] is False
  assert results["errors"] == []
  assert results["config"] == "tiny"
  assert results["backend"] == "cpu" and results["device_count"] == jax.device_count()
  assert results["jax_version"] == jax.__version__
  if tiny_run["heads"][0] is not None:
    assert results["commit"] in tiny_run["heads"]
  # The table is printed last.
  last_lines = process.stdout.strip().splitlines()
  assert any(line.startswith("FCNet benchmark") for line in last_lines[-12:])
  assert last_lines[-1].startswith(("infer", "train", "stages", "HLO", "profile"))


def test_reported_parameters_match_a_hand_count(tiny_run):
  per_module = tiny_run["results"]["model"]["params_per_module"]
  assert per_module["text_encoder"] == tiny_text_encoder_parameters()
  assert tiny_run["results"]["model"]["params"] == sum(per_module.values())


def test_train_numbers(tiny_run):
  results = tiny_run["results"]
  forward = results["model"]["forward_gflops_per_image"] * 1e9
  (row,) = results["train"]
  assert (row["dtype"], row["per_device_batch"]) == ("float32", 8)  # CPU defaults.
  assert row["global_batch"] == 8 * jax.device_count()
  assert row["images_per_s"] > 0
  assert row["step_s"]["min_s"] <= row["step_s"]["median_s"] <= row["step_s"]["p90_s"]
  # XLA's own count for forward + backward + Adam lies near the 3× rule the utilisation uses.
  assert 2.5 * forward < row["xla_gflops_per_image"] * 1e9 < 4.0 * forward
  assert 0 < row["utilisation"] < 1  # Above the measured matmul peak would mean FLOPs counted wrongly.
  assert row["donation_warnings"] == []
  assert row["memory"]["peak_bytes_in_use"] is None  # CPU reports no device memory statistics.
  # The state (params and two Adam moments, float32) is an argument of the step and donated.
  params = results["model"]["params"]
  assert row["xla_memory"]["argument_size_in_bytes"] >= 3 * 4 * params
  assert row["xla_memory"]["alias_size_in_bytes"] >= 3 * 4 * params
  assert row["compile_s"] > 0


def test_inference_numbers(tiny_run):
  rows = {r["per_device_batch"]: r for r in tiny_run["results"]["inference"]}
  assert sorted(rows) == [1, 8]
  for row in rows.values():
    assert 0 < row["latency_ms_min"] <= row["latency_ms_median"] <= row["latency_ms_p90"]
    # A synchronous call cannot finish faster than the back-to-back per-call time by much (same work).
    assert row["latency_ms_median"] > 0.3 * row["call_s"]["median_s"] * 1e3
    assert 0 < row["utilisation"] < 1


def test_stages_compose_to_the_full_forward(tiny_run):
  results = tiny_run["results"]
  report_ = results["stages"]
  infer = report_["infer"]
  assert set(infer["stages"]) == set(stages.STAGES)
  assert infer["max_abs_diff_vs_full"] < 1e-5  # float32: the chained stages are the forward pass.
  # The stages' FLOPs (each lowered on its own) add up to the whole forward pass (the sigmoid aside).
  assert infer["forward_gflops_sum"] == pytest.approx(
    results["model"]["forward_gflops_per_image"] * report_["global_batch"], rel=0.01
  )
  assert all(r["ms"] > 0 for r in infer["stages"].values())


def test_hlo_and_profile_diagnostics(tiny_run):
  diagnostics = tiny_run["results"]["diagnostics"]
  hlo_ = diagnostics["hlo"]
  assert hlo_["variant"] == "float32:8"
  for hlo_report in (hlo_["lowered"], hlo_["compiled"]):
    assert hlo_report["input_output_aliases"] == hlo_["state_leaves"]  # Every leaf of the state is donated.
    assert hlo_report["host_transfers"] == []
    assert hlo_report["convolutions"] > 0
  # NHWC activations: every forward and input-gradient convolution is b01f (B, H, W, C) in and out.
  layouts = hlo_["lowered"]["convolution_layouts"]
  assert all(k.startswith("b01f") or k == "f01b_i01o->01bf" for k in layouts), layouts
  for name, variant in (("profile", "float32:8"), ("profile_infer", "float32:1")):
    summarized = diagnostics[name]
    assert summarized["variant"] == variant and summarized["total_ms"] > 0 and summarized["top_ops"]
    assert summarized["ops_per_step"] >= 1 and 0 < summarized["busy_fraction"]


def test_bad_flag_is_one_clear_error(tmp_path):
  env = _env_without_tensorflow(tmp_path)
  process = subprocess.run(
    [sys.executable, "-m", "fcnet_jax.tools.benchmark", "--sections=speed"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert process.returncode != 0
  assert "--sections='speed': unknown ['speed']" in process.stderr
  assert "Traceback" not in process.stderr


def test_summary_cli_reports_the_hand_counted_parameters(tmp_path):
  process = subprocess.run(
    [sys.executable, "-m", "fcnet_jax.tools.summary", "--config=configs/tiny.py"],
    cwd=REPO,
    env=_env_without_tensorflow(tmp_path),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert process.returncode == 0, process.stderr[-3000:]
  (millions,) = re.findall(r"^\s*text_encoder\s+([\d.]+) M$", process.stdout, re.MULTILINE)
  assert millions == f"{tiny_text_encoder_parameters() / 1e6:.3f}"
  assert re.search(r"\d GFLOPs per image", process.stdout)


# ----------------------------------------------------------------------------------------------------- units


def test_count_parameters_of_a_known_module():
  module = nn.Sequential([nn.Conv(4, (3, 3)), nn.LayerNorm(), nn.Dense(6)])
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.ones((1, 5, 5, 3))))
  # 3×3×3→4 kernel + 4 biases; LayerNorm scale and bias over 4; 4→6 kernel + 6 biases.
  assert summary.count_parameters(variables) == (3 * 3 * 3 * 4 + 4) + 2 * 4 + (4 * 6 + 6)


def test_text_encoder_parameters_of_a_built_model():
  model = fcnet.build_model(tiny.get_config().model)
  variables = summary.abstract_variables(model)
  assert summary.count_parameters(variables["params"]["text_encoder"]) == tiny_text_encoder_parameters()


def test_flops_of_a_known_conv_matmul_stack():
  def stack(x, w, a, b):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y, a @ b

  args = (jnp.ones((2, 10, 10, 3)), jnp.ones((3, 3, 3, 4)), jnp.ones((16, 32)), jnp.ones((32, 8)))
  # Convolution: 2 × (2·8·8·4 outputs) × (3·3·3 taps); matmul: 2 × 16·32·8; a multiply-add counts 2.
  by_hand = 2 * (2 * 8 * 8 * 4) * (3 * 3 * 3) + 2 * 16 * 32 * 8
  lowered = jax.jit(stack).lower(*args)
  assert summary.xla_flops(lowered) == by_hand
  row = stages.time_compiled(lowered, lowered.compile(), args, repeats=2, calls_per_repeat=1)
  assert row["gflops"] * 1e9 == pytest.approx(by_hand)
  assert row["ms"] > 0


def test_matmul_peak_counts_2n3():
  peak = timing.measure_matmul_peak("float32", 64, repeats=2, calls_per_repeat=1, warmup=1)
  a = jnp.ones((64, 64))
  xla = summary.xla_flops(jax.jit(jnp.dot).lower(a, a))
  assert xla == 2 * 64**3
  assert peak["tflops"] * 1e12 * peak["median_s"] == pytest.approx(xla)


GPU_STYLE_HLO = textwrap.dedent("""\
    HloModule jit_train_step, is_scheduled=true, input_output_alias={ {0}: (0, {}, may-alias), {1}: (1, {}, may-alias) }, entry_computation_layout={(bf16[2,8,8,3]{3,2,1,0})->bf16[2,8,8,4]{3,2,1,0}}

    %fused_computation.1 (param_0.1: bf16[2,8,8,4]) -> bf16[2,8,8,4] {
      %param_0.1 = bf16[2,8,8,4]{3,2,1,0} parameter(0)
      ROOT %multiply.1 = bf16[2,8,8,4]{3,2,1,0} multiply(bf16[2,8,8,4]{3,2,1,0} %param_0.1, bf16[2,8,8,4]{3,2,1,0} %param_0.1)
    }

    %fused_computation.2 (param_0.2: f32[16,16]) -> f32[16] {
      %param_0.2 = f32[16,16]{1,0} parameter(0)
      %constant.1 = f32[] constant(0)
      ROOT %reduce.1 = f32[16]{0} reduce(f32[16,16]{1,0} %param_0.2, f32[] %constant.1), dimensions={1}, to_apply=%region_add
    }

    %region_add (a: f32[], b: f32[]) -> f32[] {
      %a = f32[] parameter(0)
      %b = f32[] parameter(1)
      ROOT %add.9 = f32[] add(f32[] %a, f32[] %b)
    }

    ENTRY %main.10 (p0: bf16[2,8,8,3], p1: bf16[3,3,3,4], p2: bf16[16,64]) -> (bf16[2,8,8,4], f32[16]) {
      %p0 = bf16[2,8,8,3]{3,2,1,0} parameter(0)
      %p1 = bf16[3,3,3,4]{3,2,1,0} parameter(1)
      %p2 = bf16[16,64]{1,0} parameter(2)
      %custom-call.1 = (bf16[2,8,8,4]{3,2,1,0}, u8[0]{0}) custom-call(bf16[2,8,8,3]{3,2,1,0} %p0, bf16[3,3,3,4]{3,2,1,0} %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(train_step)/image_encoder/stem1/conv/conv_general_dilated"}
      %get-tuple-element.1 = bf16[2,8,8,4]{3,2,1,0} get-tuple-element((bf16[2,8,8,4]{3,2,1,0}, u8[0]{0}) %custom-call.1), index=0
      %fusion.1 = bf16[2,8,8,4]{3,2,1,0} fusion(bf16[2,8,8,4]{3,2,1,0} %get-tuple-element.1), kind=kLoop, calls=%fused_computation.1
      %transpose.1 = bf16[2,4,8,8]{3,2,1,0} transpose(bf16[2,8,8,4]{3,2,1,0} %fusion.1), dimensions={0,3,1,2}
      %copy.1 = bf16[2,8,8,4]{0,1,2,3} copy(bf16[2,8,8,4]{3,2,1,0} %fusion.1)
      %custom-call.2 = (f32[16,16]{1,0}, s8[4]{0}) custom-call(bf16[16,64]{1,0} %p2, bf16[16,64]{1,0} %p2), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(train_step)/decoder/layer0/self_attn/dot_general"}
      %custom-call.3 = (bf16[2,16,2,8]{3,2,1,0}, u8[0]{0}) custom-call(bf16[16,64]{1,0} %p2), custom_call_target="__cudnn$fmhaSoftmax"
      %get-tuple-element.2 = f32[16,16]{1,0} get-tuple-element((f32[16,16]{1,0}, s8[4]{0}) %custom-call.2), index=0
      %fusion.2 = f32[16]{0} fusion(f32[16,16]{1,0} %get-tuple-element.2), kind=kInput, calls=%fused_computation.2
      %custom-call.4 = () custom-call(f32[16]{0} %fusion.2), custom_call_target="xla_ffi_python_gpu_callback", metadata={op_name="jit(train_step)/debug_callback"}
      %all-reduce.1 = f32[16]{0} all-reduce(f32[16]{0} %fusion.2), replica_groups={}, to_apply=%region_add
      ROOT %tuple.1 = (bf16[2,8,8,4]{3,2,1,0}, f32[16]{0}) tuple(bf16[2,8,8,4]{3,2,1,0} %fusion.1, f32[16]{0} %all-reduce.1)
    }
""")  # noqa: E501 (HLO lines as XLA prints them)


def test_hlo_report_on_a_known_module():
  report = hlo.hlo_report(GPU_STYLE_HLO, expect_dtype="bfloat16")
  assert report["entry"] == "main.10"
  assert report["fusions"] == 2
  assert report["fusion_kinds"] == {"kLoop": 1, "kInput": 1}
  assert report["top_level_instructions"] == 15  # ENTRY only: fused bodies and the reducer run inside kernels.
  assert report["convolutions"] == 1
  assert report["convolution_layouts"] == {"b01f_01io->b01f": 1}
  assert report["convolution_dtypes"] == {"bf16": 1}
  assert report["matmul_dtypes"] == {"f32": 1}
  assert report["f32_convs_and_matmuls"] == 1
  assert report["f32_examples"] == ["decoder/layer0/self_attn/dot_general"]
  assert report["transposes_top_level"] == 1 and report["copies_top_level"] == 1
  assert report["transpose_copy_gib"] == pytest.approx(2 * 2 * 8 * 8 * 4 * 2 / 2**30)
  assert report["attention_fused_kernels"] == 1
  assert report["attention_implementation"].startswith("cuDNN")
  assert report["host_transfers"] == ["custom-call xla_ffi_python_gpu_callback jit(train_step)/debug_callback"]
  assert report["collectives"] == {"all-reduce": 1}
  assert report["input_output_aliases"] == 2
  categories = profile.hlo_categories(GPU_STYLE_HLO)
  assert categories["custom-call.1"] == "convolution"
  assert categories["custom-call.2"] == "matmul"
  assert categories["custom-call.3"] == "attention"
  assert categories["fusion.1"] == "elementwise fusion"
  assert categories["fusion.2"] == "reduction"
  assert categories["transpose.1"] == "transpose/copy"


def test_hlo_report_on_a_lowered_jax_function():
  def step(x, w, a, b):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    jax.debug.callback(lambda v: None, y.sum())
    logits = jnp.einsum("td,sd->ts", a, b, preferred_element_type=jnp.float32)  # f32 in a bf16 program.
    return x + 1, y.transpose(0, 3, 1, 2), logits

  args = (
    jnp.ones((2, 8, 8, 3), jnp.bfloat16),
    jnp.ones((3, 3, 3, 4), jnp.bfloat16),
    jnp.ones((4, 16), jnp.bfloat16),
    jnp.ones((5, 16), jnp.bfloat16),
  )
  lowered = jax.jit(step, donate_argnums=(0,)).lower(*args)
  report = hlo.hlo_report(lowered.as_text(dialect="hlo", debug_info=True), expect_dtype="bfloat16")
  assert report["convolutions"] == 1
  assert report["convolution_layouts"] == {"b01f_01io->b01f": 1}
  assert report["convolution_dtypes"] == {"bf16": 1}
  assert report["matmul_dtypes"] == {"f32": 1}
  assert report["transposes_top_level"] == 1
  assert len(report["host_transfers"]) == 1 and "callback" in report["host_transfers"][0]
  assert report["input_output_aliases"] == 1
  compiled = hlo.hlo_report(lowered.compile().as_text(), expect_dtype="bfloat16")
  assert compiled["convolutions"] == 1 and len(compiled["host_transfers"]) == 1


def test_profile_categories():
  assert profile.categorize("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "convolution"
  assert profile.categorize("sm90_xmma_wgrad_implicit_gemm_tf32f32_nhwckrsc_nchw") == "convolution"
  assert profile.categorize("cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8") == "matmul"
  assert profile.categorize("__cudnn$fmhaSoftmax") == "attention"
  assert profile.categorize("nchwToNhwcKernel") == "transpose/copy"
  assert profile.categorize("input_reduce_fusion_3") == "reduction"
  assert profile.categorize("loop_add_fusion_12") == "elementwise fusion"


def test_summarize_profile_of_a_cpu_trace(tmp_path):
  f = jax.jit(lambda a: jnp.tanh(a @ a).sum())
  a = jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)), jnp.float32)
  f(a).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(2):
      f(a).block_until_ready()
  result = profile.summarize_profile(str(tmp_path), steps=2)
  assert result["source"] == "/host:CPU"
  assert result["total_ms"] > 0 and result["per_step_ms"] == pytest.approx(result["total_ms"] / 2)
  assert result["top_ops"] and sum(result["categories_ms_per_step"].values()) == pytest.approx(result["per_step_ms"])


def test_time_calls_measures_wall_time():
  sleep = lambda: time.sleep(0.02)  # pylint: disable=unnecessary-lambda-assignment
  per_call = timing.time_calls(sleep, repeats=3, calls_per_repeat=2)
  # Lower bounds are exact (sleep never returns early); upper bounds leave room for a loaded machine.
  assert len(per_call) == 3 and all(0.0195 < t < 0.5 for t in per_call)
  latency = timing.timing_stats(timing.time_latency(sleep, repeats=4))
  assert 0.0195 < latency["min_s"] <= latency["median_s"] <= latency["p90_s"] < 0.5 and latency["n"] == 4


def test_resolve_settings_defaults_and_errors():
  config = tiny.get_config()
  cpu = settings.resolve_settings(config, "cpu")
  assert cpu.dtypes == ("float32",) and cpu.train_batch_sizes == (8,) and cpu.infer_batch_sizes == (1, 8)
  gpu = settings.resolve_settings(config, "gpu", hlo_report=True)
  assert gpu.dtypes == ("bfloat16", "float32")
  assert gpu.train_batch_sizes == (8, 32) and gpu.infer_batch_sizes == (1, 32)
  assert gpu.diagnose_variant == ("bfloat16", 32) and gpu.stage_batch_size == 32
  with pytest.raises(ValueError, match="--sections"):
    settings.resolve_settings(config, "cpu", sections="train,speed")
  with pytest.raises(ValueError, match="--dtypes"):
    settings.resolve_settings(config, "cpu", dtypes="fp8")
  with pytest.raises(ValueError, match="--train_batch_sizes"):
    settings.resolve_settings(config, "cpu", train_batch_sizes="8,x")
  with pytest.raises(ValueError, match="--diagnose_variant"):
    settings.resolve_settings(config, "cpu", diagnose_variant="float32:32")
  assert gpu.profile_infer_variant is None
  with pytest.raises(ValueError, match="add 'train'"):
    settings.resolve_settings(config, "cpu", sections="infer", hlo_report=True)
  with pytest.raises(ValueError, match="--profile_dir"):
    settings.resolve_settings(config, "cpu", sections="matmul", profile_dir="/tmp/p")
  infer_only = settings.resolve_settings(config, "gpu", sections="infer", profile_dir="/tmp/p")
  assert infer_only.diagnose_variant is None and infer_only.profile_infer_variant == ("bfloat16", 1)
  with pytest.raises(TypeError, match="unknown benchmark options"):
    settings.resolve_settings(config, "cpu", section="train")


def test_every_option_is_a_flag():
  parsed = flags.FlagValues()
  settings.define_flags(parsed)
  parsed(["benchmark", "--sections=infer,stages", "--repeats=3", "--hlo_report=false", "--stage_modes=train"])
  options = {f.name for f in dataclasses.fields(settings.Settings)} - {"profile_infer_variant"}
  assert set(parsed) == options
  resolved = settings.resolve_settings(tiny.get_config(), "cpu", **settings.flag_values(parsed))
  assert resolved.sections == ("infer", "stages") and resolved.repeats == 3 and resolved.stage_modes == ("train",)
  assert resolved.calls_per_repeat == settings.CPU_DEFAULTS["calls_per_repeat"]  # 0 → the backend's default.


def test_synthetic_batch_looks_like_the_pipeline():
  batch = inputs.synthetic_batch(np.random.default_rng(0), 4, 64, 8)
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, 64, 64, 3)
  assert batch["image"].std() > 50  # Noise, not a constant image.
  assert batch["mask"].dtype == np.uint8 and set(np.unique(batch["mask"])) == {0, 1}
  assert all(batch["mask"][b].any() for b in range(4))
  tokens = batch["tokens"]
  assert tokens.dtype == np.int32 and tokens.shape == (4, 8)
  for row in tokens:
    end = int(np.argmax(row == tokenizer.EOT_TOKEN))
    assert row[0] == tokenizer.SOT_TOKEN and 1 < end < 8 and (row[1:end] > 0).all() and (row[end + 1 :] == 0).all()
    assert np.argmax(row) == end  # CLIP finds [EOS] as the largest id.
  assert batch["valid"].all()


def test_random_variables_shapes_and_scales():
  model = fcnet.build_model(tiny.get_config().model)
  abstract = summary.abstract_variables(model)
  variables = inputs.random_variables(abstract, seed=0)
  assert jax.tree.structure(variables) == jax.tree.structure(abstract)
  for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(abstract)):
    assert got.shape == want.shape and got.dtype == np.float32
  bn = variables["params"]["image_encoder"]["stem1"]["bn"]
  np.testing.assert_array_equal(bn["scale"], 1.0)
  np.testing.assert_array_equal(bn["bias"], 0.0)
  np.testing.assert_array_equal(variables["batch_stats"]["image_encoder"]["stem1"]["bn"]["var"], 1.0)
  kernel = variables["params"]["image_encoder"]["layer1_0"]["conv2"]["conv"]["kernel"]  # 3×3×w×w
  assert kernel.std() == pytest.approx(1 / np.sqrt(np.prod(kernel.shape[:-1])), rel=0.1)


@pytest.mark.parametrize(
  "overrides, fuse_modules",
  [
    ({}, {"neck", "emphasis_generation", "text_global_proj", "emphasis_calibration"}),
    ({"use_ecm": False}, {"neck", "emphasis_generation"}),
    ({"use_egm": False}, {"neck", "word_proj"}),
  ],
)
def test_each_parameter_belongs_to_one_stage(overrides, fuse_modules):
  model_config = tiny.get_config().model.to_dict()
  model_config.update(overrides)
  model = fcnet.build_model(model_config)
  variables = summary.abstract_variables(model)
  images = jnp.zeros((1, model.image_size, model.image_size, 3))
  tokens = jnp.zeros((1, model.context_length), jnp.int32)
  outputs, owned = {}, {}
  for name in stages.STAGES:
    args = stages.stage_inputs(name, images, tokens, outputs)
    owned[name] = set(stages.stage_parameters(model, name, args))
    shapes = jax.eval_shape(stages.stage_forward_fn(model, name), variables, *args)
    outputs[name] = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  assert owned == {
    "encode_image": {"image_encoder"},
    "encode_text": {"text_encoder"},
    "fuse": fuse_modules,
    "decode": {"decoder", "mask_head"},
  }
  assert set().union(*owned.values()) == set(variables["params"])


def test_stage_train_fn_gives_the_decode_gradients():
  model = fcnet.build_model(tiny.get_config().model)
  variables = jax.tree.map(jnp.asarray, inputs.random_variables(summary.abstract_variables(model), seed=1))
  size = model.image_size // 16
  key_v, key_m = jax.random.split(jax.random.key(0))
  f_v = jax.random.normal(key_v, (2, size, size, model.hidden_dim))
  memory = jax.random.normal(key_m, (2, model.num_emphasis, model.hidden_dim))
  rng, cotangent_key = jax.random.key(2), jax.random.key(3)
  param_grads, (f_v_grad, memory_grad) = jax.jit(stages.stage_train_fn(model, "decode"))(
    variables, rng, cotangent_key, f_v, memory, None
  )
  assert set(param_grads) == {"decoder", "mask_head"}  # Only the stage's own parameters are differentiated.

  def decode(params, f_v, memory):
    out, _ = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      f_v,
      memory,
      None,
      train=True,
      method=fcnet.FCNet.decode,
      mutable=["batch_stats"],
      rngs={"dropout": rng},
    )
    return out

  out = jax.eval_shape(decode, variables["params"], f_v, memory)
  (cotangent_key,) = jax.random.split(cotangent_key, 1)
  cotangent = jax.random.normal(cotangent_key, out.shape, out.dtype)
  want_params, want_f_v, want_memory = jax.jit(
    jax.grad(lambda p, a, b: jnp.sum(decode(p, a, b) * cotangent), argnums=(0, 1, 2))
  )(variables["params"], f_v, memory)
  np.testing.assert_allclose(f_v_grad, want_f_v, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(memory_grad, want_memory, rtol=1e-4, atol=1e-5)
  for module in ("decoder", "mask_head"):
    for got, want in zip(jax.tree.leaves(param_grads[module]), jax.tree.leaves(want_params[module])):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_check_targets():
  results = {
    "train": [
      {"dtype": "bfloat16", "per_device_batch": 32, "images_per_s": 320.0, "memory": {"peak_bytes_in_use": 30 * 2**30}},
      {"dtype": "bfloat16", "per_device_batch": 8, "images_per_s": 100.0, "memory": {}},
    ],
    "inference": [
      {"dtype": "float32", "per_device_batch": 1, "latency_ms_median": 9.0},
      {"dtype": "bfloat16", "per_device_batch": 1, "latency_ms_median": 5.5},
    ],
  }
  checks = {(c["section"], c["per_device_batch"], c["field"]): c for c in report.check_targets(results)}
  assert checks[("train", 32, "images_per_s")]["met"] is True
  assert checks[("train", 8, "images_per_s")]["met"] is False
  latency = checks[("inference", 1, "latency_ms_median")]
  assert latency["met"] is True and latency["value"] == 5.5 and latency["measured_dtype"] == "bfloat16"
  assert checks[("inference", 32, "images_per_s")]["met"] is None
  memory = checks[("train", 32, "memory_gib")]
  assert memory["met"] is False and memory["value"] == 30.0 and memory["memory_source"] == "peak_bytes_in_use"
