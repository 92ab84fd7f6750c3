"""`latentmoe eval KIND MODEL ...`: measure a checkpoint. One subcommand per measurement, each in its own module
`commands/_eval_<kind>.py` with `register(evals)` (found here the way cli.py finds commands), e.g. `eval perplexity`.
"""

from __future__ import annotations

import importlib
import pkgutil


def register(sub) -> None:
    p = sub.add_parser("eval", help="measure a checkpoint (perplexity, bits per byte, ...)",
                       description="Measure a checkpoint (a directory or a hub model id). Results print as JSON.")
    evals = p.add_subparsers(dest="eval_command", metavar="KIND", required=True)
    from . import __path__ as here
    for info in sorted(pkgutil.iter_modules(here), key=lambda m: m.name):
        if info.name.startswith("_eval_"):
            importlib.import_module(f"{__package__}.{info.name}").register(evals)
