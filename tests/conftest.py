"""Test-session set-up shared by every test module."""

import os

# Keras fixes its backend when first imported, and importing TensorFlow (the TFDS tests)
# imports it: on the JAX backend, the benchmark's Keras peer works in any test order.
os.environ.setdefault("KERAS_BACKEND", "jax")
