"""Errors the trainer turns into a clear termination message and a distinct exit code."""


class ConfigError(ValueError):
    """The spec cannot be carried out as written (missing model files, qlora without CUDA, ...)."""
