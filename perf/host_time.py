"""Host time per call, the kernel launches stubbed out: what a host-bound call (LSTMCell in a Python loop, a short
sequence) costs in Python and ATen before any GPU work. Runs on the CPU interpreter's path (the config comes from
the heuristic, not the GPU's tuned table).

    python perf/host_time.py [case ...]          # cases: cell, cell_train, layer, layer_train (default: all)
    PROFILE=cumulative python perf/host_time.py cell   # and cProfile's top 40 of the first case
    TREE=/path/to/other/checkout python perf/host_time.py cell   # time another checkout's code (an A/B: run the
                                                                  # two alternately and read the minimum; this
                                                                  # machine's noise is +-30 % run to run)
"""

import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"
if os.environ.get("TREE"):  # another checkout, ahead of this one's editable install
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower()]
    sys.path.insert(0, os.environ["TREE"])

import torch  # noqa: E402

import tritonlstm  # noqa: E402
from tritonlstm import functional  # noqa: E402

kernels = functional._kernels()
kernels._run = lambda *args, **kwargs: None  # every launch
functional._column_sums = lambda m: m.sum(0, dtype=torch.float32)  # its own kernel, interpreted, would dominate

H, B, T = 32, 4, 8
torch.manual_seed(0)
cell = tritonlstm.LSTMCell(H, H, backend="triton")
lstm = tritonlstm.LSTM(H, H, backend="triton")
x, xs = torch.randn(B, H), torch.randn(T, B, H)
hx = (torch.randn(B, H), torch.randn(B, H))


def cell_step():
    with torch.no_grad():
        cell(x, hx)


def cell_train():
    h, c = cell(x, hx)
    (h.sum() + c.sum()).backward()


def layer():
    with torch.no_grad():
        lstm(xs)


xs_grad = xs.clone().requires_grad_()


def layer_train():
    y, _ = lstm(xs_grad)
    y.backward(torch.ones_like(y))


CASES = {"cell": cell_step, "cell_train": cell_train, "layer": layer, "layer_train": layer_train}

if __name__ == "__main__":
    names = sys.argv[1:] or list(CASES)
    for name in names:
        fn = CASES[name]
        for _ in range(50):
            fn()
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(300):
                fn()
            best = min(best, (time.perf_counter() - start) / 300)
        print(f"{name}: {best * 1e6:.0f} us")
    if os.environ.get("PROFILE"):
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.enable()
        for _ in range(500):
            CASES[names[0]]()
        profile.disable()
        pstats.Stats(profile).sort_stats(os.environ["PROFILE"]).print_stats(40)
