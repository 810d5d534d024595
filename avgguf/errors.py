"""Errors shown to users. Library code raises these; only the CLI turns them into exit codes."""


class AvggufError(Exception):
    """A user-facing error: the message says what, where, expected vs found, and how to fix it."""


class AdapterError(AvggufError):
    """An adapter file is malformed or does not fit the base model."""


class ConversionError(AvggufError):
    """Input checkpoints cannot be turned into an adapter."""
