"""Where the forward (and backward) time goes: FCNet's own stages, each jitted and timed separately.

The stages are the model's methods that `FCNet.__call__` chains (encode_image, encode_text → fuse → decode),
called through `model.apply(..., method=...)`, so the split cannot drift from the model. Each stage is fed the
previous stages' outputs. In training mode a stage runs forward (batch statistics, dropout) and backward for its
own parameters and incoming activations; the Adam update of all parameters is timed on its own.
"""

import collections
import functools
from typing import Any, Callable, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp

from fcnet_jax import evaluate
from fcnet_jax import train
from fcnet_jax.models import fcnet
from fcnet_jax.tools import summary
from fcnet_jax.tools.benchmark import settings as settings_lib
from fcnet_jax.tools.benchmark import timing

# Stage name → the FCNet method it runs, in the order `FCNet.__call__` runs them.
STAGES = collections.OrderedDict(
  [
    ("encode_image", fcnet.FCNet.encode_image),
    ("encode_text", fcnet.FCNet.encode_text),
    ("fuse", fcnet.FCNet.fuse),
    ("decode", fcnet.FCNet.decode),
  ]
)


def stage_inputs(
  name: str, images: jax.Array, tokens: jax.Array, outputs: Mapping[str, Tuple[Any, ...]]
) -> Tuple[Any, ...]:
  """Positional arguments of stage `name` given the earlier stages' outputs (as `FCNet.__call__` passes them)."""
  if name == "encode_image":
    return (images,)
  if name == "encode_text":
    return (tokens,)
  if name == "fuse":
    return (*outputs["encode_image"], *outputs["encode_text"])
  return tuple(outputs["fuse"])


def _mode(name: str, train_mode: bool) -> Dict[str, bool]:
  # encode_text has no train argument (no dropout or BatchNorm in the text encoder).
  return {} if name == "encode_text" else {"train": train_mode}


def _apply_stage(model: fcnet.FCNet, name: str, train_mode: bool, variables: Any, *args, **kwargs) -> Any:
  return model.apply(variables, *args, **_mode(name, train_mode), method=STAGES[name], **kwargs)


def stage_forward_fn(model: fcnet.FCNet, name: str) -> Callable[..., Any]:
  """jit-able (variables, *inputs) → the stage's outputs in inference mode (running BatchNorm statistics)."""
  return functools.partial(_apply_stage, model, name, False)


def stage_parameters(model: fcnet.FCNet, name: str, inputs: Tuple[Any, ...]) -> Tuple[str, ...]:
  """The top-level parameter modules stage `name` uses for `inputs`: those its own `model.init` creates."""
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  init = lambda: model.init(rngs, *inputs, **_mode(name, True), method=STAGES[name])
  return tuple(jax.eval_shape(init)["params"])


def stage_train_fn(model: fcnet.FCNet, name: str) -> Callable[..., Any]:
  """jit-able (variables, dropout_rng, cotangent_key, *inputs) → (gradients of the stage's own parameters,
  gradients of its floating inputs).

  Forward in training mode (batch statistics, dropout) and the backward pass for a random normal cotangent per
  floating output (drawn from `cotangent_key` split once per output, inside the timed function). Only the stage's
  own parameters and its incoming activations are differentiated (not the images, as in the train step), so no
  zero gradients of other modules are written.
  """

  def forward_backward(variables, dropout_rng, cotangent_key, *inputs):
    owned = stage_parameters(model, name, inputs)
    params = variables["params"]
    own = {k: v for k, v in params.items() if k in owned}
    others = {k: v for k, v in params.items() if k not in owned}
    leaves, treedef = jax.tree.flatten(inputs)
    # Activations between stages get gradients; the input images do not (as in the train step).
    float_positions = [
      i for i, x in enumerate(leaves) if name != "encode_image" and jnp.issubdtype(x.dtype, jnp.floating)
    ]

    def f(own_params, float_leaves):
      merged = list(leaves)
      for position, value in zip(float_positions, float_leaves):
        merged[position] = value
      out, _ = _apply_stage(
        model,
        name,
        True,
        {"params": {**others, **own_params}, "batch_stats": variables["batch_stats"]},
        *jax.tree.unflatten(treedef, merged),
        mutable=["batch_stats"],
        rngs={"dropout": dropout_rng},
      )
      return [x for x in jax.tree.leaves(out) if jnp.issubdtype(x.dtype, jnp.floating)]

    out, vjp = jax.vjp(f, own, [leaves[i] for i in float_positions])
    keys = jax.random.split(cotangent_key, len(out))
    cotangents = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, out)]
    return vjp(cotangents)

  return forward_backward


def time_compiled(
  lowered: Any, compiled: Any, args: Tuple[Any, ...], repeats: int, calls_per_repeat: int
) -> Dict[str, Any]:
  """Median ms per call of `compiled(*args)` (after one untimed call), its GFLOPs (XLA's count of `lowered`) and
  the achieved TFLOP/s."""
  jax.block_until_ready(compiled(*args))
  times = timing.timing_stats(timing.time_calls(lambda: compiled(*args), repeats, calls_per_repeat))
  flops = summary.xla_flops(lowered)
  return {
    "ms": times["median_s"] * 1e3,
    "gflops": flops / 1e9 if flops else None,
    "achieved_tflops": flops / times["median_s"] / 1e12 if flops else None,
  }


class StageTimer:
  """Times the stages of one model at one batch (the `stages` section of the benchmark)."""

  def __init__(self, model: fcnet.FCNet, settings: settings_lib.Settings, log: Callable[[str], None]):
    self.model, self.settings, self.log = model, settings, log

  def _time(self, lowered: Any, compiled: Any, args: Tuple[Any, ...]) -> Dict[str, Any]:
    return time_compiled(lowered, compiled, args, self.settings.repeats, self.settings.calls_per_repeat)

  def run(self, state: train.TrainState, batch: Mapping[str, jax.Array]) -> Dict[str, Any]:
    """{"infer": …, "train": …} per --stage_modes: per-stage ms, GFLOPs and share, plus checks of the split."""
    s, model = self.settings, self.model
    images, tokens = train.model_inputs(batch, fcnet.DTYPES[model.dtype])
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    # Forward in inference mode, stage by stage: each stage's outputs are the next one's inputs.
    outputs, modes = {}, {}
    forward_rows = collections.OrderedDict()
    for name in STAGES:
      args = (variables, *stage_inputs(name, images, tokens, outputs))
      lowered = jax.jit(stage_forward_fn(model, name)).lower(*args)
      compiled = lowered.compile()
      outputs[name] = jax.block_until_ready(compiled(*args))
      if "infer" in s.stage_modes:
        forward_rows[name] = self._time(lowered, compiled, args)
    if "infer" in s.stage_modes:
      modes["infer"] = forward_rows
    if "train" in s.stage_modes:
      train_rows = collections.OrderedDict()
      for name in STAGES:  # Training-mode forward + backward, fed the same activations as above.
        args = (variables, jax.random.key(2), jax.random.key(3), *stage_inputs(name, images, tokens, outputs))
        lowered = jax.jit(stage_train_fn(model, name)).lower(*args)
        train_rows[name] = self._time(lowered, lowered.compile(), args)
      train_rows["optimizer"] = self._time_optimizer(state)
      modes["train"] = train_rows
    report = {}
    for mode, rows in modes.items():
      total = sum(r["ms"] for r in rows.values())
      for row in rows.values():
        row["share"] = row["ms"] / total if total else None
      entry = {"stages": rows, "sum_ms": total}
      if mode == "infer":
        entry["forward_gflops_sum"] = sum(r["gflops"] or 0 for r in rows.values())
        entry["full_forward_ms"], entry["max_abs_diff_vs_full"] = self._full_forward(state, batch, outputs["decode"])
      report[mode] = entry
      self.log(
        f"stages {mode} {model.dtype} b{s.stage_batch_size}: "
        + ", ".join(f"{n} {r['ms']:.2f} ms" for n, r in rows.items())
        + f" (sum {total:.2f} ms)"
      )
    return report

  def _full_forward(
    self, state: train.TrainState, batch: Mapping[str, jax.Array], stage_logits: jax.Array
  ) -> Tuple[float, float]:
    """Time of the whole `predict_step` at the stage batch, and its difference from the chained stages."""
    s = self.settings
    state = state.for_inference()
    predict = jax.jit(functools.partial(evaluate.predict_step, model=self.model)).lower(state, batch).compile()
    probabilities = predict(state, batch)
    times = timing.timing_stats(timing.time_calls(lambda: predict(state, batch), s.repeats, s.calls_per_repeat))
    diff = float(jnp.max(jnp.abs(probabilities - jax.nn.sigmoid(stage_logits.astype(jnp.float32)))))
    return times["median_s"] * 1e3, diff

  def _time_optimizer(self, state: train.TrainState) -> Dict[str, Any]:
    """The Adam update of every parameter (`TrainState.apply_gradients`) for constant gradients."""
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params)
    update = jax.jit(lambda st, g: st.apply_gradients(grads=g, batch_stats=st.batch_stats))
    lowered = update.lower(state, grads)
    row = self._time(lowered, lowered.compile(), (state, grads))
    params = summary.count_parameters(state.params)
    return {
      **row,
      "gflops": None,
      "achieved_tflops": None,
      "gib_moved_estimate": params * 4 * 7 / timing.GIB,
    }  # Read p, g, m, v; write p, m, v (float32).
