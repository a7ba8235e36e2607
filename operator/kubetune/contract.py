"""The contract between the operator and the trainer pod, in one place.

- exit codes: what the trainer process's exit means (the Job's podFailurePolicy acts on them);
- the progress channel: a JSON annotation the trainer sets on its own Pod;
- the termination message: the trainer's last word, read from the Pod's status.
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_DATA = 65  # EX_DATAERR: the dataset is bad; retrying will not help
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: storage or another dependency did not answer; a retry may help
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM after checkpointing; resumable, not a failure
EXIT_CONFIG = 78  # EX_CONFIG: the spec, model or credentials are unusable; retrying will not help

PROGRESS_ANNOTATION = "kubetune.dev/progress"
# The run's per-step history, at the root of its artifact and listed in its manifest.
HISTORY_FILE = "history.jsonl"
# Where a LoraAdapter's merge Job publishes its merged model (with its own manifest), under the artifact.
MERGED_DIR = "merged"
# GGUF files (llama.cpp, Ollama): under the artifact when the run wrote them, under MERGED_DIR when a
# merge Job did.
GGUF_DIR = "gguf"

# Multi-node runs: torchrun's rendezvous on pod 0 of the Indexed Job, through the headless Service.
RENDEZVOUS_HOST_ENV = "KUBETUNE_RENDEZVOUS_HOST"
RENDEZVOUS_PORT = 29500

# spec.tracking.mlflow.secretRef: the Secret's keys, each given to the trainer as the environment
# variable of the same name, which MLflow's client reads itself. A token, or a username and password.
MLFLOW_TOKEN_KEY = "MLFLOW_TRACKING_TOKEN"
MLFLOW_BASIC_AUTH_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
