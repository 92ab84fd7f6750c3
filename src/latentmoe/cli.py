"""The `latentmoe` command: one entry point, one module per subcommand in `latentmoe.commands`.

Each module there defines `register(subparsers)`, which adds its parser and sets `func`.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import __version__, commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentmoe",
        description="DeepSeek-V2 (MLA + DeepSeekMoE): load, train and serve.")
    parser.add_argument("--version", action="version", version=f"latentmoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:  # user errors: a message, not a traceback
        print(f"latentmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a rank of a multi-process engine failed: its error in one line
        from .engine.distributed import ParallelError
        if not isinstance(e, ParallelError):
            raise
        print(f"latentmoe {args.command}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
