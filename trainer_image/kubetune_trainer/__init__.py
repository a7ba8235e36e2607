"""The kubetune trainer: QLoRA / LoRA supervised fine-tuning from a FineTuneJob spec.

Pipeline (one module each): sources (model and data in) -> data (records, checks, tokens) ->
packing (rows) -> modeling (base + LoRA) -> training (loop, checkpoints, preemption) ->
evaluation (hold-out) -> publishing (adapter, merged model, manifest out).
"""
