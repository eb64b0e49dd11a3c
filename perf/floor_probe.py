"""The floor of one persistent step, on a GPU: what a step of the forward recurrence costs once the matmul and
the gate arithmetic are taken out, so that the step time of the real kernel splits into exchange and compute
(issue 5.4, perf/NOTES.md "v0.17"). Each of P programs per step: loads its [B, BH] tile of a gx-like input,
reads the whole h_{t-1} [B, H] that the recurrent dot would read (or not: the "no h read" rows), makes its
[B, BH] slice of h_t from them (a row mean of h_{t-1}, taken as a dot with ones: the kernels' path from L2
through shared memory to the tensor cores, at a 16-column N),
stores it, and meets the other programs by

  barrier   the recurrence kernels' grid barrier (kernels.lstm._grid_barrier: one counter, polled by one thread
            whose result reaches the others through shared memory, two CTA barriers per poll)
  none      no exchange at all: the loop alone (its h reads race the producers; timed, not checked)
  counter-ld  the counter, polled with plain loads by every thread (no atomic per poll, no CTA barrier inside the
            loop: warps may leave it at different polls), one fence after the wait; the arrival's add has no
            result to wait for (a candidate for the kernels' barrier if it beats "barrier", session 8)
  arrive    the counter's arrival alone, no wait (a CTA barrier, the release and the add): what the arrival costs
            of a barrier step (races like "none"; timed, not checked)
  cluster   Hopper's hardware cluster barrier (barrier.cluster.arrive.release / wait.acquire) instead of any
            counter in memory: the kernel is built for one CTA a program (num_ctas = 1) and launched as one
            thread-block cluster of all P programs, which Triton's CUDA launcher does when the metadata it is handed
            says num_ctas = P (it multiplies grid x by it and sets the cluster dimension). At most 8 programs,
            or 16 (non-portable: the launcher allows 16 and no size between), so the rows say their P and beside
            them is "barrier" at the same P. h_{t-1} is read with .cg loads (from L2) (perf/NOTES.md v0.34)

(Modes "dsmem", h_{t-1} through distributed shared memory, and "tagged", h_{t-1} as 8-byte words tagged with their
step and no barrier, ran in runs 7-8 and were removed with the kernels' exchanges of those names: perf/NOTES.md
v0.48, v0.55-v0.59.)

Every barrier variant's output is checked against a PyTorch loop before it is timed, and the real
forward kernel (its heuristic config) is timed beside it at the same shape, so the table reads: kernel step =
exchange floor + the rest (perf/kernel_ab.py times the kernel's variants, the transposed dots of v0.18 among
them).

    python perf/floor_probe.py [--hidden 256,512,1024] [--batch 16] [--dtype float16] [--warps 1,2,4]
                               [--seq 256] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

from tritonlstm.bench import write_rows_json
from tritonlstm.kernels.lstm import (
    FENCES,
    _cluster_barrier,
    _grid_barrier,
    _launch_as_cluster,
    cluster_size_ok,
    interpreting,
)

# (Mode 1 was "flags", one flag per program: the kernels' exchange "flags", removed in v0.52; 6 and 7 "dsmem" and
# "tagged", removed in v0.59.)
MODES = {"barrier": 0, "none": 2, "counter-ld": 3, "arrive": 4, "cluster": 5}
CLUSTERED = ("cluster",)
UNCHECKED = ("none", "arrive")


@triton.jit
def _counter_ld_barrier(p_err, p_count, target, max_spin, failed):
    """The counter barrier with plain-load polls: every thread reads the count itself (one load per warp reaches
    L2) instead of one thread's atomic broadcast through shared memory between two CTA barriers per poll. Warps may
    leave at different polls (nothing in the loop pairs them); the CTA barrier after the fence joins them. Returns
    True if it failed (failed on entry, the device's flag, or max_spin polls, which set it)."""
    tl.debug_barrier()
    tl.atomic_add(p_count, 1, sem="release", scope="gpu")
    seen = tl.load(p_count, volatile=True)
    spins = 0
    while (seen < target) & (spins <= max_spin) & (not failed):
        seen = tl.load(p_count, volatile=True)
        spins += 1
    gave_up = seen < target
    if gave_up:
        tl.atomic_xchg(p_err, 1)
    if FENCES:  # the polls were relaxed loads: the fence makes them acquire what the other programs released
        seen = tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.b32 $0, $1;", "=r,r", [seen], dtype=tl.int32,
                                         is_pure=False, pack=1)
    tl.debug_barrier()
    return gave_up | (tl.load(p_err, volatile=True) != 0) | (seen < 0)


@triton.jit
def floor_probe_kernel(U, Y, SYNC, ERR, T, B, H, max_spin, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                       MODE: tl.constexpr, LOAD_H: tl.constexpr):
    """U, Y [T, B, H]; y_t = 0.5 * mean_k(y_{t-1}) + u_t (y_{-1} = 0). SYNC [1] int32 zero. The exchanges are the
    kernels' own (_grid_barrier, _cluster_barrier)."""
    i_h = tl.program_id(0)
    n_h = tl.num_programs(0)
    o_b = tl.arange(0, BB)
    o_j = i_h * BH + tl.arange(0, BH)
    o_k = tl.arange(0, BK)
    m = (o_b < B)[:, None] & (o_j < H)[None, :]
    failed = tl.load(ERR) != 0
    # As the kernels do: u_t is loaded a step ahead (their PREFETCH of gx), and h_{t-1} goes through shared memory
    # to a dot. The row mean is the dot with ones. (A tl.sum of the loaded tile instead had ptxas consume each
    # 16-byte load before issuing the next: 4 L2 round trips a step at H = 256 where the kernels take one,
    # perf/NOTES.md "Session 25".)
    n_u = tl.load(U + o_b[:, None] * H + o_j[None, :], mask=m, other=0.0).to(tl.float32)
    ones = tl.full([BK, BH], 1.0, U.dtype.element_ty)
    for s in range(T):
        b_y = n_u
        if LOAD_H:
            m_h = (o_b < B)[:, None] & (o_k < H)[None, :] & (s > 0)
            if MODE == 5:  # L1 is the SM's own: the other CTAs' h is in L2
                b_h = tl.load(Y + ((s - 1) * B + o_b[:, None]) * H + o_k[None, :], mask=m_h, other=0.0,
                              cache_modifier=".cg")
            else:
                b_h = tl.load(Y + ((s - 1) * B + o_b[:, None]) * H + o_k[None, :], mask=m_h, other=0.0)
            b_y += (0.5 / H) * tl.dot(b_h, ones)
        tl.store(Y + (s * B + o_b[:, None]) * H + o_j[None, :], b_y.to(Y.dtype.element_ty), mask=m)
        n_u = tl.load(U + ((s + 1) * B + o_b[:, None]) * H + o_j[None, :], mask=m & (s + 1 < T),
                      other=0.0).to(tl.float32)
        if MODE == 0:
            failed = failed | _grid_barrier(ERR, SYNC, (s + 1) * n_h, max_spin)
        elif MODE == 3:
            failed = failed | _counter_ld_barrier(ERR, SYNC, (s + 1) * n_h, max_spin, failed)
        elif MODE == 4:
            tl.debug_barrier()
            tl.atomic_add(SYNC, 1, sem="release", scope="gpu")
        elif MODE == 5:
            failed = failed | (_cluster_barrier(s) < 0)


def reference(u: torch.Tensor) -> torch.Tensor:
    y, prev = torch.empty_like(u), torch.zeros_like(u[0], dtype=torch.float32)
    for t in range(u.shape[0]):
        prev = (u[t].float() + 0.5 * prev.mean(1, keepdim=True)).to(u.dtype)
        y[t] = prev
        prev = prev.float()
    return y


def launcher(u: torch.Tensor, block_h: int, warps: int, mode: str, load_h: bool, max_spin: int = 1 << 22):
    """A call that runs the probe once (a fresh counter) and returns (y, err flag)."""
    T, B, H = u.shape
    P = triton.cdiv(H, block_h)
    # At least 16 rows and columns (the dot's smallest tile); one stage, as the kernels' resident tiles: a pipelined
    # loop would load the next step's h_{t-1} before the barrier that makes it valid.
    meta = dict(BB=max(16, triton.next_power_of_2(B)), BH=block_h, BK=max(16, triton.next_power_of_2(H)),
                MODE=MODES[mode], LOAD_H=load_h, num_warps=warps, num_stages=1)

    if mode in CLUSTERED and not cluster_size_ok(P):
        raise ValueError(f"{mode}: {P} programs; Triton's launcher launches clusters of at most 8, or 16")

    def run():
        y = torch.full_like(u, float("nan"))
        sync = torch.zeros(1, dtype=torch.int32, device=u.device)
        err = torch.zeros(1, dtype=torch.int32, device=u.device)
        args = (u, y, sync, err, T, B, H, max_spin)
        if mode in CLUSTERED and not interpreting():
            _launch_as_cluster(floor_probe_kernel, (P, 1, 1), args, meta)
        else:
            floor_probe_kernel[(P,)](*args, **meta)
        return y, err

    return run


def tritonlstm_sync() -> None:
    """Raises if a persistent launch's barrier failed (the sticky flag of tritonlstm's kernels)."""
    from tritonlstm.kernels.lstm import barrier_errors

    barrier_errors.check(torch.device("cuda"), wait=True)


def measure(H: int, B: int, T: int, dtype: torch.dtype, warps: list[int]) -> list[dict]:
    from triton.testing import do_bench

    from tritonlstm.configs import heuristic_config
    from tritonlstm.tuning import make_problem

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = heuristic_config(H, B, dtype, sms)
    u = torch.randn(T, B, H, device="cuda", dtype=dtype)
    ref = reference(u)
    rows = []
    base = {"hidden": H, "batch": B, "seq": T, "dtype": str(dtype).removeprefix("torch."),
            "programs": triton.cdiv(H, cfg.block_h), "block_h": cfg.block_h}
    problem = make_problem("fwd", dtype, H, B, T)
    ms = do_bench(problem.launch(cfg), warmup=25, rep=100, return_mode="median")
    tritonlstm_sync()
    rows.append({**base, "what": "forward kernel (heuristic)", "warps": cfg.num_warps, "us_per_step": ms * 1e3 / T})
    jobs = [(mode, cfg.block_h) for mode in MODES]
    wide = cfg.block_h
    while not cluster_size_ok(triton.cdiv(H, wide)):
        wide *= 2
    if wide != cfg.block_h:  # a cluster's P is at most 8, or 16: the cluster there, and the counter barrier beside it
        jobs = [(mode, wide if mode in CLUSTERED else bh) for mode, bh in jobs] + [("barrier", wide)]
    for w in warps:
        for mode, bh in jobs:
            for load_h in (True, False):
                what = mode if bh == cfg.block_h else f"{mode} (P={triton.cdiv(H, bh)})"
                row = {**base, "what": f"{what}{'' if load_h else ' (no h read)'}", "warps": w,
                       "programs": triton.cdiv(H, bh), "block_h": bh}
                run = launcher(u, bh, w, mode, load_h)
                try:
                    y, err = run()
                    torch.cuda.synchronize()
                    if int(err.item()):
                        raise RuntimeError("an exchange gave up (programs not all resident?)")
                    if mode not in UNCHECKED and load_h:
                        rel = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                        row["rel_err"] = rel
                        if not rel < 1e-2:
                            raise RuntimeError(f"output differs from the PyTorch loop: rel err {rel:.2e}")
                    row["us_per_step"] = do_bench(run, warmup=25, rep=100, return_mode="median") * 1e3 / T
                except Exception as e:  # a variant that fails is a finding, reported in its row
                    row["error"] = f"{type(e).__name__}: {e}"[:200]
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", default="256,512,1024")
    ap.add_argument("--batch", default="16")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--warps", default="1,2,4")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("perf/floor_probe.py: no CUDA device, nothing to time.")
        return 0
    rows = []
    print(f"{torch.cuda.get_device_name(0)}; {a.dtype}, T = {a.seq}; us per step")
    print(f"{'H':>5} {'B':>4} {'P':>4} {'warps':>5} {'what':34} {'us/step':>8}")
    for h in (int(v) for v in a.hidden.split(",")):
        for b in (int(v) for v in a.batch.split(",")):
            for r in measure(h, b, a.seq, getattr(torch, a.dtype), [int(v) for v in a.warps.split(",")]):
                rows.append(r)
                us = f"{r['us_per_step']:8.2f}" if "us_per_step" in r else f"{'-':>8}  {r.get('error', '')}"
                print(f"{h:5} {b:4} {r['programs']:4} {r['warps']:5} {r['what']:34} {us}", flush=True)
            if a.json:
                write_rows_json(a.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
