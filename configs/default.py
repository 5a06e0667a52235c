"""Default hyper-parameters: the paper's RefCOCO R101 setup (FCNet sec. 4.1; docs/model.md).

Setups in this folder start from `get_config()` here and change a few fields. Every field can be overridden
on the command line, e.g. `--config.model.num_emphasis=8`.
"""

import ml_collections


def get_model_config() -> ml_collections.ConfigDict:
  """FCNet with the CLIP RN101 backbone at 480×480; (choice) marks a choice the paper leaves open (docs/model.md)."""
  m = ml_collections.ConfigDict()
  m.image_size = 480  # S: square letterbox canvas; must be divisible by 32.
  m.context_length = 17  # L: 17 for RefCOCO/RefCOCO+, 22 for G-Ref.
  m.backbone = "clip_resnet"  # Image encoder: "clip_resnet" (CLIP ModifiedResNet, fields vision_*) | "swin" (swin_*).
  m.text_backbone = "clip"  # Text encoder: "clip" (CLIP's text transformer, fields text_*), the only one.
  # CLIP image encoder (ModifiedResNet); used when backbone == "clip_resnet".
  m.vision_layers = (3, 4, 23, 3)  # RN101; RN50 is (3, 4, 6, 3).
  m.vision_width = 64
  m.vision_heads = 32  # Attention-pool heads: vision_width * 32 // 64 in CLIP.
  m.embed_dim = 512  # CLIP joint embedding (text_projection width; RN pool output): 512 RN101/ViT-B, 1024 RN50.
  # Swin Transformer image encoder; used when backbone == "swin". Defaults: Swin-B, window 12 (the 384 release).
  m.swin_embed_dim = 128  # D, stage-1 width (T/S 96, B 128, L 192); F_v2/F_v3/F_v4 have 2D/4D/8D channels.
  m.swin_depths = (2, 2, 18, 2)  # Blocks per stage (T: 2-2-6-2; S/B/L: 2-2-18-2).
  m.swin_heads = (4, 8, 16, 32)  # Heads per stage (T/S 3-6-12-24, B 4-8-16-32, L 6-12-24-48).
  m.swin_window = 12  # Window side; pretrained relative-position tables are resized bicubically to it on load.
  m.swin_patch_size = 4
  m.swin_mlp_ratio = 4.0
  m.swin_drop_path_rate = 0.3  # Stochastic depth of the last block, linear from 0 (LAVT's Swin-B: 0.3).
  # CLIP text encoder.
  m.vocab_size = 49408
  m.text_width = 512
  m.text_layers = 12
  m.text_heads = 8
  m.text_embed_init_std = 0.02  # (choice) Token-embedding init (CLIP); matters only for a text encoder from scratch.
  # FCNet.
  m.neck_dims = (256, 512, 1024)  # CRIS FPN widths.
  m.hidden_dim = 512  # C.
  m.num_emphasis = 16  # N_k (choice).
  m.attention_heads = 8  # EGM, ECM and decoder heads.
  m.decoder_layers = 3
  m.decoder_ffn_dim = 2048
  m.dropout = 0.1
  m.use_egm = True  # False: decoder cross-attends to the word features (CRIS-like baseline).
  m.use_ecm = True  # False: F_c = F_e.
  m.egm_layernorm = True  # (choice) LayerNorm on the emphasis features F_e.
  m.egm_heads = 0  # (choice) EGM cross-attention heads; 0: attention_heads.
  m.egm_query_init_scale = 1.0  # (choice) × the LeCun init of the EGM query projection (sharper attention at init).
  m.calibration_gate = "none"  # (choice) α as plain scalars ("none"), "sigmoid" or "softmax" over N_k.
  m.freeze_backbone_bn = False  # (choice) True: backbone BatchNorm always uses running statistics.
  m.dtype = "bfloat16"  # Compute dtype; parameters are always float32.
  return m


def get_config() -> ml_collections.ConfigDict:
  """The full experiment configuration (model, data, optimisation, evaluation, logging)."""
  config = ml_collections.ConfigDict()
  config.model = get_model_config()

  config.data = ml_collections.ConfigDict()
  config.data.dataset = "refcoco"  # refcoco | refcoco+ | refcocog
  config.data.split_by = "unc"  # unc | google | umd
  config.data.tfrecord_dir = ""  # Output of `python -m input_pipeline.convert`.
  config.data.train_split = "train"
  config.data.eval_splits = ("val",)
  config.data.shuffle_buffer = 4096
  config.data.eval_canvas = 640  # Original-size canvas for evaluation (COCO images are ≤ 640 a side).
  config.data.letterbox = "integer"  # "integer" (ours) | "cris" (CRIS's float affine, cubic; docs/data.md).
  # Training batches decoded on the host into an eval_canvas² canvas and letterboxed on the device (input_pipeline/
  # host_decode.py, data.letterbox_on_device): ~2× the examples per host CPU-second. Used with the "integer"
  # letterbox on record format 2 shards; otherwise the host letterboxes (logged). False: always on the host.
  config.data.device_letterbox = True
  # Embedded synthetic refer-format data (configs/demo.py): generated + converted into the workdir when
  # tfrecord_dir is empty.
  config.data.synthetic = False
  config.data.synthetic_seed = 0
  config.data.synthetic_train_images = 400
  config.data.synthetic_eval_images = 40

  config.seed = 0
  config.batch_size = 64  # Global, across all devices and hosts.
  config.eval_batch_size = 64
  config.num_epochs = 50
  config.num_train_steps = 0  # > 0 overrides num_epochs.
  config.learning_rate = 1e-4
  config.lr_decay_epochs = (35,)  # Piecewise constant: × lr_decay_factor at each of these epochs.
  config.lr_decay_factor = 0.1
  config.lr_schedule = "piecewise"  # piecewise (paper) | cosine (warm-up + cosine to 0; short runs)
  config.warmup_steps = 0
  config.encoder_lr_regex = r"^(image_encoder|text_encoder)/"  # Parameters trained at lr × lr_multi.
  config.lr_multi = 0.1  # Image and text encoders train at learning_rate × lr_multi (CRIS).
  config.weight_decay = 0.0
  config.grad_clip_norm = 0.0  # 0 disables clipping.
  config.dice_weight = 0.0  # > 0 adds dice_weight × soft Dice to the BCE (beyond the paper: BCE only).
  config.init_from = ""  # Orbax checkpoint written by `fcnet_jax.tools.convert_clip`.
  config.mask_threshold = 0.35  # On sigmoid probabilities (CRIS).
  # The final evaluation (and --mode=eval) also scores every split with sentences shuffled across examples.
  config.eval_shuffled_control = False

  config.log_every_steps = 50
  config.eval_every_epochs = 1
  config.eval_every_steps = 0  # > 0 overrides eval_every_epochs.
  config.profile_steps = 0  # > 0: one profiler window of this many steps (TensorBoard).
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.distributed = False  # Call jax.distributed.initialize() (multi-host).
  # Persistent XLA compilation cache (fcnet_jax/compile_cache.py): "" = <workdir>/xla_cache (or the directory in
  # $JAX_COMPILATION_CACHE_DIR), "none" = off, or a directory (gs:// too). A restart skips its compilations.
  config.compile_cache_dir = ""
  return config
