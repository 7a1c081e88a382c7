"""Alias package: `python -m mini_sglang.launch_server` is `python -m server.launch_server`."""
