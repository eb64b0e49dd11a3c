"""Launch-to-launch spread of one forward cell, from the kernel alone up to the module, beside cuDNN (perf/NOTES.md,
session 12): run 5's bench sat 0.2-0.3 ms above the tuner's kernel-alone time in three small cells (fp16 H = 256
B = 16: 0.89 against 0.63 ms) where the input GEMM cannot account for it, and those cells moved between runs.

Each rep flushes L2 (as do_bench does) and times every level once, in turn, with CUDA events around that call
alone, so drift hits the levels alike:
  kernel   the recurrence kernel on the tuner's random inputs (tuning.Problem.launch: what the tuner timed)
  op       the recurrence on the module's own gx and weights (functional._recurrence_forward: + states, bias)
  lean     the layer's ATen ops (input GEMM, bias sum, zero states) and the op, nothing else: the floor of a
           no-grad forward's host path with the library's device work (perf/NOTES.md, sessions 19-20)
  layer    functional.lstm_layer (+ the input GEMM, the bias sum, the checks and the plumbing)
  module   tritonlstm.LSTM (+ the module's checks and states: what the bench timed)
  cudnn    nn.LSTM
A wide q20-q80 (or a bimodal min / median) says the time varies launch to launch; equal narrow spreads with a gap
between two levels name the level that adds it. Then each level's host time per call (bench.host_ms: calls queued
behind a sleep kernel): where a level's time is its host time, the gap to "lean" is what a leaner host path would
take off.

    python perf/launch_spread.py [--cells float16:256:16,bfloat16:512:16] [--seq 256] [--reps 60] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys

from tritonlstm.bench import write_rows_json

DEFAULT_CELLS = "float16:256:16,float16:512:16,bfloat16:512:16,bfloat16:256:1"
LEVELS = ("kernel", "op", "lean", "layer", "module", "cudnn")


def parse_cells(text: str) -> list[tuple[str, int, int]]:
    cells = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in ("float16", "bfloat16", "float32") or not all(
                p.isdigit() and int(p) > 0 for p in parts[1:]):
            raise argparse.ArgumentTypeError(f"--cells: expected dtype:H:B with dtype float16, bfloat16 or float32 "
                                             f"and H, B >= 1, got {item!r}")
        cells.append((parts[0], int(parts[1]), int(parts[2])))
    return cells


def percentiles(times: list[float]) -> dict[str, float]:
    s = sorted(times)

    def q(p: float) -> float:
        return s[min(len(s) - 1, round(p * (len(s) - 1)))]

    return {"min": s[0], "q20": q(0.2), "median": q(0.5), "q80": q(0.8), "max": s[-1]}


def levels(dtype_name: str, hidden: int, batch: int, seq: int, device: str = "cuda") -> dict:
    """The five calls of one cell, each a no-argument function (under no_grad), after a check that they agree
    (device "cpu": on the interpreter, for the tests)."""
    import torch

    from tritonlstm import functional
    from tritonlstm.configs import select_config
    from tritonlstm.modules import LSTM
    from tritonlstm.tuning import make_problem

    dtype = getattr(torch, dtype_name)
    device = torch.device(device)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(hidden, hidden).to(device, dtype)
    model = LSTM(hidden, hidden, backend="triton").to(device, dtype)
    model.load_state_dict(ref.state_dict())
    x = torch.randn(seq, batch, hidden, device=device, dtype=dtype)
    weights = [(model.weight_ih_l0, model.weight_hh_l0, model.bias_ih_l0, model.bias_hh_l0, None)]
    problem = make_problem("fwd", dtype, hidden, batch, seq, device=device)
    kernel = problem.launch(select_config(hidden, batch, dtype, device, device.type != "cuda", "fwd"))
    gx = functional._project(x.reshape(seq * batch, hidden), model.weight_ih_l0).view(seq, batch, 4 * hidden)
    biases = functional._stacked_biases([(model.bias_ih_l0, model.bias_hh_l0)])
    h0 = x.new_zeros(1, batch, hidden)
    w_hh = model.weight_hh_l0.unsqueeze(0)

    def lean():
        gx = torch.mm(x.view(seq * batch, hidden), model.weight_ih_l0.t()).view(seq, batch, 4 * hidden)
        h0, c0 = x.new_zeros(1, batch, hidden), x.new_zeros(1, batch, hidden)
        return functional._recurrence_forward(gx, w_hh, model.bias_ih_l0[None], model.bias_hh_l0[None], h0, c0, None,
                                              False, False)[0]

    calls = {
        "kernel": kernel,
        "op": lambda: functional._recurrence_forward(gx, w_hh, *biases, h0, h0, None, False, False)[0],
        "lean": lean,
        "layer": lambda: functional.lstm_layer(x, weights, backend="triton")[0],
        "module": lambda: model(x)[0],
        "cudnn": lambda: ref(x)[0],
    }
    with torch.no_grad():
        want = calls["cudnn"]().float()
        for name in ("op", "lean", "layer", "module"):
            err = ((calls[name]().float() - want).norm() / want.norm()).item()
            if not err < 2e-2:
                raise RuntimeError(f"{name} differs from cuDNN at {dtype_name}:{hidden}:{batch}: rel err {err:.2e}")
    return calls


def measure(dtype_name: str, hidden: int, batch: int, seq: int, reps: int) -> list[dict]:
    import torch

    from tritonlstm.bench import host_ms
    from tritonlstm.functional import synchronize

    calls = levels(dtype_name, hidden, batch, seq)
    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")
    times: dict[str, list[float]] = {name: [] for name in LEVELS}
    with torch.no_grad():
        for _ in range(5):  # compiles, cuBLAS heuristics, the tuned-config lookup
            for fn in calls.values():
                fn()
        synchronize()
        for _ in range(reps):
            for name in LEVELS:
                flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                calls[name]()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
        host = {name: min(host_ms(calls[name]) for _ in range(3)) for name in LEVELS}
        synchronize()  # a failed barrier raises here, so no row comes from a broken launch
    return [{"dtype": dtype_name, "hidden": hidden, "batch": batch, "seq": seq, "level": name,
             **percentiles(times[name]), "host": host[name], "reps": reps} for name in LEVELS]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=parse_cells, default=parse_cells(DEFAULT_CELLS), help="dtype:H:B,...")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--json", help="write the rows here (rewritten after each cell)")
    a = ap.parse_args(argv)
    if a.seq < 1 or a.reps < 5:
        ap.error(f"--seq must be >= 1 and --reps >= 5, got {a.seq} and {a.reps}")
    import torch

    if not torch.cuda.is_available():
        print("perf/launch_spread.py: no CUDA device, nothing to time.")
        return 0
    rows: list[dict] = []
    print(f"{'cell':<22}{'level':<8}{'min':>8}{'q20':>8}{'median':>8}{'q80':>8}{'max':>8}{'host':>8}  (ms)")
    for dtype_name, hidden, batch in a.cells:
        for row in measure(dtype_name, hidden, batch, a.seq, a.reps):
            rows.append(row)
            print(f"{dtype_name}:{hidden}:{batch:<10}{row['level']:<8}" +
                  "".join(f"{row[k]:8.3f}" for k in ("min", "q20", "median", "q80", "max", "host")), flush=True)
        if a.json:
            write_rows_json(a.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
