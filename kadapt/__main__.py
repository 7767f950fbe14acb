"""Command line: ``python -m kadapt info``."""
from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kadapt", description="kadapt command line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="versions, CUDA extension build, devices and backends")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # unknown subcommand: usage + exit 2 (argparse)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: a command is required (try: {parser.prog} info)", file=sys.stderr)
        return 2
    if args.command == "info":
        from kadapt.info import info

        print(info())
        return 0
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse catches it
    return 2


if __name__ == "__main__":
    sys.exit(main())
