"""Summaries shared by the benchmarks: percentiles of a sample and a two-column table."""
from __future__ import annotations


def percentiles(values: list[float], ps=(50, 90, 99)) -> dict:
    """mean and the p-th percentiles (linear interpolation between order statistics); None when empty."""
    if not values:
        return {"mean": None, **{f"p{p}": None for p in ps}}
    xs = sorted(values)
    out = {"mean": sum(xs) / len(xs)}
    for p in ps:
        k = (len(xs) - 1) * p / 100
        lo = int(k)
        hi = min(lo + 1, len(xs) - 1)
        out[f"p{p}"] = xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
    return out


def print_table(title: str, rows: list[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"== {title}")
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.1f}"
        print(f"{k:<{width}}  {v}")
