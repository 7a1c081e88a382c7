"""Stage 1: the Qwen3 forward pass, its config, weights, tokenizer and the demo model."""
