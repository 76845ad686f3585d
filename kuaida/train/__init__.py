"""Training: data (conversations -> labelled token batches), the training loop (AdamW, warmup + cosine,
time budgets, atomic checkpoints, resume), distributed wrapping (DDP / FSDP / HSDP under torchrun),
LoRA, fine-tuning and distillation. Every recipe runs as one CPU process or under torchrun unchanged."""
