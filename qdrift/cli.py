"""The `qdrift` command: `qdrift run [overrides]` is `python run.py [overrides]`, `qdrift report DIRS
--out report.html` renders the local report (qdrift/report.py)."""
from __future__ import annotations

import sys

USAGE = """usage: qdrift run [OVERRIDE ...]        quantize, calibrate, generate, evaluate (Hydra overrides; --help)
       qdrift report DIR [DIR ...] --out report.html   the table, figures and image grids of runs and sweeps"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        from qdrift.app import main as run_main

        sys.argv = [f"{sys.argv[0]} run", *rest]   # Hydra parses sys.argv
        run_main()
        return 0
    if command == "report":
        from qdrift.report import main as report_main

        return report_main(rest)
    print(f"error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
