"""fcnet_jax: FCNet (Fuse & Calibrate) for referring image segmentation in JAX/Flax."""
