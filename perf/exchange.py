"""A/B of the single-layer forward's two ways to pass h_{t-1} between programs (perf/NOTES.md v0.8): a grid
barrier per step ("barrier", the heuristic's default) against tagged words each reader waits on ("tagged"), on
the same tiles, with cuDNN's forward timed beside them in the same process. GPU only.

    python perf/exchange.py [--dtypes float16,bfloat16] [--hidden 256,512,1024] [--batch 1,16,64] [--seq 256]
                            [--json FILE]

Times the recurrence kernel alone (gx = x @ W_ih^T computed once outside the timing), so us/step is the
kernel's time over T; cuDNN's column is its whole inference forward (input GEMM included), for scale. The
tagged output must match the barrier's (same tiles, same arithmetic up to the order of two half-K dots)
before either is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def measure(dtype_name: str, hidden: int, batch: int, seq: int) -> dict:
    import torch
    from triton.testing import do_bench

    from tritonlstm.configs import heuristic_config
    from tritonlstm.kernels import lstm as k
    from tritonlstm.tuning import compile_in_parallel

    dtype = getattr(torch, dtype_name)
    H, B, T = hidden, batch, seq
    torch.manual_seed(0)
    ref = torch.nn.LSTM(H, H).to("cuda", dtype)
    x = torch.randn(T, B, H, device="cuda", dtype=dtype)
    gx = (x.reshape(T * B, H) @ ref.weight_ih_l0.t()).view(T, B, 4 * H).contiguous()
    w = ref.weight_hh_l0.detach().unsqueeze(0).contiguous()
    bias = (ref.bias_ih_l0 + ref.bias_hh_l0).detach().float().unsqueeze(0).contiguous()
    h0 = torch.randn(1, B, H, device="cuda", dtype=dtype) * 0.5
    c0 = torch.randn(1, B, H, device="cuda") * 0.5
    base = heuristic_config(H, B, dtype, torch.cuda.get_device_properties(0).multi_processor_count)
    row = {"dtype": dtype_name, "hidden": H, "batch": B, "seq": T, "config": dataclasses.asdict(base)}

    def run(cfg):
        return lambda: k.lstm_forward(gx, w, bias, h0, c0.clone(), None, reverse=False, store_gates=False,
                                      config=cfg)[0]

    variants = {"barrier": base, "tagged": dataclasses.replace(base, exchange="tagged"),
                "tagged-probe": dataclasses.replace(base, exchange="tagged-probe")}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if base.block_h > 8 and base.w_resident and triton_cdiv(H, 8) <= sms:
        # Narrower programs: the tile where tagged 16-bit fits registers at H = 1024 (compilecheck: 246, no
        # spills; BH = 16 spills 64 B), with the barrier on the same tiles for the comparison.
        narrow = dataclasses.replace(base, block_h=8, num_warps=8, batch_groups=1)
        variants["barrier-bh8"] = narrow
        variants["tagged-bh8"] = dataclasses.replace(narrow, exchange="tagged")
        variants["tagged-probe-bh8"] = dataclasses.replace(narrow, exchange="tagged-probe")
    compile_in_parallel([run(cfg) for cfg in variants.values()])  # the tuner's thread-pool warm-up
    # The tuner's limits: the variants differ from the barrier's tiles only in the order of accumulation, which
    # T steps of 16-bit rounding amplify.
    limit = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    y_base = run(base)()
    k.barrier_errors.check(torch.device("cuda"), wait=True)
    for name, cfg in variants.items():
        try:
            y = run(cfg)()
            k.barrier_errors.check(torch.device("cuda"), wait=True)
            err = ((y.float() - y_base.float()).norm() / y_base.float().norm()).item()
            row[f"{name}_rel_err_vs_barrier"] = err
            if not err <= limit:
                row[f"{name}_error"] = f"differs from the barrier variant: rel err {err:.2e} > {limit:.0e}"
                continue
            ms = do_bench(run(cfg), warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
            k.barrier_errors.check(torch.device("cuda"), wait=True)
            row[f"{name}_ms"], row[f"{name}_ms_q20"], row[f"{name}_ms_q80"] = ms
            row[f"{name}_us_per_step"] = ms[0] * 1e3 / T
        except Exception as e:  # a variant that fails is a finding, reported with its row
            row[f"{name}_error"] = f"{type(e).__name__}: {e}"
    with torch.no_grad():
        row["cudnn_fwd_ms"] = do_bench(lambda: ref(x), warmup=25, rep=100, quantiles=[0.5])[0]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--hidden", default="256,512,1024")
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("perf/exchange.py: no CUDA device, nothing to time.")
        return 0
    rows = []
    print(f"{torch.cuda.get_device_name(0)}; recurrence kernel only, T = {a.seq}, inference")
    print(f"{'dtype':9} {'H':>5} {'B':>4} {'variant':16} {'us/step':>8} {'vs barrier':>10} {'cuDNN fwd ms':>13}")
    for d in a.dtypes.split(","):
        for h in (int(v) for v in a.hidden.split(",")):
            for b in (int(v) for v in a.batch.split(",")):
                r = measure(d, h, b, a.seq)
                rows.append(r)
                base = r.get("barrier_us_per_step")
                for name in ("barrier", "tagged", "tagged-probe", "barrier-bh8", "tagged-bh8", "tagged-probe-bh8"):
                    us, err = r.get(f"{name}_us_per_step"), r.get(f"{name}_error")
                    if us is None and err is None:
                        continue
                    ratio = f"{us / base:.2f}" if us and base else "-"
                    print(f"{d:9} {h:5} {b:4} {name:16} {us or float('nan'):8.2f} {ratio:>10} "
                          f"{r['cudnn_fwd_ms']:13.3f}" + (f"  {err}" if err else ""), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(0), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
