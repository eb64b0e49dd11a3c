"""One launch of a recurrence kernel, for a profiler (Nsight Compute) to look at: where its warps stall.

    ncu --clock-control none --section WarpStateStats --section SpeedOfLight -k regex:lstm_fwd_kernel -c 1 \\
        python3 perf/profile_one.py --hidden 1024 --batch 16 --dtype float16 [--variant unsplit|split]

A warm-up launch first (compiles outside the profiled launch; -c 1 with --launch-skip 1 profiles the second).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--variant", default="split", choices=("unsplit", "split"))
    a = ap.parse_args(argv)
    import torch

    from tritonlstm.configs import heuristic_config
    from tritonlstm.kernels import lstm as k

    if not torch.cuda.is_available():
        print("perf/profile_one.py: no CUDA device.")
        return 0
    dtype = getattr(torch, a.dtype)
    H, B, T = a.hidden, a.batch, a.seq
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = heuristic_config(H, B, dtype, sms, kernel="bwd" if a.variant == "unsplit" else "fwd")
    gx = torch.randn(T, B, 4 * H, device="cuda", dtype=dtype)
    w = torch.randn(1, 4 * H, H, device="cuda", dtype=dtype) * H ** -0.5
    bias = torch.zeros(1, 4 * H, device="cuda")
    h0 = torch.zeros(1, B, H, device="cuda", dtype=dtype)
    c0 = torch.zeros(1, B, H, device="cuda")
    for _ in range(2):
        k.lstm_forward(gx, w, bias, h0, c0.clone(), None, reverse=False, store_gates=False, config=cfg)
    torch.cuda.synchronize()
    print(dataclasses.asdict(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
