"""The installed avgguf's version: one owner, pyproject.toml (read through the package metadata)."""

from importlib import metadata

try:
    __version__ = metadata.version("avgguf")
except metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0.0.0+unknown"
