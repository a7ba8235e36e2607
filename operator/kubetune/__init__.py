"""kubetune: declarative LoRA / QLoRA fine-tuning on Kubernetes."""

__version__ = "0.1.0"
