"""FCNet training and evaluation entry point (console script `fcnet-train`).

    python main.py --workdir=/tmp/fcnet_demo                       # embedded default: synthetic data, CPU-sized
    python main.py --config=configs/refcoco_r101.py --workdir=DIR --config.data.tfrecord_dir=SHARDS
    python main.py --config=... --workdir=DIR --mode=eval --checkpoint=best

`--mode=train` resumes from the latest checkpoint in the workdir; `--mode=eval` scores a checkpoint
("latest", "best" or a step number). Both end with the table of the evaluation splits, and with the
shuffled-sentence control when `--config.eval_shuffled_control=true` (on in configs/demo.py).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from fcnet_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from fcnet_jax import compile_cache  # pylint: disable=g-import-not-at-top,wrong-import-position
from fcnet_jax import evaluate  # pylint: disable=g-import-not-at-top,wrong-import-position
from fcnet_jax import fileio  # pylint: disable=g-import-not-at-top,wrong-import-position
from fcnet_jax import run_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from fcnet_jax import showcase  # pylint: disable=g-import-not-at-top,wrong-import-position
from fcnet_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.py")


def define_flags() -> None:
  config_flags.DEFINE_config_file(
    "config",
    DEFAULT_CONFIG,
    "Configuration file (configs/*.py); default: the embedded default, configs/demo.py.",
    lock_config=True,
  )
  flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and evaluation results go here.")
  flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (resumes from the latest checkpoint) or eval.")
  flags.DEFINE_string(
    "checkpoint",
    "latest",
    "--mode=eval: 'latest', 'best' or a step number of --workdir, or the directory of another trained model (an "
    "exported model or a training workdir, whose best checkpoint is used).",
  )
  flags.DEFINE_bool(
    "showcase",
    True,
    "After --mode=train: write overlays.png and examples/ (held-out examples predicted by the best checkpoint) into "
    "the workdir and print the commands that use the model (docs/demo.md).",
  )
  flags.mark_flags_as_required(["workdir"])


def main(argv) -> None:
  del argv  # cli.run rejects extra arguments.
  config = resolve_config(FLAGS.workdir)
  if config.distributed:
    jax.distributed.initialize()
  logging.info("JAX process %d / %d, devices: %s", jax.process_index(), jax.process_count(), jax.devices())
  if FLAGS.mode == "train":
    fileio.as_path(FLAGS.workdir).mkdir(parents=True, exist_ok=True)
    compile_cache.enable(config, FLAGS.workdir)
    _, eval_metrics = train.train_and_evaluate(config, FLAGS.workdir)
  else:
    compile_cache.enable(config, FLAGS.workdir)
    eval_metrics = evaluate.evaluate(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint)
  if jax.process_index() == 0 and eval_metrics:
    print(f"\n{evaluate.format_table(eval_metrics)}")
  # Single-process only: the predictor behind the showcase restores the model onto one local device.
  if FLAGS.mode == "train" and FLAGS.showcase and jax.process_count() == 1:
    print(f"\n{showcase.after_training(FLAGS.workdir)}", flush=True)


def resolve_config(workdir: str) -> ml_collections.ConfigDict:
  """--config, or in --mode=eval without --config the config saved with the evaluated model (+ overrides)."""
  if FLAGS.mode != "eval" or FLAGS["config"].present:
    return FLAGS.config
  source = FLAGS.checkpoint if evaluate.is_model_path(FLAGS.checkpoint) else workdir
  if not run_config.exists(source):
    return FLAGS.config  # An old run: the default config, with a clear error if it does not fit the checkpoint.
  config = run_config.load(source)
  for field, value in config_flags.get_override_values(FLAGS["config"]).items():
    parent = config
    *parents, name = field.split(".")
    for key in parents:
      parent = parent[key]
    parent[name] = value
  logging.info("Using the config saved in %s (with the --config.* overrides).", source)
  return config


def run() -> None:
  """The `fcnet-train` entry point: defines the flags (once) and runs `main` with one-line errors."""
  cli.run(main, define_flags)


if __name__ == "__main__":
  run()
