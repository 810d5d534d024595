"""avgguf: alignment vectors as live preference knobs on llama.cpp."""

__version__ = "0.1.0"
