"""G-Ref (UMD split) with CLIP RN101: as RefCOCO but sentences up to L = 22 tokens (FCNet sec. 4.1)."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.context_length = 22
  config.data.dataset = "refcocog"
  config.data.split_by = "umd"
  config.data.eval_splits = ("val", "test")
  return config
