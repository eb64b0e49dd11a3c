"""`python -m tritonlstm.bench`: tritonlstm against cuDNN (torch.nn.LSTM on CUDA), same weights, same process.

First version (issue 4 in progress): the single-layer matrix, do_bench timings (median, 20th and 80th
percentiles), peak memory, a correctness check of every cell against cuDNN before it is timed, and the
JSON / CSV / Markdown writers. Without CUDA it says so, runs the interpreter self-check and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
from pathlib import Path

ROW_KEYS = ("dtype", "hidden", "batch", "seq", "layers", "bidirectional", "mode", "tritonlstm_ms", "cudnn_ms",
            "speedup", "tritonlstm_peak_mb", "cudnn_peak_mb", "max_rel_err")
DTYPES = ("float16", "bfloat16", "float32")
MODES = ("fwd", "fwdbwd")
# Relative error against cuDNN above which a cell is reported as an error instead of timed.
CHECK_LIMIT = {"float32": 5e-3, "float16": 1e-2, "bfloat16": 5e-2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tritonlstm.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a subset: H 512, B 1 and 16, T 256, all dtypes")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, of " + ", ".join(DTYPES))
    ap.add_argument("--hidden", default="256,512,1024", help="comma-separated hidden sizes (input size = H)")
    ap.add_argument("--batch", default="1,16,64,256", help="comma-separated batch sizes")
    ap.add_argument("--seq", type=int, default=256, help="sequence length T")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, of fwd, fwdbwd")
    ap.add_argument("--out", default="bench-out", help="output folder")
    args = ap.parse_args(argv)

    def ints(name: str, text: str) -> list[int]:
        try:
            vals = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            ap.error(f"--{name} takes comma-separated integers, got {text!r}")
        if not vals or min(vals) < 1:
            ap.error(f"--{name} takes positive integers, got {text!r}")
        return vals

    def choices(name: str, text: str, allowed: tuple[str, ...]) -> list[str]:
        vals = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            ap.error(f"--{name}: expected some of {', '.join(allowed)}, got {text!r}")
        return vals

    args.dtypes = choices("dtypes", args.dtypes, DTYPES)
    args.modes = choices("modes", args.modes, MODES)
    args.hidden = ints("hidden", args.hidden)
    args.batch = ints("batch", args.batch)
    if args.seq < 1:
        ap.error(f"--seq must be >= 1, got {args.seq}")
    if args.quick:
        args.hidden, args.batch = [512], [1, 16]
    return args


# ----------------------------------------------------------------------------------------------------------
# Measuring one cell
# ----------------------------------------------------------------------------------------------------------


def _rel(a, b) -> float:
    import torch

    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def measure_cell(dtype_name: str, hidden: int, batch: int, seq: int, mode: str) -> dict:
    """One row; a cell whose output disagrees with cuDNN gets an "error" and no timings."""
    import torch

    from tritonlstm.functional import fused_lstm

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(hidden, hidden).to("cuda", dtype)
    w = [p.detach().clone().requires_grad_(mode == "fwdbwd") for p in
         (ref.weight_ih_l0, ref.weight_hh_l0, ref.bias_ih_l0, ref.bias_hh_l0)]
    x = torch.randn(seq, batch, hidden, device="cuda", dtype=dtype, requires_grad=mode == "fwdbwd")
    row = {"dtype": dtype_name, "hidden": hidden, "batch": batch, "seq": seq, "layers": 1, "bidirectional": False,
           "mode": mode}

    def ours():
        y, _ = fused_lstm(x, *w, backend="triton")
        if mode == "fwdbwd":
            y.backward(torch.ones_like(y))
        return y

    def cudnn():
        y, _ = ref(x)
        if mode == "fwdbwd":
            y.backward(torch.ones_like(y))
        return y

    grad_ctx = torch.enable_grad if mode == "fwdbwd" else torch.no_grad
    with grad_ctx():
        row.update(check_then_time(ours, cudnn, CHECK_LIMIT[dtype_name], grad_to_none=[x, *w, *ref.parameters()]))
    return row


def check_then_time(ours, cudnn, limit: float, grad_to_none=(), timer=None) -> dict:
    """Compares the two outputs first; times both (median, q20, q80 and peak memory) only if they agree."""
    import torch

    if timer is None:
        from triton.testing import do_bench as timer
    err = _rel(ours(), cudnn())
    out = {"max_rel_err": err}
    if not err <= limit:
        out["error"] = f"output differs from cuDNN: rel err {err:.2e} > {limit:.0e}"
        return out
    for name, fn in (("tritonlstm", ours), ("cudnn", cudnn)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = timer(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8], grad_to_none=list(grad_to_none))
        out[f"{name}_ms"], out[f"{name}_ms_q20"], out[f"{name}_ms_q80"] = ms
        out[f"{name}_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    out["speedup"] = out["cudnn_ms"] / out["tritonlstm_ms"]
    return out


# ----------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------


def environment() -> dict[str, str]:
    import torch
    import triton

    return {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "torch": torch.__version__, "triton": triton.__version__,
            "cudnn": str(torch.backends.cudnn.version()) if torch.cuda.is_available() else "none",
            "date": datetime.date.today().isoformat()}


def clean_row(row: dict) -> dict:
    """The row with exactly ROW_KEYS (None where a cell was not timed)."""
    return {k: row.get(k) for k in ROW_KEYS}


def write_results(out: Path, env: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    clean = [clean_row(r) for r in rows]
    errors = [{**clean_row(r), "error": r["error"]} for r in rows if r.get("error")]
    (out / "results.json").write_text(json.dumps({**env, "rows": clean, "errors": errors}, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=ROW_KEYS)
        wr.writeheader()
        wr.writerows(clean)
    (out / "results.md").write_text(markdown_table(env, rows))


def markdown_table(env: dict, rows: list[dict]) -> str:
    lines = [f"GPU: {env['gpu']}, torch {env['torch']}, triton {env['triton']}, cuDNN {env['cudnn']}, "
             f"{env['date']}. Speed-up = cuDNN ms / tritonlstm ms (do_bench medians, same process).", ""]
    for dtype in DTYPES:
        for mode in MODES:
            sel = [r for r in rows if r["dtype"] == dtype and r["mode"] == mode]
            if not sel:
                continue
            lines += [f"### {dtype}, {mode}", "", "| H | B | T | tritonlstm ms | cuDNN ms | speed-up | rel err |",
                      "|---|---|---|---|---|---|---|"]
            for r in sel:
                if r.get("error"):
                    lines.append(f"| {r['hidden']} | {r['batch']} | {r['seq']} | ERROR: {r['error']} | | | |")
                else:
                    lines.append(f"| {r['hidden']} | {r['batch']} | {r['seq']} | {r['tritonlstm_ms']:.3f} | "
                                 f"{r['cudnn_ms']:.3f} | {r['speedup']:.2f}x | {r['max_rel_err']:.1e} |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("tritonlstm.bench: no CUDA device, nothing to time; running the interpreter self-check instead.")
        os.environ.setdefault("TRITON_INTERPRET", "1")
        from tritonlstm.selfcheck import run

        run()
        return 0
    cells = [(d, h, b, m) for d in args.dtypes for h in args.hidden for b in args.batch for m in args.modes]
    rows = []
    for i, (d, h, b, m) in enumerate(cells, 1):
        print(f"\r[{i}/{len(cells)}] {d} H={h} B={b} T={args.seq} {m}        ", end="", file=sys.stderr, flush=True)
        rows.append(measure_cell(d, h, b, args.seq, m))
    print(file=sys.stderr)
    env = environment()
    write_results(Path(args.out), env, rows)
    print(markdown_table(env, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
