"""One launch of a recurrence kernel in one of perf/kernel_ab.py's variants, for a profiler (Nsight Compute) to
look at: where its warps stall.

    ncu --clock-control none --section WarpStateStats --section SpeedOfLight -k regex:lstm_fwd_kernel \\
        --launch-skip 1 -c 1 python3 perf/profile_one.py --hidden 1024 --batch 16 --dtype float16 --variant split

--kernel bwd or stack_bwd profiles lstm_bwd_kernel (ncu's -k regex:lstm_bwd_kernel; the forward that makes the
saved gates is the other kernel). A warm-up launch comes first (it compiles outside the profiled launch; hence
--launch-skip 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from kernel_ab import VARIANTS, variants

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--kernel", default="fwd", choices=("fwd", "bwd", "stack", "stack_bwd"))
    ap.add_argument("--layers", type=int, default=2, help="layers of a stack kernel")
    ap.add_argument("--variant", default="unsplit", choices=VARIANTS)
    a = ap.parse_args(argv)
    import torch

    from tritonlstm.tuning import make_problem

    if not torch.cuda.is_available():
        print("perf/profile_one.py: no CUDA device.")
        return 0
    dtype = getattr(torch, a.dtype)
    layers = a.layers if a.kernel.startswith("stack") else 1
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfgs = variants(a.kernel, a.hidden, a.batch, dtype, sms, [a.variant], layers)
    if a.variant not in cfgs:
        print(f"perf/profile_one.py: no {a.variant!r} variant for {a.kernel} at H = {a.hidden}, B = {a.batch}")
        return 1
    launch = make_problem(a.kernel, dtype, a.hidden, a.batch, a.seq, layers=layers).launch(cfgs[a.variant])
    for _ in range(2):
        launch()
    torch.cuda.synchronize()
    print(dataclasses.asdict(cfgs[a.variant]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
