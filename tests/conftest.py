"""Shared pytest set-up: run from any directory, keep TensorFlow quiet and off the GPU, reuse XLA compilations.

The tests are dominated by XLA compile time on a 2-core CI machine. Many tests compile the same computation (the
tiny model's init, forward and gradient) through different Python callables; the persistent compilation cache
turns every repeat into a cache hit, within a run and across pytest-xdist workers and subprocesses.
"""

import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fcnet_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The "rbg" PRNG compiles the model's ~700 parameter initialisers about 4× faster than threefry on the CPU (a jitted
# tiny-FCNet init: 13 s vs 50 s); the tests compare against references, never against particular random draws.
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
