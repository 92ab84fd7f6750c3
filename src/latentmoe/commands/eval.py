"""`latentmoe eval SUBCOMMAND`: measure a model. Subcommands: `passkey` (commands._passkey)."""

from __future__ import annotations

from . import _passkey


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="measure a model (passkey retrieval)",
                              description="Measure a model: `latentmoe eval passkey MODEL`.")
    sub = p.add_subparsers(dest="eval_command", metavar="SUBCOMMAND")
    _passkey.add_parser(sub)
    p.set_defaults(func=lambda args: p.print_help() or 2)
