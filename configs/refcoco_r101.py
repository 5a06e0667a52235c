"""The paper's RefCOCO setup: CLIP RN101, 480×480, L = 17 (FCNet sec. 4.1).

RefCOCO+ uses the same settings on its own shards: add `--config.data.dataset=refcoco+`.
"""

from configs import default


def get_config():
  return default.get_config()
