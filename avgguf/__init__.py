"""avgguf: alignment vectors as live preference knobs on llama.cpp."""

from avgguf.runtime.threads import openmp_defaults

openmp_defaults()  # before llama.cpp loads: several decoding threads would otherwise halve each other's speed

from avgguf.version import __version__  # noqa: E402

from avgguf.api import Model, bake_to, convert, open  # noqa: E402 (after the OpenMP defaults: llama.cpp loads lazily)
from avgguf.errors import AdapterError, AvggufError, ConversionError  # noqa: E402

__all__ = ["Model", "open", "convert", "bake_to", "AvggufError", "AdapterError", "ConversionError", "__version__"]
