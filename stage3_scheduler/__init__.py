"""Stage 3: requests, continuous batching scheduler, policies, retraction, chunked prefill, Engine."""
