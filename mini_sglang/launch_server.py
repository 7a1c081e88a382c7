"""`python -m mini_sglang.launch_server ...`: the classic entry point, an alias of server.launch_server."""
from server.launch_server import launch_server, main  # noqa: F401

if __name__ == "__main__":
    main()
