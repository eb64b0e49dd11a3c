"""Where one launch's warps wait, instruction by instruction: reads Nsight Compute's source page as CSV
(`ncu --import REPORT --page source --csv --print-source sass`, a report taken with `--section SourceCounters`)
and prints each SASS instruction's share of the warp stall samples, the largest first, then the shares summed by
opcode. A sample counts a warp that was at that instruction, waiting or issuing: in a persistent recurrence kernel
the instruction that waits for the h loads, the cluster or grid barrier, the fence before it or the tensor cores
shows where the step's time goes (perf/NOTES.md "Session 25").

    python perf/ncu_source.py ncu-source.csv [--top 30]
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict


def read_rows(lines: list[str]) -> tuple[list[tuple[str, float]], str]:
    """(instruction, samples) of every SASS row, and the samples column's name. The header is the first row with a
    "Source" column (ncu prints lines of its own before it)."""
    start = next((i for i, line in enumerate(lines) if '"Source"' in line or line.startswith("Source,")), None)
    if start is None:
        raise ValueError("no header row with a 'Source' column: is this ncu's --page source --csv output?")
    rows = list(csv.DictReader(lines[start:]))
    names = rows[0].keys() if rows else []
    column = next((n for n in names if n.startswith("Warp Stall Sampling (All")), None) or \
        next((n for n in names if "Sampl" in n), None)
    if column is None:
        raise ValueError(f"no stall-sampling column among {list(names)}")
    out = []
    for row in rows:
        value = (row.get(column) or "").replace(",", "").strip()
        try:
            out.append((row["Source"].strip(), float(value)))
        except ValueError:
            continue
    return out, column


def opcode(instruction: str) -> str:
    """The mnemonic without its modifiers or predicate: '@!P1 LDG.E.128.STRONG.GPU R4, ...' -> 'LDG'."""
    words = instruction.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return re.split(r"[.\s]", words[0])[0] if words else "?"


def report(rows: list[tuple[str, float]], column: str, top: int = 30) -> str:
    total = sum(s for _, s in rows) or 1.0
    lines = [f"{column}: {total:.0f} samples over {len(rows)} instructions", "", "  share  samples  instruction"]
    ranked = sorted(enumerate(rows), key=lambda r: -r[1][1])[:top]
    for index, (ins, s) in ranked:
        lines.append(f"{100 * s / total:6.1f}% {s:8.0f}  #{index:<5d} {ins}")
    by_op: dict[str, float] = defaultdict(float)
    for ins, s in rows:
        by_op[opcode(ins)] += s
    lines += ["", "by opcode:"]
    lines += [f"{100 * s / total:6.1f}%  {op}" for op, s in sorted(by_op.items(), key=lambda kv: -kv[1]) if s]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args(argv)
    with open(a.csv) as f:
        lines = f.read().splitlines()
    try:
        rows, column = read_rows(lines)
    except ValueError as e:
        print(f"perf/ncu_source.py: {e}; the file's first lines:", *lines[:8], sep="\n")
        return 1
    print(report(rows, column, a.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
