"""Config overrides on the command line: `--section.key value` pairs that argparse does not know,
collected in order into `args.overrides` instead of being rejected."""

from __future__ import annotations

import argparse


class OverridesParser(argparse.ArgumentParser):
    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        if extras and not extras[0].startswith("--"):
            self.error(f"unexpected argument {extras[0]!r} (config overrides look like --section.key value)")
        ns.overrides = list(getattr(ns, "overrides", None) or []) + extras
        return ns, []


def accept_overrides(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.__class__ = OverridesParser
    parser.set_defaults(overrides=[])
    return parser
