"""Model summary: parameter table, totals per module, forward GFLOPs per image (XLA cost analysis).

    python -m fcnet_jax.tools.summary --config=configs/refcoco_r101.py [--config.model.num_emphasis=8]

FLOPs come from XLA's HLO cost analysis of the jitted inference forward pass at batch 1; XLA counts a
multiply-add as 2 FLOPs (the paper's Table 5 "GFLOPs" count it once). The benchmark
(`fcnet_jax.tools.benchmark`) reports the same numbers through `model_summary`.
"""

from typing import Any, Dict, Optional, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from fcnet_jax import cli
from fcnet_jax.models import fcnet


def count_parameters(tree: Any) -> int:
  """Number of scalars in a tree of arrays (or of shapes: `jax.ShapeDtypeStruct`s count the same)."""
  return int(sum(int(np.prod(leaf.shape, dtype=np.int64)) for leaf in jax.tree.leaves(tree)))


def abstract_variables(model: fcnet.FCNet) -> Any:
  """Shapes/dtypes of the model's variables, without allocating them."""
  images = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  tokens = jnp.zeros((1, model.context_length), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), images, tokens, train=False))


def xla_flops(lowered_or_compiled: Any) -> Optional[float]:
  """FLOPs in XLA's cost analysis of a lowered or compiled computation; None where XLA gives none."""
  try:
    cost = lowered_or_compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


def forward_flops(model: fcnet.FCNet, variables: Any, batch_size: int = 1) -> float:
  """FLOPs of one jitted inference forward pass at `batch_size` (XLA cost analysis of the lowered HLO).

  Lowered for the CPU backend where there is one: the count is then the same on every machine, and GPU backends
  (jax 0.11) give no cost analysis of a lowered, not yet compiled, computation.
  """
  try:
    target = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  except RuntimeError:  # No CPU backend (JAX_PLATFORMS excludes it): the default device's analysis.
    target = None
  abstract = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=target)
  images = abstract((batch_size, model.image_size, model.image_size, 3), jnp.float32)
  tokens = abstract((batch_size, model.context_length), jnp.int32)
  variables = jax.tree.map(lambda x: abstract(x.shape, x.dtype), variables)
  lowered = jax.jit(lambda v, x, t: model.apply(v, x, t, train=False)).lower(variables, images, tokens)
  flops = xla_flops(lowered)
  if flops is None:
    raise RuntimeError("XLA gave no cost analysis (FLOPs) of the forward pass")
  return flops


def model_summary(model_config) -> Dict[str, Any]:
  """Parameters (total and per top-level module) and forward GFLOPs per image for `config.model`."""
  model = fcnet.build_model(model_config)
  variables = abstract_variables(model)
  per_module = {name: count_parameters(sub) for name, sub in variables["params"].items()}
  flops = forward_flops(model, variables)
  return {
    "params": count_parameters(variables["params"]),
    "params_per_module": per_module,
    "forward_gflops_per_image": flops / 1e9,
    "forward_gmacs_per_image": flops / 2e9,
    "image_size": model.image_size,
    "context_length": model.context_length,
    "variables": variables,
  }


def main(argv: Sequence[str]) -> None:
  del argv  # cli.run rejects extra arguments.
  from clu import parameter_overview  # pylint: disable=g-import-not-at-top

  summary = model_summary(flags.FLAGS.config.model)
  print(parameter_overview.get_parameter_overview(summary["variables"]["params"], include_stats=False))
  print("\nParameters per module:")
  for name, count in summary["params_per_module"].items():
    print(f"  {name:<24} {count / 1e6:10.3f} M")
  print(f"  {'total':<24} {summary['params'] / 1e6:10.3f} M")
  print(
    f"\nForward pass at {summary['image_size']}×{summary['image_size']}, L={summary['context_length']}: "
    f"{summary['forward_gflops_per_image']:.2f} GFLOPs per image "
    f"(= {summary['forward_gmacs_per_image']:.2f} G multiply-adds; XLA counts a multiply-add as 2 FLOPs)"
  )


def define_flags() -> None:
  """The tool's flags; defined on demand so that other tools (the benchmark) can import this module."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from configs import tiny  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file(
    "config", tiny.__file__, "Configuration file (configs/*.py; default: configs/tiny.py)."
  )


def run() -> None:
  """Console entry point (fcnet-summary)."""
  cli.run(main, define_flags)


if __name__ == "__main__":
  run()
