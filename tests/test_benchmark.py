"""Tests of the benchmark tool: the tiny benchmark end to end with TensorFlow unimportable, and its parts.

The end-to-end run is a subprocess whose `sitecustomize` makes `import tensorflow` raise, so a TensorFlow
import anywhere on the benchmark's path fails the test. Its numbers are checked against independent sources:
`summary.model_summary` for parameters and FLOPs, XLA's own cost analysis of the train step (≈ 3× forward),
the arithmetic between step time, images/s, FLOP/s and utilisation, and the full forward pass for the
separately jitted stages. The HLO parser is checked on a hand-written GPU-style module with known counts.
"""
import json
import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from fcnet_jax.models import fcnet
from fcnet_jax.tools import benchmark
from fcnet_jax.tools import summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NO_TENSORFLOW = textwrap.dedent("""
    import sys

    class _NoTensorFlow:
      def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
          raise ImportError(name + " is hidden by tests/test_benchmark.py")
        return None

    sys.meta_path.insert(0, _NoTensorFlow())
""")


def _env_without_tensorflow(tmp_path):
  site = tmp_path / "no_tensorflow"
  site.mkdir()
  (site / "sitecustomize.py").write_text(NO_TENSORFLOW)
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(site), REPO])
  # Cheaper XLA:CPU code generation: the test checks the numbers' consistency, not CPU speed.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  env["JAX_PLATFORMS"] = "cpu"
  return env


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("bench")
  env = _env_without_tensorflow(tmp_path)
  hidden = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env, capture_output=True, text=True)
  out = tmp_path / "r.json"
  command = [sys.executable, "-m", "fcnet_jax.tools.benchmark", "--config=configs/tiny.py", f"--out={out}",
             "--sections=train,infer,matmul,stages", "--repeats=3", "--calls_per_repeat=2", "--latency_repeats=5",
             "--warmup=1", "--hlo_report", f"--profile_dir={tmp_path / 'profile'}", "--profile_steps=1"]
  heads = [_git_head()]
  start = time.time()
  process = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  seconds = time.time() - start
  heads.append(_git_head())  # Someone may commit while the benchmark runs.
  return {"hidden": hidden, "process": process, "results": json.loads(out.read_text()) if out.exists() else None,
          "seconds": seconds, "heads": heads}


def _git_head():
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
  return head.stdout.strip() if head.returncode == 0 else None


def test_tensorflow_is_really_hidden(tiny_run):
  assert tiny_run["hidden"].returncode != 0
  assert "hidden by tests/test_benchmark.py" in tiny_run["hidden"].stderr


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


def test_model_numbers_match_summary(tiny_run):
  results = tiny_run["results"]
  reference = summary.model_summary(tiny.get_config().model)
  assert results["model"]["params"] == reference["params"]
  assert results["model"]["forward_gflops_per_image"] == pytest.approx(reference["forward_gflops_per_image"],
                                                                        rel=0.01)


def test_train_numbers_are_consistent(tiny_run):
  results = tiny_run["results"]
  forward = results["model"]["forward_gflops_per_image"] * 1e9
  (row,) = results["train"]
  assert (row["dtype"], row["per_device_batch"]) == ("float32", 8)  # CPU defaults.
  assert row["global_batch"] == 8 * jax.device_count()
  assert row["images_per_s"] > 0
  assert row["images_per_s"] == pytest.approx(row["global_batch"] / row["step_s"]["median_s"], rel=1e-9)
  assert row["step_s"]["min_s"] <= row["step_s"]["median_s"] <= row["step_s"]["p90_s"]
  assert row["achieved_tflops"] == pytest.approx(3 * forward * row["images_per_s"] / 1e12, rel=1e-9)
  # XLA's own count for forward + backward + Adam lies near the 3× rule.
  assert 2.5 * forward < row["xla_gflops_per_image"] * 1e9 < 4.0 * forward
  peak = results["matmul_peak"]["float32"]["tflops"]
  assert peak == pytest.approx(2 * 1024 ** 3 / results["matmul_peak"]["float32"]["median_s"] / 1e12, rel=1e-9)
  assert row["utilisation"] == pytest.approx(row["achieved_tflops"] / peak, rel=1e-9)
  assert 0 < row["utilisation"] < 1
  assert row["donation_warnings"] == []
  assert row["memory"]["peak_bytes_in_use"] is None  # CPU reports no device memory statistics.
  # The state (params and two Adam moments, float32) is an argument of the step and donated.
  params = results["model"]["params"]
  assert row["xla_memory"]["argument_size_in_bytes"] >= 3 * 4 * params
  assert row["xla_memory"]["alias_size_in_bytes"] >= 3 * 4 * params
  assert row["compile_s"] > 0


def test_inference_numbers_are_consistent(tiny_run):
  rows = {r["per_device_batch"]: r for r in tiny_run["results"]["inference"]}
  assert sorted(rows) == [1, 8]
  for batch, row in rows.items():
    assert row["images_per_s"] == pytest.approx(row["global_batch"] / row["call_s"]["median_s"], rel=1e-9)
    assert 0 < row["latency_ms_min"] <= row["latency_ms_median"] <= row["latency_ms_p90"]
    # A synchronous call cannot finish faster than the back-to-back per-call time by much (same work).
    assert row["latency_ms_median"] > 0.3 * row["call_s"]["median_s"] * 1e3
    assert 0 < row["utilisation"] < 1


def test_stages_compose_to_the_full_forward(tiny_run):
  results = tiny_run["results"]
  stages = results["stages"]
  infer = stages["infer"]
  assert list(infer["stages"]) == list(benchmark.STAGES)
  assert infer["max_abs_diff_vs_full"] < 1e-5  # float32: the chained stages are the forward pass.
  # The stages' FLOPs add up to the whole forward pass (the sigmoid aside).
  assert infer["forward_gflops_sum"] == pytest.approx(
      results["model"]["forward_gflops_per_image"] * stages["global_batch"], rel=0.01)
  assert sum(r["share"] for r in infer["stages"].values()) == pytest.approx(1.0)
  assert all(r["ms"] > 0 for r in infer["stages"].values())


def test_hlo_and_profile_diagnostics(tiny_run):
  diagnostics = tiny_run["results"]["diagnostics"]
  hlo = diagnostics["hlo"]
  assert hlo["variant"] == "float32:8"
  for report in (hlo["lowered"], hlo["compiled"]):
    assert report["input_output_aliases"] == hlo["state_leaves"]  # Every leaf of the state is donated.
    assert report["host_transfers"] == []
    assert report["convolutions"] > 0
  # NHWC activations: every forward and input-gradient convolution is b01f (B, H, W, C) in and out.
  layouts = hlo["lowered"]["convolution_layouts"]
  assert all(k.startswith("b01f") or k == "f01b_i01o->01bf" for k in layouts), layouts
  for name, variant in (("profile", "float32:8"), ("profile_infer", "float32:1")):
    profile = diagnostics[name]
    assert profile["variant"] == variant and profile["total_ms"] > 0 and profile["top_ops"]
    assert profile["ops_per_step"] >= 1 and 0 < profile["busy_fraction"]


def test_end_to_end_time(tiny_run):
  # The CPU defaults are meant to finish in about a minute on 2 idle cores (more when they are shared).
  assert tiny_run["seconds"] < 600


# ----------------------------------------------------------------------------------------------------- units


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
""")


def test_hlo_report_on_a_known_module():
  report = benchmark.hlo_report(GPU_STYLE_HLO, expect_dtype="bfloat16")
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
  assert report["transpose_copy_gib"] == pytest.approx(2 * 2 * 8 * 8 * 4 * 2 / 2 ** 30)
  assert report["attention_fused_kernels"] == 1
  assert report["attention_implementation"].startswith("cuDNN")
  assert report["host_transfers"] == ["custom-call xla_ffi_python_gpu_callback jit(train_step)/debug_callback"]
  assert report["collectives"] == {"all-reduce": 1}
  assert report["input_output_aliases"] == 2
  categories = benchmark.hlo_categories(GPU_STYLE_HLO)
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

  args = (jnp.ones((2, 8, 8, 3), jnp.bfloat16), jnp.ones((3, 3, 3, 4), jnp.bfloat16),
          jnp.ones((4, 16), jnp.bfloat16), jnp.ones((5, 16), jnp.bfloat16))
  lowered = jax.jit(step, donate_argnums=(0,)).lower(*args)
  report = benchmark.hlo_report(lowered.as_text(dialect="hlo", debug_info=True), expect_dtype="bfloat16")
  assert report["convolutions"] == 1
  assert report["convolution_layouts"] == {"b01f_01io->b01f": 1}
  assert report["convolution_dtypes"] == {"bf16": 1}
  assert report["matmul_dtypes"] == {"f32": 1}
  assert report["transposes_top_level"] == 1
  assert len(report["host_transfers"]) == 1 and "callback" in report["host_transfers"][0]
  assert report["input_output_aliases"] == 1
  compiled = benchmark.hlo_report(lowered.compile().as_text(), expect_dtype="bfloat16")
  assert compiled["convolutions"] == 1 and len(compiled["host_transfers"]) == 1


def test_profile_categories():
  assert benchmark.categorize("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "convolution"
  assert benchmark.categorize("sm90_xmma_wgrad_implicit_gemm_tf32f32_nhwckrsc_nchw") == "convolution"
  assert benchmark.categorize("cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8") == "matmul"
  assert benchmark.categorize("__cudnn$fmhaSoftmax") == "attention"
  assert benchmark.categorize("nchwToNhwcKernel") == "transpose/copy"
  assert benchmark.categorize("input_reduce_fusion_3") == "reduction"
  assert benchmark.categorize("loop_add_fusion_12") == "elementwise fusion"


def test_summarize_profile_of_a_cpu_trace(tmp_path):
  f = jax.jit(lambda a: jnp.tanh(a @ a).sum())
  a = jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)), jnp.float32)
  f(a).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(2):
      f(a).block_until_ready()
  result = benchmark.summarize_profile(str(tmp_path), steps=2)
  assert result["source"] == "/host:CPU"
  assert result["total_ms"] > 0 and result["per_step_ms"] == pytest.approx(result["total_ms"] / 2)
  assert result["top_ops"] and sum(result["categories_ms_per_step"].values()) == pytest.approx(
      result["per_step_ms"])


def test_time_calls_measures_wall_time():
  sleep = lambda: time.sleep(0.02)  # pylint: disable=unnecessary-lambda-assignment
  per_call = benchmark.time_calls(sleep, repeats=3, calls_per_repeat=2)
  # Lower bounds are exact (sleep never returns early); upper bounds leave room for a loaded machine.
  assert len(per_call) == 3 and all(0.0195 < t < 0.5 for t in per_call)
  latency = benchmark.timing_stats(benchmark.time_latency(sleep, repeats=4))
  assert 0.0195 < latency["min_s"] <= latency["median_s"] <= latency["p90_s"] < 0.5 and latency["n"] == 4


def test_resolve_settings_defaults_and_errors():
  config = tiny.get_config()
  cpu = benchmark.resolve_settings(config, "cpu")
  assert cpu.dtypes == ("float32",) and cpu.train_batch_sizes == (8,) and cpu.infer_batch_sizes == (1, 8)
  gpu = benchmark.resolve_settings(config, "gpu", hlo_report=True)
  assert gpu.dtypes == ("bfloat16", "float32")
  assert gpu.train_batch_sizes == (8, 32) and gpu.infer_batch_sizes == (1, 32)
  assert gpu.diagnose_variant == ("bfloat16", 32) and gpu.stage_batch_size == 32
  with pytest.raises(ValueError, match="--sections"):
    benchmark.resolve_settings(config, "cpu", sections="train,speed")
  with pytest.raises(ValueError, match="--dtypes"):
    benchmark.resolve_settings(config, "cpu", dtypes="fp8")
  with pytest.raises(ValueError, match="--train_batch_sizes"):
    benchmark.resolve_settings(config, "cpu", train_batch_sizes="8,x")
  with pytest.raises(ValueError, match="--diagnose_variant"):
    benchmark.resolve_settings(config, "cpu", diagnose_variant="float32:32")
  assert gpu.profile_infer_variant is None
  with pytest.raises(ValueError, match="add 'train'"):
    benchmark.resolve_settings(config, "cpu", sections="infer", hlo_report=True)
  with pytest.raises(ValueError, match="--profile_dir"):
    benchmark.resolve_settings(config, "cpu", sections="matmul", profile_dir="/tmp/p")
  infer_only = benchmark.resolve_settings(config, "gpu", sections="infer", profile_dir="/tmp/p")
  assert infer_only.diagnose_variant is None and infer_only.profile_infer_variant == ("bfloat16", 1)


def test_synthetic_batch_looks_like_the_pipeline():
  batch = benchmark.synthetic_batch(np.random.default_rng(0), 4, 64, 8)
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, 64, 64, 3)
  assert batch["image"].std() > 50  # Noise, not a constant image.
  assert batch["mask"].dtype == np.uint8 and set(np.unique(batch["mask"])) == {0, 1}
  assert all(batch["mask"][b].any() for b in range(4))
  tokens = batch["tokens"]
  assert tokens.dtype == np.int32 and tokens.shape == (4, 8)
  for row in tokens:
    end = int(np.argmax(row == benchmark.EOS))
    assert row[0] == benchmark.SOS and 1 < end < 8 and (row[1:end] > 0).all() and (row[end + 1:] == 0).all()
    assert np.argmax(row) == end  # CLIP finds [EOS] as the largest id.
  assert batch["valid"].all()


def test_random_variables_shapes_and_scales():
  model = fcnet.build_model(tiny.get_config().model)
  abstract = summary.abstract_variables(model)
  variables = benchmark.random_variables(abstract, seed=0)
  assert jax.tree.structure(variables) == jax.tree.structure(abstract)
  for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(abstract)):
    assert got.shape == want.shape and got.dtype == np.float32
  bn = variables["params"]["image_encoder"]["stem1"]["bn"]
  np.testing.assert_array_equal(bn["scale"], 1.0)
  np.testing.assert_array_equal(bn["bias"], 0.0)
  np.testing.assert_array_equal(variables["batch_stats"]["image_encoder"]["stem1"]["bn"]["var"], 1.0)
  kernel = variables["params"]["image_encoder"]["layer1_0"]["conv2"]["conv"]["kernel"]  # 3×3×w×w
  assert kernel.std() == pytest.approx(1 / np.sqrt(np.prod(kernel.shape[:-1])), rel=0.1)


def test_stage_train_fn_gives_the_head_gradients():
  model = fcnet.build_model(tiny.get_config().model)
  variables = jax.tree.map(jnp.asarray, benchmark.random_variables(summary.abstract_variables(model), seed=1))
  size = model.image_size // 16
  f_q = jax.random.normal(jax.random.key(0), (2, size, size, model.hidden_dim))
  rng, cotangent_key = jax.random.key(2), jax.random.key(3)
  head_grads, (input_grad,) = jax.jit(benchmark.stage_train_fn(model, "mask_head"), static_argnums=(4,))(
      variables, rng, cotangent_key, f_q, True)
  assert set(head_grads) == {"mask_head"}  # Only the stage's own parameters are differentiated.

  def head(params, x):
    out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, True,
                         method=lambda m, x, t: m.mask_head(x, t), mutable=["batch_stats"])
    return out

  out = jax.eval_shape(head, variables["params"], f_q)
  (cotangent_key,) = jax.random.split(cotangent_key, 1)
  cotangent = jax.random.normal(cotangent_key, out.shape, out.dtype)
  want_params, want_input = jax.jit(jax.grad(lambda p, x: jnp.sum(head(p, x) * cotangent), argnums=(0, 1)))(
      variables["params"], f_q)
  np.testing.assert_allclose(input_grad, want_input, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(head_grads["mask_head"]["logit"]["kernel"], want_params["mask_head"]["logit"]["kernel"],
                             rtol=1e-4, atol=1e-5)


def test_check_targets():
  results = {
      "train": [{"dtype": "bfloat16", "per_device_batch": 32, "images_per_s": 320.0,
                 "memory": {"peak_bytes_in_use": 30 * 2 ** 30}},
                {"dtype": "bfloat16", "per_device_batch": 8, "images_per_s": 100.0, "memory": {}}],
      "inference": [{"dtype": "float32", "per_device_batch": 1, "latency_ms_median": 9.0},
                    {"dtype": "bfloat16", "per_device_batch": 1, "latency_ms_median": 5.5}],
  }
  checks = {(c["section"], c["per_device_batch"], c["field"]): c for c in benchmark.check_targets(results)}
  assert checks[("train", 32, "images_per_s")]["met"] is True
  assert checks[("train", 8, "images_per_s")]["met"] is False
  latency = checks[("inference", 1, "latency_ms_median")]
  assert latency["met"] is True and latency["value"] == 5.5 and latency["measured_dtype"] == "bfloat16"
  assert checks[("inference", 32, "images_per_s")]["met"] is None
  memory = checks[("train", 32, "memory_gib")]
  assert memory["met"] is False and memory["value"] == 30.0 and memory["memory_source"] == "peak_bytes_in_use"
