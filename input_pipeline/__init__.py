"""Everything that touches TensorFlow / tf.data: converters, records and the input pipeline.

Nothing outside this package imports TensorFlow; inside it, modules get it through `import_tensorflow()`.
"""

import os


def import_tensorflow():
  """TensorFlow for file I/O, decoding and tf.data only: quiet, and never holding an accelerator JAX needs."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF's devices were initialised elsewhere already; that choice stands.
    pass
  return tf
