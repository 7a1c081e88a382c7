"""The `mini-sglang` console script.

    mini-sglang serve --model demo --device cpu     same as `python -m server.launch_server ...`
"""
from __future__ import annotations

import sys

USAGE = """usage: mini-sglang serve [server flags...]    (mini-sglang serve --help lists them)"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    if argv[0] != "serve":
        print(f"mini-sglang: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    from server.launch_server import main as serve
    serve(argv[1:])


if __name__ == "__main__":
    main()
