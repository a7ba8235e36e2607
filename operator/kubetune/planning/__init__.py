"""How a run fits its GPUs: a memory estimate from the model's shape, and the batch plan built on it.

The operator uses it to refuse a job that cannot fit before any GPU is held; the trainer uses the
same functions with the real device memory to choose micro-batch and activation checkpointing."""

from kubetune.planning.memory import MemoryEstimate, ModelShape, estimate_memory
from kubetune.planning.plan import DoesNotFit, RunPlan, plan_run

__all__ = ["DoesNotFit", "MemoryEstimate", "ModelShape", "RunPlan", "estimate_memory", "plan_run"]
