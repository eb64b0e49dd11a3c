"""A prototype of the inference forward whose recurrent dot is transposed, measured before it is built into
kernels/lstm.py (perf/NOTES.md v0.18).

The recurrence kernels compute each program's gates as h_{t-1} [B, K] @ W [K, 4*BH]: M is the batch tile, 16
rows at B <= 16, below the 64 rows of a Hopper warpgroup MMA (wgmma), so sm_90 runs them as mma.sync, every warp
loading its operands from shared memory through ldmatrix. Transposed, gates^T = W^T [4*BH, K] @ h^T [K, B]:
M is the program's 4 * BH gate rows (BH = 16: exactly one m64 wgmma), N the batch (8 to 256, any multiple of 8
wgmma takes), so one warpgroup issues K/16 asynchronous wgmma per step that read W^T (resident in shared memory)
and h^T (stored there once per step) directly, whatever the batch. Compile-only (sm_90, fp16, K = 256..1024,
B = 16): one `warp_group_dot` per step, W^T resident; see NOTES for the counts.

Scope of the prototype: one layer, one direction, inference (no gates stored), no lengths, the kernels' own grid
barrier. `forward(x_proj, w_hh, bias, h0, c0)` takes gx = x @ W_ih^T [T, B, 4H] as the launchers do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritonlstm.kernels.lstm import _grid_barrier, _sigmoid

BH = 16  # 4 * BH = 64 gate rows: one wgmma M tile
# The dot's K chunk holds 8 KB of h_{t-1} ([B, KC]): compile-only sm_90, without spills at B = 16 up to K = 1024
# in 16-bit and K = 512 in fp32, at B = 64 up to K = 512 in 16-bit (fp32 K = 1024 needs 274 KB: not possible).
H_CHUNK_BYTES = 8192


@triton.jit
def transposed_fwd_kernel(GX, W, BIAS, H0, C0, Y, HN, CN, SYNC, ERR, T, B, H, max_spin, BH: tl.constexpr,
                          BB: tl.constexpr, BK: tl.constexpr, KC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """GX [T, B, 4H]; W [4H, H] (W_hh); BIAS [4H] float32; H0 [B, H]; C0 [B, H] float32; Y [T, B, H]; HN, CN
    [B, H]. Program i_h owns units i_h*BH .. +BH; its tiles are [units or gate rows, batch] (transposed)."""
    i_h = tl.program_id(0)
    n_h = tl.num_programs(0)
    # Gate row r of this program: gate r // BH of unit i_h * BH + r % BH.
    o_r = tl.arange(0, 4 * BH)
    row = (o_r // BH) * H + i_h * BH + o_r % BH
    m_r = i_h * BH + o_r % BH < H
    o_b = tl.arange(0, BB)
    m_b = o_b < B
    o_j = i_h * BH + tl.arange(0, BH)
    m_jb = (o_j < H)[:, None] & m_b[None, :]
    o_jb = o_b[None, :] * H + o_j[:, None]  # element (j, b) of a [B, H] buffer

    # W^T's [4BH, KC] chunks, each its own tile in shared memory (Triton cannot slice one resident tile): the
    # dot runs chunk by chunk, so that no more than one [BB, KC] piece of h_{t-1} is in registers at a time.
    b_w = ()
    for i in tl.static_range(BK // KC):
        o_c = i * KC + tl.arange(0, KC)
        b_w = b_w + (tl.load(W + row[:, None] * H + o_c[None, :], mask=m_r[:, None] & (o_c < H)[None, :],
                             other=0.0),)
    b_bias = tl.load(BIAS + row, mask=m_r, other=0.0)[:, None]
    b_c = tl.load(C0 + o_jb, mask=m_jb, other=0.0)
    b_y = tl.zeros([BH, BB], dtype=tl.float32)
    poisoned = tl.load(ERR, volatile=True) != 0
    for s in range(T):
        b_gx = tl.trans(tl.load(GX + (s * B + o_b[:, None]) * 4 * H + row[None, :], mask=m_b[:, None] & m_r[None, :],
                                other=0.0))
        # h_{t-1} [BB, BK] as it lies in memory (rows of H contiguous values), used transposed: a pointer tensor
        # of the [BK, BB] view cost 2 registers an element and spilled from K = 512.
        p_h = tl.where(s == 0, H0, Y + (s - 1) * B * H)
        acc = b_gx.to(tl.float32) + b_bias
        for i in tl.static_range(BK // KC):
            o_c = i * KC + tl.arange(0, KC)
            b_h = tl.load(p_h + o_b[:, None] * H + o_c[None, :], mask=m_b[:, None] & (o_c < H)[None, :], other=0.0)
            acc = tl.dot(b_w[i], tl.trans(b_h), acc=acc, input_precision=DOT_PRECISION)
        # Rows g * BH + j -> [BH, BB, gate // 2, gate % 2], then two splits of the last axis.
        acc = tl.permute(tl.reshape(acc, [2, 2, BH, BB]), (2, 3, 0, 1))
        a_even, a_odd = tl.split(acc)  # gates (0, 2) and (1, 3)
        b_gi, b_gg = tl.split(a_even)
        b_gf, b_go = tl.split(a_odd)
        b_c = _sigmoid(b_gf) * b_c + _sigmoid(b_gi) * (2.0 * _sigmoid(2.0 * b_gg) - 1.0)
        b_y = _sigmoid(b_go) * (2.0 * _sigmoid(2.0 * b_c) - 1.0)
        b_c = tl.where(poisoned, float("nan"), b_c)
        b_y = tl.where(poisoned, float("nan"), b_y)
        tl.store(Y + s * B * H + o_jb, b_y.to(Y.dtype.element_ty), mask=m_jb)
        poisoned = poisoned | _grid_barrier(ERR, SYNC, (s + 1) * n_h, max_spin)
    tl.store(HN + o_jb, b_y.to(HN.dtype.element_ty), mask=m_jb)
    tl.store(CN + o_jb, b_c.to(CN.dtype.element_ty), mask=m_jb)


def launch_args(gx, w_hh, bias, h0, c0, max_spin: int = 1 << 24):
    """(grid, args, meta) of one launch; outputs y, h_n, c_n are args[5:8]."""
    from tritonlstm.kernels.lstm import barrier_errors

    T, B, G = gx.shape
    H = G // 4
    dev, dt = gx.device, gx.dtype
    y = torch.empty(T, B, H, device=dev, dtype=dt)
    hn, cn = torch.empty(B, H, device=dev, dtype=dt), torch.empty(B, H, device=dev, dtype=dt)
    sync = torch.zeros(1, device=dev, dtype=torch.int32)
    bias = bias if bias is not None else torch.zeros(G, device=dev, dtype=torch.float32)
    grid = (triton.cdiv(H, BH),)
    args = (gx, w_hh, bias, h0, c0.float().contiguous(), y, hn, cn, sync, barrier_errors.flag(dev), T, B, H, max_spin)
    BK, BB = max(16, triton.next_power_of_2(H)), max(16, triton.next_power_of_2(B))
    meta = dict(BH=BH, BB=BB, BK=BK, KC=max(16, min(BK, H_CHUNK_BYTES // (BB * dt.itemsize))),
                DOT_PRECISION="tf32" if dt == torch.float32 else "ieee", num_warps=4, num_stages=1)
    return grid, args, meta


def forward(gx, w_hh, bias, h0, c0):
    """y [T, B, H], h_n, c_n [B, H] (persistent launch: every program must be resident)."""
    grid, args, meta = launch_args(gx, w_hh, bias, h0, c0)
    transposed_fwd_kernel[grid](*args, **meta)
    return args[5], args[6], args[7]
