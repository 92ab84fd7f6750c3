"""`latentmoe eval KIND MODEL ...`: measure a checkpoint. Each kind is a module beside this one with
`add_parser(evals)`: `perplexity` (commands._perplexity)."""

from __future__ import annotations

from . import _perplexity


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="measure a checkpoint (perplexity and bits per byte)",
                              description="Measure a checkpoint (a directory or a hub model id): "
                                          "`latentmoe eval perplexity MODEL`. Results print as JSON.")
    evals = p.add_subparsers(dest="eval_command", metavar="KIND", required=True)
    _perplexity.add_parser(evals)
