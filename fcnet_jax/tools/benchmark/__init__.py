"""Speed, memory and utilisation of FCNet's real train / predict steps on synthetic device-resident batches.

    python -m fcnet_jax.tools.benchmark --config=configs/refcoco_r101.py --out=bench.json
    python -m fcnet_jax.tools.benchmark --config=configs/tiny.py --out=r.json      # ~1 min on 2 CPU cores

Runs without TensorFlow: batches are synthetic (uint8 image B×S×S×3, uint8 0/1 mask B×S×S, int32 CLIP tokens
B×L, bool valid B) and live on the devices, so only the model, `train.jit_train_step` (the step the training loop
runs: jitted over the mesh, the state donated) and `evaluate.predict_step` are timed. Weights are random.

Sections (--sections, comma-separated):
  train    images/s per (dtype, per-device batch) of the full train step (forward, backward, Adam), compile
           time, XLA's static memory estimate and the device's peak memory (`memory_stats`, None on CPU).
  infer    images/s of `predict_step` per (dtype, batch) and its synchronous latency (median, p90).
  matmul   a large jnp.dot per dtype, timed here: the matrix-multiply peak that utilisation is measured against.
  stages   where the forward (and, with --stage_modes=train, the backward) time goes: FCNet's own stages
           encode_image, encode_text, fuse (neck + EGM + ECM), decode (decoder + mask head) (and the Adam update),
           each jitted separately.
Diagnostics of one train variant (--diagnose_variant): --hlo_report counts fusions, transposes, convolution
layouts and dtypes, attention kernels, host transfers and donation in the compiled HLO; --profile_dir traces a
few steps with `jax.profiler.trace` and summarises where device time goes, and does the same for the smallest
inference batch (ops per call and the device's busy fraction tell launch-bound from compute-bound).

Utilisation = achieved FLOP/s ÷ the measured matmul peak of the same dtype, with FLOPs from XLA's cost analysis
of the forward pass (`summary.forward_flops`; XLA counts a multiply-add as 2) — training counts 3× the forward
FLOPs per image (forward + 2× for the backward). The JSON (--out) is rewritten after every variant, so an
interrupted run keeps what it measured; a short table is printed last.

Modules: `settings` (the options, defined once), `inputs` (batches, weights, state), `timing` (clocks, memory,
matmul peak), `stages`, `hlo` (HLO text reader), `profile` (xplane summary), `report` (targets, table),
`runner` (the run), `cli`.
"""


def run() -> None:
  """Console entry point (fcnet-benchmark); imports the benchmark only when called."""
  from fcnet_jax.tools.benchmark import cli  # pylint: disable=g-import-not-at-top

  cli.run()
