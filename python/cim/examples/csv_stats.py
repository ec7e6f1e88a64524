"""``csv-stats@1.0.0``: summary statistics of a CSV table, per column (standard library only).

Input: a CSV document (UTF-8, with a header row; the dialect — comma, semicolon, tab, ... — is
sniffed). Output: a JSON document::

    {"rows": 3, "columns": [
       {"name": "price", "type": "number", "count": 3, "missing": 0,
        "min": 1.5, "max": 9.0, "mean": 4.0, "median": 1.5, "stdev": 4.33, "sum": 12.0},
       {"name": "city", "type": "text", "count": 3, "missing": 0, "distinct": 2,
        "top": [["Oslo", 2], ["Rome", 1]]}]}

Metadata: ``rows``, ``columns``, ``numeric-columns``. A column is a number column when every
non-empty cell parses as a number; empty cells count as missing. Refused (``STATUS_INVALID_INPUT``,
with the reason): input that is not UTF-8, an empty table, a row with more or fewer cells than
the header (named by its line), duplicate or empty header names.

Run it: ``python -m cim.examples.csv_stats --nats-url nats://127.0.0.1:4222``; the pipeline
``examples/pipelines/csv-stats.json`` calls it for every CSV unit uploaded.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import Counter

from cim.plugin import InvalidInput, Output, Plugin

plugin = Plugin(
    "csv-stats",
    "1.0.0",
    capabilities=["table.stats"],
    description="summary statistics per column of a csv table, as json",
    timeout=30.0,
)

TOP = 5


def _number(cell: str) -> float | None:
    try:
        v = float(cell.replace("_", "x"))  # "1_000" is not a number in a table
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _round(v: float) -> float:
    return float(f"{v:.6g}")


def summarize(text: str) -> dict:
    """The statistics of a CSV document (pure; raises InvalidInput)."""
    if not text.strip():
        raise InvalidInput("empty input: a csv table needs a header row")
    sample = text[:65536]
    try:
        dialect = csv.Sniffer().sniff(sample, delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text, newline=""), dialect)
    try:
        header = next(reader)
    except csv.Error as e:
        raise InvalidInput(f"not csv: {e}")
    names = [h.strip() for h in header]
    if any(not n for n in names):
        raise InvalidInput(f"header row has an empty column name: {header!r}")
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup:
        raise InvalidInput(f"header row names column {dup[0]!r} twice")
    columns: list[list[str]] = [[] for _ in names]
    rows = 0
    try:
        for row in reader:
            if not row:
                continue
            if len(row) != len(names):
                raise InvalidInput(
                    f"line {reader.line_num}: {len(row)} cells, the header has {len(names)}"
                )
            rows += 1
            for i, cell in enumerate(row):
                columns[i].append(cell.strip())
    except csv.Error as e:
        raise InvalidInput(f"not csv: line {reader.line_num}: {e}")
    out = []
    for name, cells in zip(names, columns):
        present = [c for c in cells if c != ""]
        col: dict = {"name": name, "count": len(present), "missing": len(cells) - len(present)}
        numbers = [_number(c) for c in present]
        if present and all(n is not None for n in numbers):
            nums = [n for n in numbers if n is not None]
            col["type"] = "number"
            col["min"] = _round(min(nums))
            col["max"] = _round(max(nums))
            col["sum"] = _round(math.fsum(nums))
            col["mean"] = _round(statistics.fmean(nums))
            col["median"] = _round(statistics.median(nums))
            col["stdev"] = _round(statistics.stdev(nums)) if len(nums) > 1 else 0.0
        else:
            col["type"] = "text" if present else "empty"
            counts = Counter(present)
            col["distinct"] = len(counts)
            col["top"] = [[v, n] for v, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP]]
        out.append(col)
    return {"rows": rows, "columns": out}


@plugin.handler
def csv_stats(data: bytes, metadata: dict[str, str]) -> Output:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"not utf-8 text: byte {e.start} ({data[e.start:e.start + 1]!r}) is invalid")
    summary = summarize(text)
    numeric = sum(1 for c in summary["columns"] if c["type"] == "number")
    body = json.dumps(summary, indent=2, ensure_ascii=False).encode()
    return Output(
        body,
        {"rows": str(summary["rows"]), "columns": str(len(summary["columns"])), "numeric-columns": str(numeric)},
    )


def main() -> None:
    plugin.main()


if __name__ == "__main__":
    main()
