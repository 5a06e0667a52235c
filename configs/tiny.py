"""CPU-sized FCNet for tests and quick checks: 64×64 images, narrow widths, one block per stage.

The structure is the real one (every module and switch of the R101 model), only small.
"""

from configs import default


def get_config():
  config = default.get_config()
  m = config.model
  m.image_size = 64
  m.context_length = 8
  m.vision_layers = (1, 1, 1, 1)
  m.vision_width = 8
  m.vision_heads = 4
  m.embed_dim = 32
  m.vocab_size = 49408
  m.text_width = 32
  m.text_layers = 2
  m.text_heads = 4
  m.neck_dims = (16, 32, 64)
  m.hidden_dim = 32
  m.num_emphasis = 4
  m.attention_heads = 4
  m.decoder_layers = 1
  m.decoder_ffn_dim = 64
  m.dtype = "float32"
  config.batch_size = 8
  config.eval_batch_size = 8
  return config
