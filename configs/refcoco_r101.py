"""The paper's RefCOCO / RefCOCO+ setup: CLIP RN101, 480×480, L = 17 (FCNet sec. 4.1)."""
from configs import default


def get_config():
  return default.get_config()
