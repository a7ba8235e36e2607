"""Exit codes of the trainer process: the contract with the operator (and the Job's podFailurePolicy)."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_DATA = 65  # EX_DATAERR: the dataset is bad; retrying will not help
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: storage or another dependency did not answer; a retry may help
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM after checkpointing; resumable, not a failure
EXIT_CONFIG = 78  # EX_CONFIG: the spec, model or credentials are unusable; retrying will not help


class ConfigError(ValueError):
    """The spec cannot be carried out as written (missing model files, qlora without CUDA, ...)."""
