"""The benchmark's command line: absl flags (the options of `settings.Settings`, plus --config and --out)."""

import os
import sys
from typing import Sequence

from absl import app
from absl import flags
import flax
import jax

from fcnet_jax import cli
from fcnet_jax.tools.benchmark import report
from fcnet_jax.tools.benchmark import runner
from fcnet_jax.tools.benchmark import settings as settings_lib


def define_flags() -> None:
  """--config, --out and one flag per benchmark option; defined on demand so that importing defines none."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from configs import tiny  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file(
    "config", tiny.__file__, "Configuration file (configs/*.py; default: configs/tiny.py)."
  )
  flags.DEFINE_string("out", "", "Write the results as JSON here (rewritten after every variant).")
  settings_lib.define_flags()


def config_name() -> str:
  """The config file's name and any --config.* overrides, as the JSON and the table name the run."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  name = os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])))[0]
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  if overrides:
    name += " " + " ".join(f"{k}={v}" for k, v in flax.traverse_util.flatten_dict(overrides, sep=".").items())
  return name


def main(argv: Sequence[str]) -> None:
  del argv  # cli.run rejects extra arguments.
  config = flags.FLAGS.config
  try:
    settings = settings_lib.resolve_settings(config, jax.default_backend(), **settings_lib.flag_values())
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  results = runner.Benchmark(config, settings, flags.FLAGS.out, config_name()).run()
  print(report.format_table(results), flush=True)
  if results["errors"]:
    sys.exit(1)


def run() -> None:
  """Console entry point (fcnet-benchmark)."""
  if "sections" not in flags.FLAGS:
    define_flags()
  cli.run(main)
