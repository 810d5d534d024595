"""avgguf: alignment vectors as live preference knobs on llama.cpp."""

from .threads import openmp_defaults

openmp_defaults()  # before llama.cpp loads: several decoding threads would otherwise halve each other's speed

__version__ = "0.1.0"
