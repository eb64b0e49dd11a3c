"""A/B of the ways a single layer passes h_{t-1} (forward) or dG_{t+1} (backward) between programs
(perf/NOTES.md v0.8): a grid barrier per step ("barrier", the heuristic's default) against tagged words each
reader waits on ("tagged", and for the forward "tagged-probe"), on the same tiles, with cuDNN timed beside them
in the same process. GPU only.

    python perf/exchange.py [--dtypes float16,bfloat16] [--hidden 256,512,1024] [--batch 1,16,64] [--seq 256]
                            [--kernels fwd,bwd] [--json FILE]

Times the recurrence kernels alone (gx = x @ W_ih^T, and for the backward the forward's gates, computed once
outside the timing), so us/step is a kernel's time over T; cuDNN's column is its whole inference forward
(fwd rows) or forward + backward (bwd rows), input GEMMs and weight gradients included, for scale. Each
variant's output (y, or dG) must match the barrier's before it is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def measure(dtype_name: str, hidden: int, batch: int, seq: int, kernel: str = "fwd") -> dict:
    import torch
    from triton.testing import do_bench

    from tritonlstm.configs import cdiv, heuristic_config
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
    row = {"kernel": kernel, "dtype": dtype_name, "hidden": H, "batch": B, "seq": T,
           "config": dataclasses.asdict(base)}

    if kernel == "fwd":
        def run(cfg):
            return lambda: k.lstm_forward(gx, w, bias, h0, c0.clone(), None, reverse=False, store_gates=False,
                                          config=cfg)[0]
    else:
        _, _, _, gates, c_all = k.lstm_forward(gx, w, bias, h0, c0.clone(), None, reverse=False, store_gates=True,
                                               config=base)
        dy = torch.randn(T, B, H, device="cuda", dtype=dtype)
        dhn, dcn = torch.zeros_like(h0), torch.zeros_like(h0)

        def run(cfg):
            return lambda: k.lstm_backward(gates, c_all, c0, w, dy, dhn, dcn, None, reverse=False, config=cfg)[0]

    exchanges = ("tagged", "tagged-probe") if kernel == "fwd" else ("tagged",)
    variants = {"barrier": base, **{e: dataclasses.replace(base, exchange=e) for e in exchanges}}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if base.block_h > 8 and base.w_resident and cdiv(H, 8) <= sms:
        # Narrower programs: the tile where tagged 16-bit fits registers at H = 1024 (compilecheck: 246, no
        # spills; BH = 16 spills 64 B), with the barrier on the same tiles for the comparison.
        narrow = dataclasses.replace(base, block_h=8, num_warps=8, batch_groups=1)
        variants["barrier-bh8"] = narrow
        variants.update({f"{e}-bh8": dataclasses.replace(narrow, exchange=e) for e in exchanges})
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
    if kernel == "fwd":
        with torch.no_grad():
            row["cudnn_ms"] = do_bench(lambda: ref(x), warmup=25, rep=100, return_mode="median")
    else:
        xg = x.clone().requires_grad_()
        row["cudnn_ms"] = do_bench(lambda: ref(xg)[0].backward(dy), warmup=25, rep=100, return_mode="median",
                                   grad_to_none=[xg, *ref.parameters()])
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--hidden", default="256,512,1024")
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--kernels", default="fwd,bwd", help="fwd, bwd or both")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("perf/exchange.py: no CUDA device, nothing to time.")
        return 0
    rows = []
    print(f"{torch.cuda.get_device_name(0)}; recurrence kernels only, T = {a.seq}; cuDNN: fwd (inference) beside "
          "fwd rows, fwd + bwd beside bwd rows")
    print(f"{'kernel':6} {'dtype':9} {'H':>5} {'B':>4} {'variant':16} {'us/step':>8} {'vs barrier':>10} "
          f"{'cuDNN ms':>9}")
    names = ("barrier", "tagged", "tagged-probe", "barrier-bh8", "tagged-bh8", "tagged-probe-bh8")
    for kn in a.kernels.split(","):
        for d in a.dtypes.split(","):
            for h in (int(v) for v in a.hidden.split(",")):
                for b in (int(v) for v in a.batch.split(",")):
                    try:
                        r = measure(d, h, b, a.seq, kn)
                    except Exception as e:  # the barrier variant itself failed: a finding, not a crash
                        print(f"{kn:6} {d:9} {h:5} {b:4} failed: {type(e).__name__}: {e}", flush=True)
                        rows.append({"kernel": kn, "dtype": d, "hidden": h, "batch": b, "error": str(e)})
                        continue
                    rows.append(r)
                    if a.json:  # row by row: a run cut short keeps what it measured
                        with open(a.json, "w") as f:
                            json.dump({"gpu": torch.cuda.get_device_name(0), "rows": rows}, f, indent=1)
                    base = r.get("barrier_us_per_step")
                    for name in names:
                        us, err = r.get(f"{name}_us_per_step"), r.get(f"{name}_error")
                        if us is None and err is None:
                            continue
                        ratio = f"{us / base:.2f}" if us and base else "-"
                        print(f"{kn:6} {d:9} {h:5} {b:4} {name:16} {us or float('nan'):8.2f} {ratio:>10} "
                              f"{r['cudnn_ms']:9.3f}" + (f"  {err}" if err else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
