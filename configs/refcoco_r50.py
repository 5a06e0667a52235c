"""Ablation backbone: CLIP RN50 (blocks 3-4-6-3, embed_dim 1024) on RefCOCO at 480×480."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.vision_layers = (3, 4, 6, 3)
  config.model.embed_dim = 1024
  return config
