"""The floor of one persistent step, on a GPU: what a step of the forward recurrence costs once the matmul and
the gate arithmetic are taken out, so that the step time of the real kernel splits into exchange and compute
(issue 5.4, perf/NOTES.md "v0.17"). Each of P programs per step: loads its [B, BH] tile of a gx-like input,
reads the whole h_{t-1} [B, H] that the recurrent dot would read (or not: the "no h read" rows), makes its
[B, BH] slice of h_t from them (a row mean of h_{t-1}: the dot's data dependence without its arithmetic),
stores it, and meets the other programs by

  barrier   the recurrence kernels' grid barrier (kernels.lstm._grid_barrier: one counter, polled by one thread
            whose result reaches the others through shared memory, two CTA barriers per poll)
  none      no exchange at all: the loop alone (its h reads race the producers; timed, not checked)
  counter-ld  the counter, polled with plain loads by every thread (no atomic per poll, no CTA barrier inside the
            loop: warps may leave it at different polls), one fence after the wait; the arrival's add has no
            result to wait for (a candidate for the kernels' barrier if it beats "barrier", session 8)
  arrive    the counter's arrival alone, no wait (a CTA barrier, the release and the add): what the arrival costs
            of a barrier step (races like "none"; timed, not checked)
  dsmem     the cluster barrier, and h_{t-1} out of the programs' shared memory instead of L2, as the forward's exchange
            "dsmem" moves it (kernels.lstm _slot_put / _slot_pull, perf/NOTES.md v0.48): each program's y_t slice in
            its own slot before the arrive, the whole y_{t-1} pulled in 16-byte loads after the wait (16-bit only;
            the cluster's P as for "cluster")
  cluster   Hopper's hardware cluster barrier (barrier.cluster.arrive.release / wait.acquire) instead of any
            counter in memory: the kernel is built for one CTA a program (num_ctas = 1) and launched as one
            thread-block cluster of all P programs, which Triton's CUDA launcher does when the metadata it is handed
            says num_ctas = P (it multiplies grid x by it and sets the cluster dimension). At most 8 programs,
            or 16 (non-portable: the launcher allows 16 and no size between), so the rows say their P and beside
            them is "barrier" at the same P. h_{t-1} is read with .cg loads (from L2) (perf/NOTES.md v0.34)
  tagged    no barrier: each program also stores its y_t slice as 8-byte words (two 16-bit values, and t + 1 in the
            high 32 bits) into slot t % 2 of a ring, and reads h_{t-1} as those words: one volatile load of the
            tile, then each thread checks its own words' tags and reloads, alone, those that are not yet of
            step t - 1 (inline PTX, a bounded spin). An 8-byte store lands whole, so the right tag means the right
            values: no fence, no counter, no CTA barrier in the wait. 16-bit only (perf/NOTES.md v0.55; the
            forward's exchange "tagged", kernels.lstm _tagged_put / _tagged_get, v0.56)

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
    DSMEM_MAX_SLOTS,
    FENCES,
    _cluster_arrive,
    _cluster_barrier,
    _cluster_wait,
    _dsmem_codes,
    _grid_barrier,
    _launch_as_cluster,
    _slot_pull,
    _slot_put,
    _tagged_get,
    tag_wait_pack,
    _tagged_put,
    cluster_size_ok,
    dsmem_ring,
    dsmem_slots_bytes,
    interpreting,
)

# (Mode 1 was "flags", one flag per program: the kernels' exchange "flags", removed in v0.52.)
MODES = {"barrier": 0, "none": 2, "counter-ld": 3, "arrive": 4, "cluster": 5, "dsmem": 6, "tagged": 7}
SIXTEEN_BIT = ("dsmem", "tagged")
CLUSTERED = ("cluster", "dsmem")
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
def floor_probe_kernel(U, Y, SYNC, ERR, RING, T, B, H, max_spin, BB: tl.constexpr, BH: tl.constexpr,
                       BK: tl.constexpr, MODE: tl.constexpr, LOAD_H: tl.constexpr, DSMEM: tl.constexpr = False,
                       PACK: tl.constexpr = 1):
    """U, Y [T, B, H]; y_t = 0.5 * mean_k(y_{t-1}) + u_t (y_{-1} = 0). SYNC [1] int32 zero; RING the
    dsmem mode's codes (and slots, on the interpreter), kernels.lstm's layout, or the tagged mode's words (int64
    [2, BB, BK // 2] zeros); DSMEM (with MODE "dsmem") asks the
    cluster launch for the slots' shared memory (cluster_launch_shared). The exchanges are the kernels' own
    (_grid_barrier, _cluster_barrier, _slot_put / _slot_pull)."""
    SLOTS: tl.constexpr = 2 * BB * BH * 2
    i_h = tl.program_id(0)
    n_h = tl.num_programs(0)
    o_b = tl.arange(0, BB)
    o_j = i_h * BH + tl.arange(0, BH)
    o_k = tl.arange(0, BK)
    m = (o_b < B)[:, None] & (o_j < H)[None, :]
    failed = tl.load(ERR) != 0
    if MODE == 6:
        codes = _dsmem_codes(RING, BB, BH, BK, SLOTS)
        o_slot = (o_b[:, None] * BH + tl.arange(0, BH)[None, :]) * 2
        _slot_put(tl.zeros([BB, BH], dtype=Y.dtype.element_ty), o_slot + SLOTS // 2, RING, BB, BK, SLOTS)  # y_{-1}
        _cluster_barrier(0)
    dead = tl.zeros([BB, BK // 2], dtype=tl.int1)  # mode 7: the words whose wait gave up
    for s in range(T):
        b_y = tl.load(U + (s * B + o_b[:, None]) * H + o_j[None, :], mask=m, other=0.0).to(tl.float32)
        if LOAD_H:
            m_h = (o_b < B)[:, None] & (o_k < H)[None, :] & (s > 0)
            if MODE == 6:
                b_h = _slot_pull(codes, (s + 1) % 2, RING, BB, BK, SLOTS, Y.dtype.element_ty)
                b_h = tl.where(m_h, b_h, tl.zeros_like(b_h))
            elif MODE == 7:
                # (The ring starts as y_{-1} = 0's words, tag 0; step s's words are tagged s + 1.)
                even, odd, gave_up = _tagged_get(RING + ((s + 1) % 2) * (BB * BK // 2), s, o_b, o_b < B, H,
                                                 tl.where(dead, 0, max_spin), Y.dtype.element_ty, BB, BK, BK, 0, PACK)
                dead = dead | gave_up  # no reduction on the step's path: the flag is set after the loop
                b_h = tl.join(even, odd)  # (only summed below)
            elif MODE == 5:  # L1 is the SM's own: the other CTAs' h is in L2
                b_h = tl.load(Y + ((s - 1) * B + o_b[:, None]) * H + o_k[None, :], mask=m_h, other=0.0,
                              cache_modifier=".cg")
            else:
                b_h = tl.load(Y + ((s - 1) * B + o_b[:, None]) * H + o_k[None, :], mask=m_h, other=0.0)
            if MODE == 7:
                b_y += (0.5 / H) * tl.sum(tl.sum(b_h.to(tl.float32), axis=2), axis=1)[:, None]
            else:
                b_y += (0.5 / H) * tl.sum(b_h.to(tl.float32), axis=1)[:, None]
        if MODE == 6:
            # This program's slice into its slot s % 2, arrive, and the output's global store off the barrier's path.
            _slot_put(b_y.to(Y.dtype.element_ty), o_slot + (s % 2) * (SLOTS // 2), RING, BB, BK, SLOTS)
            _cluster_arrive(s)
        if MODE == 7:
            _tagged_put(RING + (s % 2) * (BB * BK // 2), b_y.to(Y.dtype.element_ty), s + 1, o_b, o_b < B,
                        i_h * (BH // 2), H, BB, BH, BK)
        tl.store(Y + (s * B + o_b[:, None]) * H + o_j[None, :], b_y.to(Y.dtype.element_ty), mask=m)
        if MODE == 6:
            if FENCES:
                _cluster_wait(s)
            else:  # (the interpreter's arrive and wait as one barrier, as in the forward kernel)
                _cluster_barrier(s)
        elif MODE == 0:
            failed = failed | _grid_barrier(ERR, SYNC, (s + 1) * n_h, max_spin)
        elif MODE == 3:
            failed = failed | _counter_ld_barrier(ERR, SYNC, (s + 1) * n_h, max_spin, failed)
        elif MODE == 4:
            tl.debug_barrier()
            tl.atomic_add(SYNC, 1, sem="release", scope="gpu")
        elif MODE == 5:
            failed = failed | (_cluster_barrier(s) < 0)
    if MODE == 7:
        tl.atomic_xchg(ERR + tl.zeros([BB, BK // 2], dtype=tl.int32), 1, mask=dead, sem="relaxed")


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
    meta = dict(BB=triton.next_power_of_2(B), BH=block_h, BK=triton.next_power_of_2(H),
                MODE=MODES[mode], LOAD_H=load_h, num_warps=warps)

    if mode in CLUSTERED and not cluster_size_ok(P):
        raise ValueError(f"{mode}: {P} programs; Triton's launcher launches clusters of at most 8, or 16")
    if mode == "tagged" and u.dtype.itemsize != 2:
        raise ValueError(f"tagged: 16-bit values (two a word), got {u.dtype}")
    if mode == "dsmem" and (u.dtype.itemsize != 2 or dsmem_slots_bytes(meta["BB"], block_h) > DSMEM_MAX_SLOTS):
        raise ValueError(f"dsmem: 16-bit values and at most {DSMEM_MAX_SLOTS} bytes of slots (kernels.lstm."
                         f"dsmem_applies), got {u.dtype}, BB = {meta['BB']}, BH = {block_h}")
    if mode == "tagged":
        meta["PACK"] = tag_wait_pack(meta["BB"], meta["BK"] // 2, warps)
    if mode == "dsmem":
        meta["DSMEM"] = True  # (for cluster_launch_shared: the slots beyond the kernel's shared memory)

    def run():
        y = torch.full_like(u, float("nan"))
        sync = torch.zeros(1, dtype=torch.int32, device=u.device)
        err = torch.zeros(1, dtype=torch.int32, device=u.device)
        if mode == "dsmem":
            ring = dsmem_ring(P, meta["BB"], block_h, meta["BK"], u.device)
        elif mode == "tagged":
            ring = torch.zeros(meta["BB"] * meta["BK"], dtype=torch.int64, device=u.device)  # 2 slots of BK / 2
        else:
            ring = torch.empty(1, dtype=torch.int16, device=u.device)
        args = (u, y, sync, err, ring, T, B, H, max_spin)
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
    if dtype.itemsize != 2:
        jobs = [(mode, bh) for mode, bh in jobs if mode not in SIXTEEN_BIT]
    for w in warps:
        for mode, bh in jobs:
            for load_h in (True, False) if mode != "tagged" else (True,):  # (its wait is its h read)
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
