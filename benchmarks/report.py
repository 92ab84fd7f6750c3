"""The one convention between a benchmark's results file and BENCHMARKS.md: the summary block.

A results file (benchmarks/results/NAME.md) holds a run's full tables and notes. Its summary block, the lines
between the two markers below, is what run_all.py copies onto the one-page BENCHMARKS.md: the run's date,
device and command, then a table of its headline figures, each beside the reference measured in the same run.
The markers are HTML comments, so the block reads as ordinary markdown where it stands.
"""
from __future__ import annotations

import re

START, END = "<!-- summary -->", "<!-- /summary -->"
HEADER = ["| what | latest | reference, same run | ratio |", "|---|---|---|---|"]


def summary_block(provenance: str, rows: list[str]) -> list[str]:
    """The block's lines: `provenance` (date; device; command) above a table of `rows` (what | latest | ref | ratio)."""
    return [START, provenance, "", *HEADER, *rows, END]


def read_summary(text: str) -> str | None:
    """The block's contents in a results file's text, or None if it has none."""
    m = re.search(re.escape(START) + r"\n(.*?)\n?" + re.escape(END), text, re.S)
    return m.group(1).strip() if m else None
