"""Helpers shared by the test suite (tests/) and the benchmarks (bench/), as numpy.testing is for numpy: tiny
synthetic models built at run time (synthetic), logits from real llama.cpp and their comparison (logits), and
a live `avgguf serve` subprocess on a free port (server). No avgguf module imports this package; torch is
never imported here."""
