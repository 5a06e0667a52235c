"""FCNet training and evaluation entry point.

    python main.py --workdir=/tmp/fcnet_demo                       # embedded default: synthetic data, CPU-sized
    python main.py --config=configs/refcoco_r101.py --workdir=DIR --config.data.tfrecord_dir=SHARDS
    python main.py --config=... --workdir=DIR --mode=eval --checkpoint=best
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from fcnet_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position

config_flags.DEFINE_config_file("config", "configs/demo.py", "Configuration file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and evaluation results go here.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (resumes from the latest checkpoint) or eval.")
flags.DEFINE_string("checkpoint", "latest", "--mode=eval: 'latest', 'best' or a step number.")
flags.DEFINE_bool("shuffled_control", None, "Also evaluate with sentences shuffled across examples "
                  "(default: on for synthetic data).")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def prepare_synthetic_data(config, workdir: str) -> str:
  """Generates the synthetic refer-format dataset and converts it with the real converter (once)."""
  from input_pipeline import convert  # pylint: disable=g-import-not-at-top
  from input_pipeline import synthetic  # pylint: disable=g-import-not-at-top
  raw, shards = os.path.join(workdir, "synthetic_raw"), os.path.join(workdir, "synthetic_tfrecords")
  if not os.path.exists(os.path.join(shards, "summary.json")):
    synthetic.generate(raw, seed=config.data.synthetic_seed, num_train_images=config.data.synthetic_train_images,
                       num_eval_images=config.data.synthetic_eval_images)
    convert.convert(raw, os.path.join(raw, "images"), "refcoco", "unc", shards, num_workers=1)
  return shards


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  if config.distributed:
    jax.distributed.initialize()
  logging.info("JAX process %d / %d, devices: %s", jax.process_index(), jax.process_count(), jax.devices())
  os.makedirs(FLAGS.workdir, exist_ok=True)
  synthetic = config.data.synthetic and not config.data.tfrecord_dir
  if synthetic:
    with config.unlocked():
      config.data.tfrecord_dir = prepare_synthetic_data(config, FLAGS.workdir)
  shuffled_control = synthetic if FLAGS.shuffled_control is None else FLAGS.shuffled_control
  if FLAGS.mode == "train":
    result = train.train_and_evaluate(config, FLAGS.workdir)
    split = config.data.eval_splits[0]
    print(f"\n{train.format_table(result['eval'])}")
    if shuffled_control:
      # The control: the same model and images, each example paired with another example's sentence.
      shuffled, _ = result["trainer"].evaluate(result["state"], train.DataSource(config).eval(split),
                                               sentences_shuffled=True)
      print(f"\nHeld-out {split}: mIoU {result['eval'][split]['mIoU']:.3f} with the right sentences, "
            f"{shuffled['mIoU']:.3f} with sentences shuffled across examples")
  else:
    train.evaluate_checkpoint(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, shuffled_control=shuffled_control)


if __name__ == "__main__":
  app.run(main)
