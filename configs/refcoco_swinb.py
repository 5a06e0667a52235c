"""The paper's RefCOCO setup with the Swin-B image encoder (Table 1, Swin-Base rows): 480×480, L = 17.

Swin-B (patch 4, D = 128, depths 2-2-18-2, heads 4-8-16-32, window 12, drop-path 0.3 as LAVT) gives F_v2/F_v3/F_v4
from stages 2–4 (256, 512, 1024 channels, each LayerNorm-ed); the text encoder is CLIP's. Initialise both from
`python -m fcnet_jax.tools.convert_swin --src=swin_base_patch4_window12_384_22k.pth --clip=RN101.pt --out=DIR`
and `--config.init_from=DIR`. RefCOCO+ uses the same settings on its own shards: add `--config.data.dataset=refcoco+`.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.backbone = "swin"
  return config
