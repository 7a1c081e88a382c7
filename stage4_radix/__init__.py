"""Stage 4: radix-tree prefix cache."""
