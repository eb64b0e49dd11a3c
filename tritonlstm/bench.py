"""`python -m tritonlstm.bench`: tritonlstm against cuDNN (torch.nn.LSTM on CUDA), same weights, same process.

The matrix: single layer, every dtype x H x B at T = 256, plus (H = 512, B = 16) stacks: 2 layers, 1 layer
bidirectional, 2 layers bidirectional, 4 layers. Each cell in forward (no grad) and forward+backward mode, timed
with do_bench (median, 20th and 80th percentiles) right beside cuDNN with copied weights, peak memory of both,
after a correctness check against cuDNN (a cell that disagrees is reported as an error, never timed). Writes
results.json, results.csv, results.md, heatmap.png and targets.md (`tritonlstm.targets`: which of issue 5's and
7's targets the cells meet). Without CUDA it says so, runs the interpreter self-check
and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import json
import os
import sys
from pathlib import Path

ROW_KEYS = ("dtype", "hidden", "batch", "seq", "layers", "bidirectional", "mode", "tritonlstm_ms", "cudnn_ms",
            "speedup", "tritonlstm_peak_mb", "cudnn_peak_mb", "max_rel_err")
CELL_KEYS = ROW_KEYS[:7]
QUANTILE_KEYS = ("tritonlstm_ms_q20", "tritonlstm_ms_q80", "cudnn_ms_q20", "cudnn_ms_q80")
HOST_KEYS = ("tritonlstm_host_ms", "cudnn_host_ms")
DTYPES = ("float16", "bfloat16", "float32")
MODES = ("fwd", "fwdbwd")
# (layers, bidirectional) rows measured at H = 512, B = 16 besides the single-layer matrix.
STACKS = ((2, False), (1, True), (2, True), (4, False))
# Relative error against cuDNN above which a cell is reported as an error instead of timed.
CHECK_LIMIT = {"float32": 5e-3, "float16": 1e-2, "bfloat16": 5e-2}
# The gradients' (fwdbwd): twice the output's, as the GPU tests take (the weight gradients sum T * B terms); a wrong
# gradient is off by 0.1 or more (run 7's tuner: 0.18).
GRAD_LIMIT = {name: 2 * limit for name, limit in CHECK_LIMIT.items()}


def csv_ints(ap: argparse.ArgumentParser, name: str, text: str) -> list[int]:
    """--name's comma-separated positive integers, or ap.error naming the flag (the bench's and the tuner's CLIs)."""
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        ap.error(f"--{name} takes comma-separated integers, got {text!r}")
    if not vals or min(vals) < 1:
        ap.error(f"--{name} takes positive integers, got {text!r}")
    return vals


def csv_choices(ap: argparse.ArgumentParser, name: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    """--name's comma-separated names, each one of allowed, or ap.error naming the flag."""
    vals = [v.strip() for v in text.split(",") if v.strip()]
    if not vals or any(v not in allowed for v in vals):
        ap.error(f"--{name}: expected some of {', '.join(allowed)}, got {text!r}")
    return vals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tritonlstm.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a subset: H 512, B 1 and 16, T 256, all dtypes")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, of " + ", ".join(DTYPES))
    ap.add_argument("--hidden", default="256,512,1024", help="comma-separated hidden sizes (input size = H)")
    ap.add_argument("--batch", default="1,16,64,256", help="comma-separated batch sizes")
    ap.add_argument("--seq", type=int, default=256, help="sequence length T")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, of fwd, fwdbwd")
    ap.add_argument("--out", default="bench-out", help="output folder")
    ap.add_argument("--no-stacks", action="store_true", help="skip the multi-layer and bidirectional rows")
    args = ap.parse_args(argv)
    args.dtypes = csv_choices(ap, "dtypes", args.dtypes, DTYPES)
    args.modes = csv_choices(ap, "modes", args.modes, MODES)
    args.hidden = csv_ints(ap, "hidden", args.hidden)
    args.batch = csv_ints(ap, "batch", args.batch)
    if args.seq < 1:
        ap.error(f"--seq must be >= 1, got {args.seq}")
    if args.quick:
        args.hidden, args.batch = [512], [1, 16]
    return args


CELL = ("dtype", "hidden", "batch", "seq", "layers", "bidirectional", "mode")  # a cell tuple's fields


def cell_row(cell: tuple) -> dict:
    """The row keys that name a cell."""
    return dict(zip(CELL, cell))


def cells(args: argparse.Namespace) -> list[tuple]:
    """(dtype, hidden, batch, seq, layers, bidirectional, mode) for every cell the options select."""
    out = [(d, h, b, args.seq, 1, False, m) for d in args.dtypes for h in args.hidden for b in args.batch
           for m in args.modes]
    if not args.no_stacks:
        stacks = STACKS[:1] if args.quick else STACKS
        out += [(d, 512, 16, args.seq, n, bi, m) for d in args.dtypes for n, bi in stacks for m in args.modes]
    return out


# ----------------------------------------------------------------------------------------------------------
# Measuring one cell
# ----------------------------------------------------------------------------------------------------------


def _rel(a, b) -> float:
    import torch

    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def measure_cell(dtype_name: str, hidden: int, batch: int, seq: int, layers: int, bidirectional: bool,
                 mode: str) -> dict:
    """One row; a cell whose output disagrees with cuDNN gets an "error" and no timings."""
    import torch

    from tritonlstm.modules import LSTM

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(hidden, hidden, num_layers=layers, bidirectional=bidirectional).to("cuda", dtype)
    model = LSTM(hidden, hidden, num_layers=layers, bidirectional=bidirectional, backend="triton").to("cuda", dtype)
    model.load_state_dict(ref.state_dict())
    x = torch.randn(seq, batch, hidden, device="cuda", dtype=dtype, requires_grad=mode == "fwdbwd")
    row = cell_row((dtype_name, hidden, batch, seq, layers, bidirectional, mode))

    def ours():
        y, _ = model(x)
        if mode == "fwdbwd":
            y.backward(torch.ones_like(y))
        return y

    def cudnn():
        y, _ = ref(x)
        if mode == "fwdbwd":
            y.backward(torch.ones_like(y))
        return y

    grad_ctx = torch.enable_grad if mode == "fwdbwd" else torch.no_grad
    # fwdbwd: x's gradient and every parameter's, by name (the module is a drop-in: the same names).
    ours_params, ref_params = dict(model.named_parameters()), dict(ref.named_parameters())
    grads = None if mode != "fwdbwd" else ([x, *(ours_params[n] for n in ref_params)], [x, *ref_params.values()],
                                           GRAD_LIMIT[dtype_name])
    with grad_ctx():
        row.update(check_then_time(ours, cudnn, CHECK_LIMIT[dtype_name],
                                   grad_to_none=[x, *model.parameters(), *ref.parameters()], grads=grads))
    return row


def warm_cell(dtype_name: str, hidden: int, batch: int, seq: int, layers: int, bidirectional: bool,
              mode: str, device: str = "cuda") -> None:
    """The cell's tritonlstm calls, for `compile_in_parallel` (under it the launchers compile and launch nothing,
    so this takes no GPU time and its outputs are garbage)."""
    import torch

    from tritonlstm.modules import LSTM

    dtype = getattr(torch, dtype_name)
    model = LSTM(hidden, hidden, num_layers=layers, bidirectional=bidirectional, backend="triton").to(device, dtype)
    x = torch.randn(seq, batch, hidden, device=device, dtype=dtype, requires_grad=mode == "fwdbwd")
    with torch.enable_grad() if mode == "fwdbwd" else torch.no_grad():
        y, _ = model(x)
        if mode == "fwdbwd":
            y.backward(torch.ones_like(y))


def host_ms(fn, grad_to_none=(), calls: int = 5, sleep_cycles: int = 100_000_000) -> float:
    """The host's time per call in ms: the calls queued while a sleep kernel (~50 ms) holds the GPU, so that it
    cannot pace them. A cell whose time is near it is host-bound (perf/NOTES.md, session 19); a call that waits for
    the GPU somewhere shows as the sleep's length."""
    import time

    import torch

    torch.cuda.synchronize()
    torch.cuda._sleep(sleep_cycles)
    start = time.perf_counter()
    for _ in range(calls):
        for t in grad_to_none:
            t.grad = None
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e3


def check_then_time(ours, cudnn, limit: float, grad_to_none=(), timer=None, grads=None, host_timer=None) -> dict:
    """Compares the two outputs first, and with grads = (ours' leaves, cuDNN's leaves, limit) the gradients each
    call leaves in them, pair by pair; times both (median, q20, q80, the host's time per call and peak memory) only
    if they agree. host_timer(fn, grad_to_none) -> ms: host_ms with the default timer, none with another."""
    import torch

    from tritonlstm.functional import synchronize

    if timer is None:
        from triton.testing import do_bench as timer

        host_timer = host_timer or host_ms

    def call(fn, leaves):
        for t in grad_to_none:
            t.grad = None
        y = fn()
        return y, [None if t.grad is None else t.grad.clone() for t in leaves]

    (y_ours, g_ours), (y_cudnn, g_cudnn) = call(ours, grads[0] if grads else ()), call(cudnn, grads[1] if grads else ())
    err = _rel(y_ours, y_cudnn)
    out = {"max_rel_err": err}
    if not err <= limit:
        out["error"] = f"output differs from cuDNN: rel err {err:.2e} > {limit:.0e}"
        return out
    if grads:
        errs = [float("inf") if a is None or b is None else _rel(a, b) for a, b in zip(g_ours, g_cudnn)]
        worst = max(range(len(errs)), key=errs.__getitem__)
        out["grad_rel_err"] = errs[worst]
        if not errs[worst] <= grads[2]:
            out["error"] = (f"gradient {worst} (0: the input's, then the parameters') differs from cuDNN: rel err "
                            f"{errs[worst]:.2e} > {grads[2]:.0e}")
            return out
    for name, fn in (("tritonlstm", ours), ("cudnn", cudnn)):
        ms = timer(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8], grad_to_none=list(grad_to_none))
        if host_timer is not None:
            out[f"{name}_host_ms"] = host_timer(fn, grad_to_none)
        # Peak memory of one call on its own: inside do_bench it would include do_bench's 256 MB cache-flush
        # buffer (both sides alike, which flattered the ratio in runs 1-3).
        for t in grad_to_none:
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        if name == "tritonlstm":
            try:
                synchronize()  # launches do not wait for the barrier check; a failed one is an error, not a time
            except RuntimeError as e:
                out["error"] = str(e)
                return out
        torch.cuda.synchronize()
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


def write_results(out: Path, env: dict, rows: list[dict], heatmap: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    clean = [clean_row(r) for r in rows]
    errors = [{**clean_row(r), "error": r["error"]} for r in rows if r.get("error")]
    # do_bench's 20th and 80th percentiles beside each median: runs 3-5 moved some cells by 10-60 % between calls
    # (perf/NOTES.md), and a wide spread within one call says the time itself varies from launch to launch.
    spread = [{**{k: r[k] for k in CELL_KEYS}, **{k: r.get(k) for k in QUANTILE_KEYS}}
              for r in rows if any(r.get(k) is not None for k in QUANTILE_KEYS)]
    # The host's time per call of each side (host_ms): where it reaches the median, the cell is host-bound.
    host = [{**{k: r[k] for k in CELL_KEYS}, **{k: r.get(k) for k in HOST_KEYS}}
            for r in rows if any(r.get(k) is not None for k in HOST_KEYS)]
    (out / "results.json").write_text(json.dumps({**env, "rows": clean, "errors": errors, "spread": spread,
                                                  "host": host}, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=ROW_KEYS)
        wr.writeheader()
        wr.writerows(clean)
    (out / "results.md").write_text(markdown_table(env, rows))
    if heatmap:
        write_heatmap(out / "heatmap.png", env, rows)


def write_rows_json(path: str | os.PathLike, rows: list[dict]) -> None:
    """The perf scripts' --json file (perf/kernel_ab.py and the probes): the GPU's name and the rows so far,
    rewritten after each row, so that a run cut short keeps what it finished."""
    import torch

    Path(path).write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "rows": rows}, indent=1))


def write_heatmap(path: Path, env: dict, rows: list[dict]) -> bool:
    """Speed-ups of the single-layer cells: one panel per mode, rows dtype x H, columns B. False (and a note on
    stderr) if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import TwoSlopeNorm
    except ImportError:
        print("tritonlstm.bench: matplotlib not installed, no heatmap.png (pip install tritonlstm[perf])",
              file=sys.stderr)
        return False
    single = [r for r in rows if r["layers"] == 1 and not r["bidirectional"]]
    modes = [m for m in MODES if any(r["mode"] == m for r in single)] or list(MODES)
    ylabels = sorted({(r["dtype"], r["hidden"]) for r in single}, key=lambda k: (DTYPES.index(k[0]), k[1]))
    batches = sorted({r["batch"] for r in single})
    fig, axes = plt.subplots(1, len(modes), figsize=(4 + 1.2 * len(batches) * len(modes), 1 + 0.5 * len(ylabels)),
                             squeeze=False)
    for ax, mode in zip(axes[0], modes):
        grid = [[float("nan")] * len(batches) for _ in ylabels]
        for r in single:
            if r["mode"] == mode and r.get("speedup"):
                grid[ylabels.index((r["dtype"], r["hidden"]))][batches.index(r["batch"])] = r["speedup"]
        # Diverging at 1.0: red where cuDNN wins, green where tritonlstm does.
        top = max([2.0] + [v for row in grid for v in row if v == v])
        im = ax.imshow(grid, cmap="RdYlGn", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top), aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, "err" if v != v else f"{v:.2f}x", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(batches)), [f"B={b}" for b in batches])
        ax.set_yticks(range(len(ylabels)), [f"{d} H={h}" for d, h in ylabels])
        ax.set_title(f"{mode}: cuDNN ms / tritonlstm ms")
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def markdown_table(env: dict, rows: list[dict]) -> str:
    lines = [f"GPU: {env['gpu']}, torch {env['torch']}, triton {env['triton']}, cuDNN {env['cudnn']}, "
             f"{env['date']}. Speed-up = cuDNN ms / tritonlstm ms (do_bench medians, same process).", ""]
    for dtype in DTYPES:
        for mode in MODES:
            sel = [r for r in rows if r["dtype"] == dtype and r["mode"] == mode]
            if not sel:
                continue
            lines += [f"### {dtype}, {mode}", "",
                      "| layers | H | B | T | tritonlstm ms | us/step | cuDNN ms | speed-up | peak MB (ours / cuDNN) "
                      "| rel err (y / grads) |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for r in sel:
                stack = f"{r['layers']}{' bidir' if r['bidirectional'] else ''}"
                if r.get("error"):
                    lines.append(f"| {stack} | {r['hidden']} | {r['batch']} | {r['seq']} | ERROR: {r['error']} "
                                 "| | | | | |")
                else:
                    # Per step of the sequence, everything included (input GEMM, launches): an upper bound on
                    # the recurrence's step time, the number issue 5's <= 1.5 us target is about.
                    per_step = 1000 * r["tritonlstm_ms"] / r["seq"]
                    lines.append(f"| {stack} | {r['hidden']} | {r['batch']} | {r['seq']} | {r['tritonlstm_ms']:.3f} | "
                                 f"{per_step:.2f} | {r['cudnn_ms']:.3f} | {r['speedup']:.2f}x | "
                                 f"{r['tritonlstm_peak_mb']:.0f} / {r['cudnn_peak_mb']:.0f} | {r['max_rel_err']:.1e}"
                                 + (f" / {r['grad_rel_err']:.1e}" if r.get("grad_rel_err") is not None else "") + " |")
            lines.append("")
    return "\n".join(lines)


def progress(done: int, total: int, cell: tuple | None, width: int = 30) -> None:
    filled = width * done // max(total, 1)
    what = "" if cell is None else "{} H={} B={} T={} L={}{} {}".format(*cell[:5], " bidir" if cell[5] else "",
                                                                             cell[6])
    end = "\n" if done == total else ""
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what:<48}", end=end, file=sys.stderr,
          flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("tritonlstm.bench: no CUDA device, nothing to time; running the interpreter self-check instead.")
        from tritonlstm.selfcheck import run

        run()
        return 0
    todo = cells(args)
    from tritonlstm.tuning import compile_in_parallel

    print(f"tritonlstm.bench: compiling the kernels of {len(todo)} cells in parallel", file=sys.stderr, flush=True)
    compile_in_parallel([functools.partial(warm_cell, *cell) for cell in todo])
    env = environment()
    rows = []
    for i, cell in enumerate(todo):
        progress(i, len(todo), cell)
        rows.append(measure_or_error(cell))
        write_results(Path(args.out), env, rows, heatmap=False)  # a run cut short keeps the cells it finished
    progress(len(todo), len(todo), None)
    write_results(Path(args.out), env, rows)
    print(markdown_table(env, rows))
    from tritonlstm.targets import report

    targets = report(rows)
    (Path(args.out) / "targets.md").write_text(targets + "\n")
    print(targets)
    return 0


def measure_or_error(cell: tuple) -> dict:
    """measure_cell, with an exception (a kernel that fails to compile or launch, out of memory) reported as the
    cell's error so that one broken cell does not cost the rest of the matrix."""
    import torch

    try:
        return measure_cell(*cell)
    except Exception as e:  # noqa: BLE001 - any failure is this cell's result
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - a broken context fails the next cells too, each with its error
            pass
        return {**cell_row(cell), "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}


if __name__ == "__main__":
    sys.exit(main())
