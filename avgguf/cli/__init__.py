"""The `avgguf` command: one module per command family, shared options declared once (args.py)."""

from avgguf.cli.commands import main

__all__ = ["main"]
