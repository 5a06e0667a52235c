"""The embedded default: a small, real FCNet (EGM and ECM on) trained on the CPU on synthetic refer-format data.

`python main.py --workdir=/tmp/fcnet_demo` generates the synthetic dataset, converts it with the real converter,
trains, evaluates (with the shuffled-sentence control) and writes overlays in about 10 minutes on 2 CPU cores.
docs/experiments.md says how these settings were chosen and what each of them is worth.
"""

from configs import tiny


def get_config():
  config = tiny.get_config()
  m = config.model
  m.image_size = 96
  m.context_length = 12
  m.vision_width = 8
  m.vision_heads = 8
  m.embed_dim = 64
  m.text_width = 64
  m.text_layers = 1
  m.text_heads = 4
  m.text_embed_init_std = 1.0  # From scratch: distinct word features at init (CLIP's 0.02 makes them near-equal).
  m.neck_dims = (32, 64, 64)
  m.hidden_dim = 64
  m.num_emphasis = 16
  m.attention_heads = 4
  m.egm_heads = 8  # More EGM heads: more distinct word selections per emphasis token.
  m.egm_query_init_scale = 4.0  # Sharper EGM attention at init, so the N_k emphasis tokens differ from the start.
  m.decoder_layers = 1
  m.decoder_ffn_dim = 128
  m.dropout = 0.0
  m.dtype = "float32"
  config.data.synthetic = True  # Generate + convert synthetic data when tfrecord_dir is empty.
  config.eval_shuffled_control = True  # The control: the same model and images with other objects' sentences.
  config.data.eval_splits = ("val",)
  config.data.shuffle_buffer = 1024
  config.data.eval_canvas = 160  # Synthetic images are at most 160 px a side.
  config.data.synthetic_train_images = 1600  # ~6k training refs: fewer repeats, less overfitting than 400.
  config.batch_size = 32
  config.eval_batch_size = 32
  config.num_train_steps = 1600
  config.learning_rate = 1e-3
  config.lr_multi = 1.0  # Encoders train from scratch here.
  config.lr_schedule = "cosine"
  config.warmup_steps = 100
  config.grad_clip_norm = 1.0
  config.dice_weight = 1.0  # Beyond the paper (BCE only): +0.04 val mIoU at 1,000 steps here.
  config.log_every_steps = 100
  config.eval_every_steps = 1600
  config.checkpoint_every_steps = 500
  return config
