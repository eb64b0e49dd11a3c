"""`python -m tritonlstm.targets results.json`: which of issue 5's and issue 7's targets a bench run meets.

Reads the rows of `python -m tritonlstm.bench` (its results.json) and checks each target on the cells the run
measured, with the numbers that decide it; cells the run did not measure are counted as missing, never as met.
The bench prints this after its tables and writes it to targets.md. Works without a GPU (it only reads rows).
"""

from __future__ import annotations

import json
import math
import sys

T = 256
DTYPES = ("float16", "bfloat16", "float32")
SINGLE = [(d, h, b) for d in DTYPES for h in (256, 512, 1024) for b in (1, 16, 64, 256)]
# cuDNN runs a kernel per step in every bf16 and fp32 cell, and in fp16 at B = 1 (issue 5.3).
PER_STEP = [(d, h, b) for d, h, b in SINGLE if d != "float16" or b == 1]
STACKS = ((2, False, "2 layers"), (1, True, "1 layer bidirectional"), (2, True, "2 layers bidirectional"),
          (4, False, "4 layers"))


def _index(rows: list[dict]) -> dict:
    """(dtype, hidden, batch, seq, layers, bidirectional, mode) -> row, for the rows that have a time."""
    out = {}
    for r in rows:
        if r.get("error") or not isinstance(r.get("speedup"), (int, float)) or math.isnan(r["speedup"]):
            continue
        out[(r["dtype"], r["hidden"], r["batch"], r["seq"], r["layers"], bool(r["bidirectional"]), r["mode"])] = r
    return out


def _line(name: str, checks: list[tuple[str, bool | None, str]]) -> list[str]:
    """One target: how many cells meet it, then every cell that does not (None: not measured)."""
    met = sum(ok is True for _, ok, _ in checks)
    missing = [c for c in checks if c[1] is None]
    status = "HOLDS" if met == len(checks) else "misses"
    out = [f"- {name}: {status}, {met}/{len(checks)}" + (f" ({len(missing)} not measured)" if missing else "")]
    out += [f"    {cell}: {why}" for cell, ok, why in checks if ok is False]
    return out


def _name(d: str, h: int, b: int, layers: int = 1, bidir: bool = False) -> str:
    return f"{d} H={h} B={b}" + ("" if layers == 1 and not bidir else f" L={layers}{' bidir' if bidir else ''}")


def report(rows: list[dict]) -> str:
    idx = _index(rows)

    def speedup(cell, mode, layers=1, bidir=False, at_least=1.0):
        r = idx.get((*cell, T, layers, bidir, mode))
        if r is None:
            return _name(*cell, layers, bidir), None, "not measured"
        return (_name(*cell, layers, bidir), r["speedup"] >= at_least,
                f"{r['speedup']:.2f}x ({r['tritonlstm_ms']:.3f} / {r['cudnn_ms']:.3f} ms)")

    def memory(cell, layers=1, bidir=False):
        r = idx.get((*cell, T, layers, bidir, "fwdbwd"))
        if r is None:
            return _name(*cell, layers, bidir), None, "not measured"
        ours, theirs = r["tritonlstm_peak_mb"], r["cudnn_peak_mb"]
        return (_name(*cell, layers, bidir), ours <= 1.1 * theirs,
                f"{ours:.0f} MB vs cuDNN {theirs:.0f} MB ({ours / theirs:.2f}x)")

    lines = ["Issue 5 (single layer, T = 256; speed-up = cuDNN ms / tritonlstm ms):"]
    for mode, label in (("fwd", "5.1 forward >= 1x"), ("fwdbwd", "5.2 forward+backward >= 1x")):
        lines += _line(label, [speedup(c, mode) for c in SINGLE])
    lines += _line("5.3 per-step regime (bf16, fp32, fp16 B = 1): forward >= 3x",
                   [speedup(c, "fwd", at_least=3.0) for c in PER_STEP])
    lines += _line("5.3 per-step regime: forward+backward >= 2x",
                   [speedup(c, "fwdbwd", at_least=2.0) for c in PER_STEP])
    fp16_b16 = [("float16", h, 16) for h in (256, 512, 1024)]
    lines += _line("5.4 fp16 B = 16 forward >= 1x", [speedup(c, "fwd") for c in fp16_b16])
    steps = []
    for c in fp16_b16:
        r = idx.get((*c, T, 1, False, "fwd"))
        us = None if r is None else 1000 * r["tritonlstm_ms"] / T
        steps.append((f"float16 H={c[1]} B=16", None if us is None else us <= 1.5,
                      "not measured" if us is None else f"{us:.2f} us per step (everything included)"))
    lines += _line("5.4 fp16 B = 16 forward step <= 1.5 us", steps)

    lines += _line("5.5 peak memory of forward+backward <= cuDNN's + 10 %", [memory(c) for c in SINGLE])
    errors = [r for r in rows if r.get("error")]
    lines += [f"- 5.6 every cell passes the correctness check: {'HOLDS' if not errors else 'misses'}, "
              f"{len(errors)} cells with an error"]
    lines += [f"    {r['dtype']} H={r['hidden']} B={r['batch']} L={r['layers']} {r['mode']}: {r['error']}"
              for r in errors]

    lines += ["", "Issue 7 (H = 512, B = 16, T = 256):"]
    for mode, bound in (("fwd", 4.0), ("fwdbwd", 2.5)):
        for layers, bidir, label in STACKS:
            lines += _line(f"{label}, {mode} >= {bound}x",
                           [speedup((d, 512, 16), mode, layers, bidir, bound) for d in DTYPES])
    ratio = []
    for d in DTYPES:
        four, one = idx.get((d, 512, 16, T, 4, False, "fwd")), idx.get((d, 512, 16, T, 1, False, "fwd"))
        if four is None or one is None:
            ratio.append((d, None, "not measured"))
        else:
            x = four["tritonlstm_ms"] / one["tritonlstm_ms"]
            ratio.append((d, x <= 1.5, f"4 layers {four['tritonlstm_ms']:.3f} ms = {x:.2f}x one layer's "
                                       f"{one['tritonlstm_ms']:.3f} ms"))
    lines += _line("4-layer forward within 1.5x of a 1-layer forward", ratio)
    lines += _line("stack memory of forward+backward <= cuDNN's + 10 % (not an issue-7 target; for the record)",
                   [memory((d, 512, 16), n, bi) for d in DTYPES for n, bi, _ in STACKS])
    lines += _host_bound(rows)
    return "\n".join(lines)


# A cell whose host time per call reaches this share of its median time is held by the host, not by its kernels.
HOST_BOUND = 0.8


def _host_bound(rows: list[dict]) -> list[str]:
    """Not a target: the cells whose time is the host's (the bench's host time per call, `bench.host_ms`, at least
    HOST_BOUND of the median), with cuDNN's host time beside. Where ours is, a faster kernel cannot move the cell
    (perf/NOTES.md, session 19)."""
    timed = [r for r in rows if not r.get("error") and isinstance(r.get("tritonlstm_host_ms"), (int, float))
             and isinstance(r.get("tritonlstm_ms"), (int, float))]
    if not timed:
        return []
    bound = [r for r in timed if r["tritonlstm_host_ms"] >= HOST_BOUND * r["tritonlstm_ms"]]
    lines = ["", f"Host-bound cells (not a target: our host time per call >= {HOST_BOUND:.0%} of our median): "
                 f"{len(bound)} of {len(timed)} timed"]
    for r in bound:
        theirs = r.get("cudnn_host_ms")
        lines.append(f"    {_name(r['dtype'], r['hidden'], r['batch'], r['layers'], bool(r['bidirectional']))} "
                     f"{r['mode']}: host {r['tritonlstm_host_ms']:.3f} of {r['tritonlstm_ms']:.3f} ms"
                     + ("" if not isinstance(theirs, (int, float)) else
                        f" (cuDNN's host {theirs:.3f} of {r['cudnn_ms']:.3f} ms)"))
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m tritonlstm.targets RESULTS_JSON   (the bench's results.json)"
    if argv in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        print(usage, file=sys.stderr)
        return 2
    try:
        with open(argv[0]) as f:
            data = json.load(f)
        rows = data["rows"] + data.get("errors", [])
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"no 'rows' list ({type(e).__name__}: {e})" if isinstance(e, (KeyError, TypeError)) else e
        print(f"python -m tritonlstm.targets: RESULTS_JSON {argv[0]!r} is not the bench's results.json: {why}",
              file=sys.stderr)
        return 2
    # The host times sit in their own list (results.json "host"), keyed by the cell.
    from tritonlstm.bench import CELL_KEYS

    host = {tuple(h[k] for k in CELL_KEYS): h for h in data.get("host", [])}
    rows = [{**r, **host.get(tuple(r[k] for k in CELL_KEYS), {})} for r in rows]
    print(f"{data.get('gpu', '?')}, torch {data.get('torch', '?')}, triton {data.get('triton', '?')}, "
          f"{data.get('date', '?')}")
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
