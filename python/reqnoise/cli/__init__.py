"""The ``reqnoise`` command line: one module per command group, each with ``register(subparsers)``.

A command's handler is stored as ``func`` on its sub-parser; it returns an exit code (or None for 0).
"""

import argparse
import importlib
import sys

from reqnoise.errors import ReqnoiseError

# Modules under reqnoise.cli that define register(subparsers).
COMMAND_MODULES = [
    "evaluate",
    "floor",
    "fuse",
    "noise",
    "probe",
    "report",
    "run",
    "stats",
    "toy",
    "train",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reqnoise",
        description="Fuse LoRA adapters into quantized MLX models and tell learning from requantization noise.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"reqnoise.cli.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except ReqnoiseError as err:
        print(f"reqnoise {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
        print(f"reqnoise {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"reqnoise {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
