"""Everything that touches TensorFlow / tf.data: converters, records and the input pipeline."""
