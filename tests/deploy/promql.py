"""Just enough PromQL and exposition-format reading to check configs against a live scrape."""
from __future__ import annotations

import re

SELECTOR = re.compile(r"\b(rfserve_\w+)\s*(?:\{([^}]*)\})?")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched on) for every rfserve_* selector in a PromQL expression."""
    return [(name, set(MATCHER.findall(body or ""))) for name, body in SELECTOR.findall(expr)]


def exported(text: str) -> dict[str, set[str]]:
    """Series names in an exposition, each with the label names seen on its samples.
    Names come from the TYPE lines, so a counter with no samples yet still counts."""
    series: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            for suffix in HISTOGRAM_SERIES if kind == "histogram" else ("",):
                series.setdefault(name + suffix, set())
        elif line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            if rest:
                series.setdefault(name, set()).update(MATCHER.findall(rest.rsplit("}", 1)[0]))
    return series
