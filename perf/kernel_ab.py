"""A/B of launch configs of the recurrence kernels alone (no input GEMM, no weight gradients), on a GPU, with
cuDNN timed beside them in the same process. Each row is one (kernel, dtype, H, B); its variants:

  unsplit      the heuristic before v0.9 (perf/NOTES.md): BH up to 32, 8 warps, one 2-D dot per gate
  unsplit-w4   the same with 4 warps (the 2-D dot stacks every warp along M, so fewer warps do less twice);
               unsplit-w2: 2 warps (least duplication, least parallelism; spills at large K)
  split        split-K over 8 warps, BH <= 16
  split4       split-K over 4 warps
  split-bh8    split-K, BH = 8 (more programs, half the W slice each)
  split-bb32   split-K, 32-row batch tiles (B >= 32: half the tile iterations per step)
  merged       forward only: the four gate dots as one over interleaved columns, warps along N (8 warps;
               merged-w4: 4), on the unsplit tiles (perf/NOTES.md v0.11)
  transposed   forward kernels only: gates^T = W^T @ h^T, M = a program's 64 gate rows (BH = 16) on Hopper's
               warpgroup MMA, 4 warps, 16-row batch tiles (single layer: 64 at B >= 64 where K * element size
               <= 1 KB) (v0.18)
  transposed-streamed   the same with W^T streamed from L2 in pipelined K chunks (3 stages): any H, 64-row
               batch tiles at B >= 64 (single layer)
  flags        the unsplit tiles with the barrier as one flag per program instead of one counter (v0.19);
               transposed-flags: the transposed tiles with it
  tagged       the unsplit tiles with h_{t-1} (dG_{t+1}) through tagged words instead of a barrier (v0.8)
  tagged-probe the same, polling one word per producer first (forward only)
  split-tagged, split-tagged-probe   the tagged exchanges on the split tiles
  streamed     W_hh (and a stack's W_ih) streamed from L2 in 32-wide K chunks (16 in fp32), BH = 16, 4 warps
  wide         B >= 32, single layer: 64-row tiles, W streamed, 8 warps, 3 stages (configs.wide_tile_config;
               the heuristic's pick where 16-row tiles would walk >= 4 tiles per program, v0.15)

The stacks' wavefront kernels (--kernels stack,stack_bwd, --layers): "unsplit" is the heuristic's pick
(configs.heuristic_config / stack_backward_config), the other variants as above where they apply (no merged,
no tagged; transposed for the forward wavefront).

    python perf/kernel_ab.py [--dtypes float16,float32] [--hidden 256,512,1024] [--batch 16,256] [--seq 256]
                             [--kernels fwd,bwd,stack,stack_bwd] [--layers 2,4] [--variants unsplit,split,...]
                             [--json FILE]

us/step is a kernel's time over its steps (T, or T + L - 1 for a stack); cuDNN's column is its whole inference
forward (forward kernels' rows) or forward + backward (backward rows), input GEMMs and weight gradients
included, for scale. Each variant's output (y, or dG) must match the unsplit variant's before it is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

VARIANTS = ("unsplit", "unsplit-w4", "unsplit-w2", "split", "split4", "split-bh8", "split-bb32", "merged",
            "merged-w4", "transposed", "transposed-streamed", "flags", "transposed-flags", "tagged", "tagged-probe",
            "split-tagged", "split-tagged-probe", "streamed", "wide")
FORWARD = ("fwd", "stack")


def variants(kernel: str, H: int, B: int, dtype, sms: int, names, layers: int = 1) -> dict:
    from tritonlstm.configs import (
        LSTMConfig,
        _pow2,
        cdiv,
        heuristic_config,
        stack_backward_config,
        tagged_exchanges,
        tagged_variant,
        transposed_config,
        wide_tile_config,
        with_split_k,
    )

    stack = kernel in ("stack", "stack_bwd")
    share = sms // layers if stack else sms

    def regroup(cfg, **kw):
        cfg = dataclasses.replace(cfg, **kw)
        groups = max(1, min(cdiv(B, cfg.block_b), share // cdiv(H, cfg.block_h)))
        return dataclasses.replace(cfg, batch_groups=groups)

    if stack:
        unsplit = stack_backward_config(H, B, dtype, sms, layers) if kernel == "stack_bwd" else \
            heuristic_config(H, B, dtype, sms, layers=layers, kernel="stack")
        w4 = dataclasses.replace(unsplit, num_warps=4)
    else:
        w4 = heuristic_config(H, B, dtype, sms, kernel="none")  # tiles as chosen before v0.9, never split, 4 warps
        unsplit = dataclasses.replace(w4, num_warps=8) if w4.w_resident and w4.block_k >= 128 else w4
    out = {"unsplit": unsplit, "unsplit-w4": w4, "unsplit-w2": dataclasses.replace(w4, num_warps=2)}
    fp32 = dtype.itemsize == 4
    if H > 32 and cdiv(H, 16) <= share:
        out["streamed"] = regroup(LSTMConfig(block_h=16, block_b=16, block_k=16 if fp32 else 32, w_resident=False,
                                             num_warps=4))
        if not stack and B >= 32:
            out["wide"] = wide_tile_config(H, B, dtype.itemsize, sms, kernel)
    if unsplit.w_resident and unsplit.block_k >= 64:
        split = with_split_k(regroup(unsplit, block_h=min(unsplit.block_h, 16)))
        out["split"] = split
        if split.block_k // 4 >= 16 and split.split_k != 4:
            out["split4"] = dataclasses.replace(split, split_k=4, num_warps=4)
        if split.block_h > 8 and cdiv(H, 8) <= share:
            out["split-bh8"] = regroup(split, block_h=8)
        if B >= 32:
            out["split-bb32"] = regroup(split, block_b=32)
    if kernel == "fwd":
        out["merged"] = dataclasses.replace(unsplit, merged_gates=True, num_warps=8)
        out["merged-w4"] = dataclasses.replace(unsplit, merged_gates=True, num_warps=4)
    hk, esize = max(16, _pow2(H)), dtype.itemsize
    if kernel in FORWARD and H > 16 and (2 if stack else 1) * 64 * hk * esize <= 128 * 1024 and cdiv(H, 16) <= share:
        # 64-row batch tiles where their h chunks leave registers (compile-only: K * esize <= 1 KB), else 16.
        bb = 64 if B >= 64 and hk * esize <= 1024 and not stack else 16
        out["transposed"] = transposed_config(H, B, esize, share, bb)
    if kernel in FORWARD and H > 32 and cdiv(H, 16) <= share:
        # W^T streamed from L2 in pipelined K chunks: any H, and 64-row batch tiles at any K (compile-only: no
        # spills at BB = 64 up to K = 1024 in both widths).
        out["transposed-streamed"] = transposed_config(H, B, esize, share, 64 if B >= 64 and not stack else 16,
                                                       streamed=True)
    if unsplit.persistent:
        out["flags"] = dataclasses.replace(unsplit, exchange="flags")
        if "transposed" in out:
            out["transposed-flags"] = dataclasses.replace(out["transposed"], exchange="flags")
    for e in tagged_exchanges(kernel, unsplit, dtype):  # none for the stacks
        out[e] = tagged_variant(unsplit, e)
    if "split" in out:
        for e in tagged_exchanges(kernel, out["split"], dtype):
            out[f"split-{e}"] = tagged_variant(out["split"], e)
    return {n: c for n, c in out.items() if n in names}


def measure(dtype_name: str, hidden: int, batch: int, seq: int, kernel: str, names, layers: int = 1) -> dict:
    import torch
    from triton.testing import do_bench

    from tritonlstm.kernels import lstm as k
    from tritonlstm.tuning import LIMITS, compile_in_parallel, make_problem

    dtype = getattr(torch, dtype_name)
    H, B, T = hidden, batch, seq
    stack = kernel in ("stack", "stack_bwd")
    L = layers if stack else 1
    cfgs = variants(kernel, H, B, dtype, torch.cuda.get_device_properties(0).multi_processor_count, names, L)
    base = cfgs.get("unsplit") or next(iter(cfgs.values()))
    # The backward kernels' saved gates come from the forward's heuristic config.
    problem = make_problem(kernel, dtype, H, B, T, layers=L)
    run = problem.launch
    steps = T + L - 1
    row = {"kernel": kernel, "dtype": dtype_name, "hidden": H, "batch": B, "seq": T, "layers": L,
           "configs": {n: dataclasses.asdict(c) for n, c in cfgs.items()}}

    compile_in_parallel([run(cfg) for cfg in cfgs.values()])
    limit = LIMITS[dtype]  # the variants differ from the base only in the order of accumulation
    y_base = run(base)()
    k.barrier_errors.check(torch.device("cuda"), wait=True)
    for name, cfg in cfgs.items():
        try:
            y = run(cfg)()
            k.barrier_errors.check(torch.device("cuda"), wait=True)
            err = ((y.float() - y_base.float()).norm() / y_base.float().norm()).item()
            row[f"{name}_rel_err"] = err
            if not err <= limit:
                row[f"{name}_error"] = f"differs from the base variant: rel err {err:.2e} > {limit:.0e}"
                continue
            ms = do_bench(run(cfg), warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
            k.barrier_errors.check(torch.device("cuda"), wait=True)
            row[f"{name}_ms"], row[f"{name}_ms_q20"], row[f"{name}_ms_q80"] = ms
            row[f"{name}_us_per_step"] = ms[0] * 1e3 / steps
        except Exception as e:  # a variant that fails is a finding, reported with its row
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    # cuDNN beside it, for scale: the whole layer (or stack) of the same shape.
    ref = torch.nn.LSTM(H, H, num_layers=L).to("cuda", dtype)
    x = torch.randn(T, B, H, device="cuda", dtype=dtype)
    if kernel in FORWARD:
        with torch.no_grad():
            row["cudnn_ms"] = do_bench(lambda: ref(x), warmup=25, rep=100, return_mode="median")
    else:
        xg = x.clone().requires_grad_()
        dy = torch.randn(T, B, H, device="cuda", dtype=dtype)
        row["cudnn_ms"] = do_bench(lambda: ref(xg)[0].backward(dy), warmup=25, rep=100, return_mode="median",
                                   grad_to_none=[xg, *ref.parameters()])
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float16,float32")
    ap.add_argument("--hidden", default="256,512,1024")
    ap.add_argument("--batch", default="16,256")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--kernels", default="fwd,bwd", help="some of fwd, bwd, stack, stack_bwd")
    ap.add_argument("--layers", default="2,4", help="layer counts of the stack kernels' rows")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="some of " + ", ".join(VARIANTS))
    ap.add_argument("--json", help="write the rows here (after every row)")
    a = ap.parse_args(argv)
    names = [v for v in a.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        ap.error(f"--variants: unknown {bad}; expected some of {', '.join(VARIANTS)}")
    kernels = [v for v in a.kernels.split(",") if v]
    bad = [v for v in kernels if v not in ("fwd", "bwd", "stack", "stack_bwd")]
    if bad:
        ap.error(f"--kernels: unknown {bad}; expected some of fwd, bwd, stack, stack_bwd")
    import torch

    if not torch.cuda.is_available():
        print("perf/kernel_ab.py: no CUDA device, nothing to time.")
        return 0
    rows = []
    print(f"{torch.cuda.get_device_name(0)}; recurrence kernels only, T = {a.seq}; cuDNN: fwd (inference) beside "
          "fwd rows, fwd + bwd beside bwd rows")
    print(f"{'kernel':9} {'L':>2} {'dtype':9} {'H':>5} {'B':>4} {'variant':18} {'us/step':>8} {'vs unsplit':>10} "
          f"{'cuDNN ms':>9}")
    rows_of = [(kn, l) for kn in kernels for l in ([int(v) for v in a.layers.split(",")]
                                                    if kn in ("stack", "stack_bwd") else [1])]
    for kn, l in rows_of:
        for d in a.dtypes.split(","):
            for h in (int(v) for v in a.hidden.split(",")):
                for b in (int(v) for v in a.batch.split(",")):
                    try:
                        r = measure(d, h, b, a.seq, kn, names, l)
                    except Exception as e:  # the base variant itself failed: a finding, not a crash
                        print(f"{kn:9} {l:2} {d:9} {h:5} {b:4} failed: {type(e).__name__}: {e}", flush=True)
                        rows.append({"kernel": kn, "layers": l, "dtype": d, "hidden": h, "batch": b,
                                     "error": str(e)})
                        continue
                    rows.append(r)
                    if a.json:
                        with open(a.json, "w") as f:
                            json.dump({"gpu": torch.cuda.get_device_name(0), "rows": rows}, f, indent=1)
                    base = r.get("unsplit_us_per_step")
                    for name in VARIANTS:
                        us, err = r.get(f"{name}_us_per_step"), r.get(f"{name}_error")
                        if us is None and err is None:
                            continue
                        ratio = f"{us / base:.2f}" if us and base else "-"
                        print(f"{kn:9} {l:2} {d:9} {h:5} {b:4} {name:18} {us or float('nan'):8.2f} {ratio:>10} "
                              f"{r['cudnn_ms']:9.3f}" + (f"  {err}" if err else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
