"""The kubetune.dev/v1alpha1 resource API, shared by the CLI, the operator, the trainer and the CRDs."""

from kubetune.api.finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from kubetune.api.loraadapter import LoraAdapter, LoraAdapterSpec, LoraAdapterStatus
from kubetune.api.meta import API_VERSION, GROUP, VERSION

__all__ = [
    "API_VERSION", "GROUP", "VERSION",
    "FineTuneJob", "FineTuneJobSpec", "FineTuneJobStatus",
    "LoraAdapter", "LoraAdapterSpec", "LoraAdapterStatus",
]
