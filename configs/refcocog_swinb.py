"""G-Ref (UMD split) with the Swin-B image encoder: configs/refcocog_r101.py (L = 22) with backbone = "swin"."""

from configs import refcocog_r101


def get_config():
  config = refcocog_r101.get_config()
  config.model.backbone = "swin"
  return config
