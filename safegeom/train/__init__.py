"""Training: supervised and LoRA fine-tuning, safety-preserving regularisers, and the tiny-chat build."""
