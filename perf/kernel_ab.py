"""A/B of launch configs of the recurrence kernels alone (no input GEMM, no weight gradients), on a GPU, with
cuDNN timed beside them in the same process. Each row is one (kernel, dtype, H, B); its variants are
tritonlstm.configs.named_variants (each named and described there: the heuristic's tiles "unsplit", split-K,
merged, transposed, streamed and wide tiles, the cluster exchange).

    python perf/kernel_ab.py [--dtypes float16,float32] [--hidden 256,512,1024] [--batch 16,256] [--seq 256]
                             [--kernels fwd,bwd,stack,stack_bwd] [--layers 2,4] [--variants unsplit,split,...]
                             [--half-h-ab] [--half-g-ab] [--pairs-ab] [--qc-ab] [--prefetch-ab] [--bulk-ab]
                             [--bias-ab] [--json FILE]

us/step is a kernel's time over its steps (T, or T + L - 1 for a stack); cuDNN's column is its whole inference
forward (forward kernels' rows) or forward + backward (backward rows), input GEMMs and weight gradients
included, for scale. Each variant's output (y, or dG) must match the unsplit variant's before it is timed.
--half-h-ab: each float32 forward variant with half_w is timed again with kernels.lstm.HALF_H off (h_{t-1} read
from y in float32 and rounded in the dot's loop, as before v0.63), as "<variant>/f32h". --half-g-ab: each float32
2-D grid backward variant with half_w is timed again with kernels.lstm.HALF_G on (dG_{t+1} read in float16 as its
producers scaled it, v0.65), as "<variant>/g16". --pairs-ab: each split-K backward variant is timed again with
kernels.lstm.SPLIT_PAIRS off (each gate of dG_{t+1} loaded inside its dot, as before v0.66), as "<variant>/unpaired".
--qc-ab: each reduce-scatter backward variant (transposed) is timed again with its producers' shares summed 16 a load
across threads (REDUCE_SCATTER_IN_REGISTERS 0, REDUCE_SCATTER_LOAD 16, as before v0.67), as "<variant>/qc16".
--prefetch-ab (v0.68): each variant that prefetches is timed again arriving at its barrier right after its exchange's
stores (kernels.lstm.ARRIVE_EARLY on), as "<variant>/early"; each
16-bit cluster variant that prefetches, again with its prefetch widened at the load (PREFETCH_AS_LOADED off, as
before v0.68), as "<variant>/widened". --bulk-ab (v0.69): each 16-bit transposed cluster forward variant that
prefetches, again with h_{t-1} copied through the cluster's shared memory and no barrier a step (kernels.lstm.BULK_H
on), as "<variant>/bulk". --bias-ab (v0.73): each persistent backward variant of one batch group, again summing the
bias gradients in its time loop (kernels.lstm.BIAS_IN_KERNEL on; every backward here asks for them), as
"<variant>/bias". (A variant's prefetch, early arrival and bulk exchange need one batch tile a program; where the
shape gives it more, the row is the variant itself again; so is "/bias" where bias_sums_in_kernel refuses the shape.)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from tritonlstm.bench import write_rows_json
from tritonlstm.configs import VARIANTS
from tritonlstm.configs import named_variants as variants

FORWARD = ("fwd", "stack")


def timed_runs(kernel: str, dtype, cfgs: dict, half_h_ab: bool = False, half_g_ab: bool = False,
               pairs_ab: bool = False, qc_ab: bool = False, prefetch_ab: bool = False,
               bulk_ab: bool = False, bias_ab: bool = False) -> list[tuple]:
    """(name, config, the kernels module's switches for it): each variant as the module has them, then the A/Bs."""
    import torch

    timed = [(name, cfg, {}) for name, cfg in cfgs.items()]
    if half_h_ab and kernel == "fwd" and dtype == torch.float32:
        timed += [(f"{name}/f32h", cfg, {"HALF_H": False}) for name, cfg in cfgs.items() if cfg.half_w]
    if half_g_ab and kernel == "bwd" and dtype == torch.float32:
        timed += [(f"{name}/g16", cfg, {"HALF_G": True}) for name, cfg in cfgs.items() if cfg.half_w and cfg.grid_2d]
    if pairs_ab and kernel == "bwd":
        timed += [(f"{name}/unpaired", cfg, {"SPLIT_PAIRS": False}) for name, cfg in cfgs.items()
                  if cfg.split_k > 1 and not cfg.grid_2d]
    if qc_ab and kernel == "bwd":
        timed += [(f"{name}/qc16", cfg, {"REDUCE_SCATTER_IN_REGISTERS": 0, "REDUCE_SCATTER_LOAD": 16})
                  for name, cfg in cfgs.items() if cfg.transposed]
    if prefetch_ab and kernel in ("fwd", "bwd"):
        timed += [(f"{name}/early", cfg, {"ARRIVE_EARLY": True}) for name, cfg in cfgs.items()
                  if cfg.prefetch and cfg.persistent and not cfg.grid_2d]
        if dtype != torch.float32:
            timed += [(f"{name}/widened", cfg, {"PREFETCH_AS_LOADED": False}) for name, cfg in cfgs.items()
                      if cfg.clustered and cfg.prefetch]
    if bulk_ab and kernel == "fwd" and dtype != torch.float32:
        timed += [(f"{name}/bulk", cfg, {"BULK_H": True}) for name, cfg in cfgs.items()
                  if cfg.clustered and cfg.prefetch and cfg.transposed]
    if bias_ab and kernel == "bwd":
        timed += [(f"{name}/bias", cfg, {"BIAS_IN_KERNEL": True}) for name, cfg in cfgs.items()
                  if cfg.persistent and cfg.batch_groups == 1 and not cfg.grid_2d]
    return timed


def measure(dtype_name: str, hidden: int, batch: int, seq: int, kernel: str, names, layers: int = 1,
            half_h_ab: bool = False, half_g_ab: bool = False, pairs_ab: bool = False, qc_ab: bool = False,
            prefetch_ab: bool = False, bulk_ab: bool = False, bias_ab: bool = False) -> dict:
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
    timed = timed_runs(kernel, dtype, cfgs, half_h_ab, half_g_ab, pairs_ab, qc_ab, prefetch_ab, bulk_ab, bias_ab)
    defaults = {"HALF_H": k.HALF_H, "HALF_G": k.HALF_G, "SPLIT_PAIRS": k.SPLIT_PAIRS,
                "REDUCE_SCATTER_IN_REGISTERS": k.REDUCE_SCATTER_IN_REGISTERS,
                "REDUCE_SCATTER_LOAD": k.REDUCE_SCATTER_LOAD, "ARRIVE_EARLY": k.ARRIVE_EARLY,
                "PREFETCH_AS_LOADED": k.PREFETCH_AS_LOADED, "BULK_H": k.BULK_H, "BIAS_IN_KERNEL": k.BIAS_IN_KERNEL}
    for name, cfg, switches in timed:
        for flag, value in switches.items():
            setattr(k, flag, value)
        if switches:
            k._backward_plan.cache_clear()  # the plans hold the reduce-scatter's constexprs
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
        finally:
            if switches:
                for flag, value in defaults.items():
                    setattr(k, flag, value)
                k._backward_plan.cache_clear()
    row["timed"] = [name for name, _, _ in timed]
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
    ap.add_argument("--half-h-ab", action="store_true",
                    help="time float32 half_w forward variants also with HALF_H off (as <variant>/f32h)")
    ap.add_argument("--half-g-ab", action="store_true",
                    help="time float32 half_w 2-D grid backward variants also with HALF_G on (as <variant>/g16)")
    ap.add_argument("--pairs-ab", action="store_true",
                    help="time split-K backward variants also with SPLIT_PAIRS off (as <variant>/unpaired)")
    ap.add_argument("--qc-ab", action="store_true",
                    help="time reduce-scatter backward variants also with 16 shares a load (as <variant>/qc16)")
    ap.add_argument("--prefetch-ab", action="store_true",
                    help="time prefetching variants also arriving early (as <variant>/early), 16-bit prefetching "
                         "cluster ones also widened at the load (as <variant>/widened)")
    ap.add_argument("--bulk-ab", action="store_true",
                    help="time 16-bit transposed cluster forward variants that prefetch also with h_{t-1} copied "
                         "through the cluster's shared memory (BULK_H, as <variant>/bulk)")
    ap.add_argument("--bias-ab", action="store_true",
                    help="time persistent one-group backward variants also summing the bias gradients in their "
                         "loop (BIAS_IN_KERNEL, as <variant>/bias)")
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
                        r = measure(d, h, b, a.seq, kn, names, l, a.half_h_ab, a.half_g_ab, a.pairs_ab,
                                    a.qc_ab, a.prefetch_ab, a.bulk_ab, a.bias_ab)
                    except Exception as e:  # the base variant itself failed: a finding, not a crash
                        print(f"{kn:9} {l:2} {d:9} {h:5} {b:4} failed: {type(e).__name__}: {e}", flush=True)
                        rows.append({"kernel": kn, "layers": l, "dtype": d, "hidden": h, "batch": b,
                                     "error": str(e)})
                        continue
                    rows.append(r)
                    if a.json:
                        write_rows_json(a.json, rows)
                    base = r.get("unsplit_us_per_step")
                    for name in r["timed"]:
                        us, err = r.get(f"{name}_us_per_step"), r.get(f"{name}_error")
                        if us is None and err is None:
                            continue
                        ratio = f"{us / base:.2f}" if us and base else "-"
                        print(f"{kn:9} {l:2} {d:9} {h:5} {b:4} {name:18} {us or float('nan'):8.2f} {ratio:>10} "
                              f"{r['cudnn_ms']:9.3f}" + (f"  {err}" if err else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
