"""The paper's RefCOCO setup (CLIP RN101, 480×480) scaled to a pod: global batch 256 over 16–64 accelerators.

    python main.py --config=configs/refcoco_r101_pod.py --workdir=gs://BUCKET/runs/r101_pod \
        --config.data.tfrecord_dir=gs://BUCKET/refcoco_unc --config.init_from=gs://BUCKET/clip_rn101

Launch the same command on every host (docs/cluster.md). What changes against configs/refcoco_r101.py, and why:

* batch_size 256 (the paper's 64 × 4): 16 per chip on a v4-32 (16 chips), 8 on a v5e-32 (32 chips). Both batch
  sizes are global and must divide by the device count.
* learning_rate 2e-4 = 1e-4 × √4: Adam's update does not grow with the batch as SGD's does, so the square-root rule
  is the safer start than the linear one (4e-4); with a 500-step linear warm-up (≈ 3 epochs at this batch).
* The schedule stays in epochs (decay ×0.1 at epoch 35 of 50), so steps_per_epoch, and with it the number of
  steps, drop 4×: ≈ 165 steps per epoch on RefCOCO's 42k training refs.
* checkpoint_every_steps 500 bounds the work a hard kill loses; a SIGTERM (maintenance, Spot reclaim) saves the
  step in flight anyway (fcnet_jax/preemption.py).
* distributed: jax.distributed.initialize() finds the TPU pod (or SLURM) by itself.

These are starting values (no pod was available to tune them); compare the first epochs' loss with a batch-64 run.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.batch_size = 256
  config.eval_batch_size = 256
  config.learning_rate = 2e-4
  config.warmup_steps = 500
  config.checkpoint_every_steps = 500
  config.distributed = True
  return config
