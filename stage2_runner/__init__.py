"""Stage 2: batched model runner over a paged KV cache, attention backends, sampler."""
