"""The host's time per call of single ops and of whole calls, on the machine it runs on: what a host-bound call is
made of there. v0.70 (perf/NOTES.md) rests on run 8's cProfile of the H200 machine's host, whose 1 ms resolution put
an ATen op that launches at 25-60 us and a view under 5; this measures it directly.

Each case is timed as `repeats` blocks of `calls` calls queued while a sleep kernel holds the GPU (so that the GPU
cannot pace them, as the bench's host column), and the least block's time per call is printed. Without a GPU it says
so and stops; with --cpu the same cases run on this CPU without the sleep (for the CI test; the numbers there are
this CPU's, not a GPU host's).

    python perf/host_ops.py [--hidden 256] [--batch 16] [--seq 256] [--dtype float16] [--calls 50] [--json FILE] [--cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def host_us(fn, calls: int, repeats: int, cuda: bool) -> float:
    """Least time per call over `repeats` blocks of `calls`, each block queued behind a sleep kernel on a GPU."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda._sleep(200_000_000)  # ~0.1 s at 2 GHz: longer than any block below
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
        if cuda:
            torch.cuda.synchronize()
    return best * 1e6


def cases(H: int, B: int, T: int, dtype: torch.dtype, device: torch.device) -> dict:
    import tritonlstm
    from tritonlstm.kernels import reduce

    small = torch.randn(B, H, device=device).to(dtype)
    a, w = torch.randn(T * B, H, device=device).to(dtype), torch.randn(4 * H, H, device=device).to(dtype)
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    pinned = torch.zeros(1, dtype=torch.int32, pin_memory=device.type == "cuda")
    dg = torch.randn(T * B, 4 * H, device=device).to(dtype)
    ours = tritonlstm.LSTM(H, H, backend="triton").to(device, dtype)
    ref = torch.nn.LSTM(H, H).to(device, dtype)
    x = torch.randn(T, B, H, device=device).to(dtype)
    xg = x.clone().requires_grad_()
    gy = torch.randn(T, B, H, device=device).to(dtype)

    def train(m):
        def step():
            y, _ = m(xg)
            y.backward(gy)
            for p in (xg, *m.parameters()):
                p.grad = None
        return step

    def infer(m):
        def call():
            with torch.no_grad():
                m(x)
        return call

    return {
        "view": lambda: small.view(-1),
        "torch.empty [B, H]": lambda: torch.empty(B, H, dtype=dtype, device=device),
        "torch.zeros [B, H]": lambda: torch.zeros(B, H, dtype=dtype, device=device),
        "x.to(float32, copy=True) [B, H]": lambda: small.to(torch.float32, copy=True),
        "torch.mm [T*B, H] x [H, 4H]": lambda: torch.mm(a, w.t()),
        "copy_ of a flag into pinned memory": lambda: pinned.copy_(flag, non_blocking=True),
        "both bias gradients of [T*B, 4H] (Triton, one launch)": lambda: reduce.column_sums(dg, dtype, copies=2),
        "LSTM forward (no grad)": infer(ours),
        "nn.LSTM forward (no grad)": infer(ref),
        "LSTM training step (no hx)": train(ours),
        "nn.LSTM training step (no hx)": train(ref),
    }


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--calls", type=int, default=50, help="calls a block (the training steps: a fifth)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--cpu", action="store_true",
                    help="without a GPU, run the cases on this CPU through the interpreter (small shapes: the default "
                         "H 256, T 256 takes hours there)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    if not cuda and not args.cpu:
        print("perf/host_ops.py: no CUDA device, nothing to time (--cpu runs the cases on the CPU interpreter).")
        return []
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # (before triton loads: tritonlstm imports it on first use)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    rows = []
    print(f"host time per call, us ({torch.cuda.get_device_name(0) if cuda else 'CPU'}; H {args.hidden}, "
          f"B {args.batch}, T {args.seq}, {args.dtype}; least of {args.repeats} blocks)")
    for name, fn in cases(args.hidden, args.batch, args.seq, dtype, device).items():
        calls = max(1, args.calls // 5) if "LSTM" in name else args.calls
        us = host_us(fn, calls, args.repeats, cuda)
        rows.append({"case": name, "host_us": us})
        print(f"{name:<40}{us:10.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0) if cuda else "cpu", "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
