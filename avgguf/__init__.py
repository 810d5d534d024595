"""avgguf: alignment vectors as live preference knobs on llama.cpp."""

from .threads import openmp_defaults

openmp_defaults()  # before llama.cpp loads: several decoding threads would otherwise halve each other's speed

__version__ = "0.1.0"

from .api import Model, bake_to, convert, open  # noqa: E402 (after the OpenMP defaults: llama.cpp loads lazily)
from .errors import AdapterError, AvggufError, ConversionError  # noqa: E402

__all__ = ["Model", "open", "convert", "bake_to", "AvggufError", "AdapterError", "ConversionError", "__version__"]
