"""configs/tiny.py with a tiny Swin image encoder: 64×64 images, D = 8, depths 1-2-1-1, window 2.

Stages are 16, 8, 4 and 2 tokens wide; stage 2's second block uses shifted, masked windows; stage 4 is a single
window. Five blocks keep the CPU compile of a train step small (tests/test_swin.py); drop-path is on so that
training exercises it.
"""

from configs import tiny


def get_config():
  config = tiny.get_config()
  m = config.model
  m.backbone = "swin"
  m.swin_embed_dim = 8
  m.swin_depths = (1, 2, 1, 1)
  m.swin_heads = (1, 2, 2, 4)
  m.swin_window = 2
  m.swin_drop_path_rate = 0.1
  return config
