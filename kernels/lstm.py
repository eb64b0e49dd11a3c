"""The fused LSTM recurrence: forward kernel, backward kernel, the grid barrier and their launchers.

Dimension legend: T steps, B batch, H hidden, G = 4 gates in nn.LSTM's order (i, f, g, o), D directions
(1, or 2 for both directions of a bidirectional layer in one launch).

Layout: program (i_h, i_q, i_d) owns hidden units [i_h * BH, (i_h + 1) * BH) of direction i_d and the batch
tiles i_q, i_q + Q, ... of BB rows. The P = cdiv(H, BH) programs of one (direction, batch group) exchange
h_{t-1} (forward) or dG_{t+1} (backward) through global memory each step and meet at a grid barrier on their
own counter; other groups never wait on them, since directions and batch rows are independent. Direction d
reads and writes the d-th slice of [T, B, D*X] buffers (so a bidirectional layer's output comes out already
concatenated, as nn.LSTM lays it out) and the d-th [B, H] / [4H, H] block of the stacked states and weights.
Direction 1 of a D = 2 launch runs in reverse; a D = 1 launch runs in reverse when asked (rev0 = 1).

Persistent mode runs every step in one launch; the programs must all be resident at once (the launcher
checks P * Q * D against the SM count). Stepwise mode launches the same body once per step, the launch
boundary acting as the barrier: it is the path for the CPU interpreter, which runs programs one after
another, and the fallback where residency cannot be guaranteed.

STACK mode reuses axis 2 for the layers of a unidirectional stack run as a wavefront; one barrier counter per
batch group spans the whole stack. Forward: layer l runs its step t at global step t + l, the layers above
the first computing their input projection from the layer below's h_t inside the loop. Backward (a reverse
wavefront): layer l runs one step behind the layer above and adds that layer's dG_t @ W_ih to its dh_t inside
the loop. Dropout between layers (HAS_DROPOUT): layer l multiplies its output tile by a given scale and
writes the dropped copy that layer l + 1 reads; the backward scales the gradient from above the same way.

The barrier is one counter per (direction, batch group) (_grid_barrier), or with CLUSTER Hopper's cluster barrier
(_cluster_barrier). The recurrent dots are [BB, K] @ [K, BH] per gate, or with TRANSPOSED W^T [4*BH, K] @ h^T
(_transposed_gate_dots: M = the program's gate rows, for Hopper's warpgroup MMA at any batch).

A barrier that fails (a program never arrives within max_spin polls) sets the device's sticky ERR flag; from
then on every output of that launch, and of any launch that starts while the flag is set, is NaN, and the
host raises at its next launch or at `tritonlstm.synchronize()` (BarrierErrors) without a sync per launch.

Per-row lengths (packed sequences): row b is live for steps s = 0 .. LAST[b]; since its dead steps all come
after its live ones, a dead row needs no state freezing, only masked stores. In reverse, row b visits
t = LAST[b] - s, so each sequence starts at its own end.
"""

import contextlib
import contextvars
import functools
import math
import os
import warnings

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime.interpreter import InterpretedFunction

# Host-side ceil division and next power of two are configs' plain ones: Triton 3.6's triton.cdiv and
# triton.next_power_of_2 are constexpr_function wrappers costing ~3 us a call on the host (perf/NOTES.md v0.33).
from tritonlstm.configs import (
    MAX_CLUSTER,
    MAX_PORTABLE_CLUSTER,
    SM90_SHARED,
    cdiv,
    cluster_size_ok,
    device_limits,
    for_kernel,
    shared_bytes,
)
from tritonlstm.configs import _pow2 as next_power_of_2
from tritonlstm.kernels import launcher


def interpreting() -> bool:
    """True when the kernels were built for the CPU interpreter (TRITON_INTERPRET=1 before import)."""
    return isinstance(lstm_fwd_kernel, InterpretedFunction)


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _load_four_gates(p, m, H):
    """The four gates' tiles of a gate-stacked [4H, H] weight at the pointers p of gate 0 (gate g is H*H on)."""
    gate = H * H
    b_wi = tl.load(p, mask=m, other=0.0)
    b_wf = tl.load(p + gate, mask=m, other=0.0)
    b_wg = tl.load(p + 2 * gate, mask=m, other=0.0)
    b_wo = tl.load(p + 3 * gate, mask=m, other=0.0)
    return b_wi, b_wf, b_wg, b_wo


@triton.jit
def _load_gate_tiles(p_w, o_k, o_j, m_k, m_j, H, STRIDE_K, STRIDE_J):
    """Four [BK, BJ] tiles of W_hh [4H, H], one per gate; element (k, j) of gate g at g*H*H + k*SK + j*SJ."""
    return _load_four_gates(p_w + o_k[:, None] * STRIDE_K + o_j[None, :] * STRIDE_J, m_k[:, None] & m_j[None, :], H)


@triton.jit
def _chunk_offsets(k0, BK: tl.constexpr, SK: tl.constexpr):
    """The units k0 .. k0 + BK of a K chunk: [BK] offsets, or with SK > 1 split-K slices of them, [SK, 1, BK // SK]
    (_gate_dots says why)."""
    if SK == 1:
        return k0 + tl.arange(0, BK)
    else:
        o_s = tl.arange(0, SK) * (BK // SK)
        return k0 + o_s[:, None, None] + tl.arange(0, BK // SK)[None, None, :]


@triton.jit
def _load_chunk_tiles(p_w, k0, o_j, m_j, H, STRIDE_K, STRIDE_J, BK: tl.constexpr, SK: tl.constexpr):
    """The four gates' W tiles that multiply the K chunk at k0: [BK, BJ], or [SK, BK // SK, BJ] split-K tiles."""
    o_u = _chunk_offsets(k0, BK, SK)
    if SK == 1:
        return _load_gate_tiles(p_w, o_u, o_j, o_u < H, m_j, H, STRIDE_K, STRIDE_J)
    else:
        o_u = tl.permute(o_u, (0, 2, 1))  # [SK, BK // SK, 1]
        return _load_four_gates(p_w + o_u * STRIDE_K + o_j[None, None, :] * STRIDE_J, (o_u < H) & m_j[None, None, :],
                                H)


@triton.jit
def _gate_dots(acc_i, acc_f, acc_g, acc_o, p_base, o_rows, m_rows, w_i, w_f, w_g, w_o, p_w, o_k, o_j, m_j, m_w, H,
               BK: tl.constexpr, W_RESIDENT: tl.constexpr, DOT_PRECISION: tl.constexpr, SK: tl.constexpr):
    """The forward's four gate products, acc_g += x @ W_g[units], over K = H in BK chunks; row r of x starts at
    p_base + o_rows[r]. W's tiles are w_* when resident, else each chunk's are loaded from p_w (tile (k, j) of gate g at
    g*H*H + j*H + k, masked by m_w).

    SK > 1 splits each chunk's K into SK slices, one batched-dot slice each, summed afterwards: with the
    16-row batch tile, a 2-D dot gets all warps stacked along M (Triton's MMA layout for chained dots), so every
    warp computed the whole product and read all of W from shared memory; the batched dot puts one warp per
    slice instead (W tiles are then [SK, BK // SK, BH])."""
    for k0 in range(0, H, BK):
        if SK == 1:
            o_kk = k0 + o_k
            m_k = o_kk < H
            b_x = tl.load(p_base + o_rows[:, None] + o_kk[None, :], mask=m_rows[:, None] & m_k[None, :], other=0.0,
                          cache_modifier=".cg")
            if W_RESIDENT:
                t_i, t_f, t_g, t_o = w_i, w_f, w_g, w_o
            else:
                t_i, t_f, t_g, t_o = _load_gate_tiles(p_w + k0, o_k, o_j, m_k & m_w, m_j, H, 1, H)
            acc_i += tl.dot(b_x, t_i, input_precision=DOT_PRECISION)
            acc_f += tl.dot(b_x, t_f, input_precision=DOT_PRECISION)
            acc_g += tl.dot(b_x, t_g, input_precision=DOT_PRECISION)
            acc_o += tl.dot(b_x, t_o, input_precision=DOT_PRECISION)
        else:
            o_kx = _chunk_offsets(k0, BK, SK)
            b_x = tl.load(p_base + o_rows[None, :, None] + o_kx, mask=m_rows[None, :, None] & (o_kx < H), other=0.0,
                          cache_modifier=".cg")
            if W_RESIDENT:
                t_i, t_f, t_g, t_o = w_i, w_f, w_g, w_o
            else:
                t_i, t_f, t_g, t_o = _load_chunk_tiles(p_w, k0, o_j, m_j & m_w, H, 1, H, BK, SK)
            acc_i += tl.sum(tl.dot(b_x, t_i, input_precision=DOT_PRECISION), axis=0)
            acc_f += tl.sum(tl.dot(b_x, t_f, input_precision=DOT_PRECISION), axis=0)
            acc_g += tl.sum(tl.dot(b_x, t_g, input_precision=DOT_PRECISION), axis=0)
            acc_o += tl.sum(tl.dot(b_x, t_o, input_precision=DOT_PRECISION), axis=0)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _load_merged_tiles(p_w, o_k, m_k, i_h, H, BH: tl.constexpr):
    """W_hh's four [BK, BH] gate tiles of this program's units as one [BK, 4 * BH] tile whose column j * 4 + g
    is unit j of gate g (element (k, j*4 + g) = W_hh[g*H + i_h*BH + j, k], at p_w + that offset)."""
    o_n = tl.arange(0, 4 * BH)
    o_u = i_h * BH + o_n // 4
    p = p_w + ((o_n % 4) * H + o_u)[None, :] * H + o_k[:, None]
    return tl.load(p, mask=m_k[:, None] & (o_u < H)[None, :], other=0.0)


@triton.jit
def _merged_gate_dots(acc_i, acc_f, acc_g, acc_o, p_base, o_rows, m_rows, w_m, p_w, o_k, i_h, H, BK: tl.constexpr,
                      BB: tl.constexpr, BH: tl.constexpr, W_RESIDENT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """_gate_dots as ONE dot per K chunk, x @ W[:, 4 * BH] with the gates' columns interleaved
    (_load_merged_tiles), then split back into the four gates. A lone dot is laid out with its warps along N
    (Triton stacks the warps along M only for dots that share operands), so with the 16-row batch tile each
    warp owns its own columns of the product and of everything after it, instead of every warp computing
    all of it."""
    acc = tl.zeros([BB, 4 * BH], dtype=tl.float32)
    for k0 in range(0, H, BK):
        o_kk = k0 + o_k
        m_k = o_kk < H
        b_x = tl.load(p_base + o_rows[:, None] + o_kk[None, :], mask=m_rows[:, None] & m_k[None, :], other=0.0,
                      cache_modifier=".cg")
        if W_RESIDENT:
            t_m = w_m
        else:
            t_m = _load_merged_tiles(p_w + k0, o_k, m_k, i_h, H, BH)
        acc = tl.dot(b_x, t_m, acc, input_precision=DOT_PRECISION)
    # Column j * 4 + 2a + b -> [BB, BH, a, b]: splitting b then a gives the gates (i, g) and (f, o).
    b_ig, b_fo = tl.split(tl.reshape(acc, [BB, BH, 2, 2]))
    b_i, b_g = tl.split(b_ig)
    b_f, b_o = tl.split(b_fo)
    return acc_i + b_i, acc_f + b_f, acc_g + b_g, acc_o + b_o


@triton.jit
def _transposed_rows(i_h, m_w, H, BH: tl.constexpr):
    """W_hh's rows that make this program's W^T [4 * BH, K] (row r = gate r // BH of unit i_h * BH + r % BH),
    and their mask (units past H; m_w False masks all)."""
    o_r = tl.arange(0, 4 * BH)
    return (o_r // BH) * H + i_h * BH + o_r % BH, (i_h * BH + o_r % BH < H) & m_w


@triton.jit
def _load_transposed_tiles(p_w, i_h, m_w, H, BH: tl.constexpr, BK: tl.constexpr, KC: tl.constexpr):
    """W^T's rows of this program (_transposed_rows, at p_w) as a tuple of [4 * BH, KC] tiles: one shared-memory
    tile per K chunk of _transposed_gate_dots (Triton cannot slice one resident tile). m_w False: zeros."""
    rows, m_r = _transposed_rows(i_h, m_w, H, BH)
    tiles = ()
    for i in tl.static_range(BK // KC):
        o_c = i * KC + tl.arange(0, KC)
        tiles = tiles + (tl.load(p_w + rows[:, None] * H + o_c[None, :], mask=m_r[:, None] & (o_c < H)[None, :],
                                 other=0.0),)
    return tiles


@triton.jit
def _x_chunk(p_base, o_rows, m_rows, k0, H, KC: tl.constexpr):
    """Columns k0 .. k0 + KC of a transposed dot's x rows (row r at p_base + o_rows[r]): [BB, KC]."""
    o_c = k0 + tl.arange(0, KC)
    return tl.load(p_base + o_rows[:, None] + o_c[None, :], mask=m_rows[:, None] & (o_c < H)[None, :], other=0.0,
                   cache_modifier=".cg")


@triton.jit
def _transposed_gate_dots(acc_i, acc_f, acc_g, acc_o, p_base, o_rows, m_rows, w_t, p_w, i_h, m_w, H,
                          BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, KC: tl.constexpr,
                          W_RESIDENT: tl.constexpr, DOT_PRECISION: tl.constexpr, HALF_W: tl.constexpr, x_mul,
                          acc_mul, X16: tl.constexpr = False):
    """_gate_dots transposed: gates^T [4 * BH, BB] = W^T @ x^T, M = the program's 4 * BH gate rows (BH = 16: one
    64-row Hopper warpgroup MMA, which a 16-row batch tile as M is too small for), N = the batch tile, K in KC
    chunks: w_t's resident tiles (_load_transposed_tiles), or streamed, each [4 * BH, KC] chunk of W^T loaded
    from p_w (masked by m_w) in a pipelined loop. x comes in [BB, KC] pieces used transposed (a [KC, BB] pointer
    tensor costs registers per element). The gates then come out of the accumulator's rows as [BB, BH] tiles.

    HALF_W: W^T is float16, scaled by a power of two into its range (_half_weights), and x (float32) is multiplied
    by x_mul, another power of two, and rounded to float16: the product on float16 operands, the accumulator times
    acc_mul = 1 / (both scales). Exact scalings, so the operands lose only what TF32 loses (10-bit mantissas).
    X16 (with HALF_W): x is float16 already, scaled and rounded by whoever wrote it (x_mul unused)."""
    acc = tl.zeros([4 * BH, BB], dtype=tl.float32)
    if W_RESIDENT:
        # Code after a dot waits for it (wgmma.wait_group), so a chunk loaded after the previous chunk's dot starts
        # its L2 round trip only then (perf/NOTES.md v0.31). With HALF_W, chunk i + 1's load is issued before
        # chunk i's dot; in 16-bit the same costs 256-512 bytes of spills (compile-only sm_90), so there the chunks
        # stay in turn.
        b_x = _x_chunk(p_base, o_rows, m_rows, 0, H, KC)
        for i in tl.static_range(BK // KC):
            if HALF_W and i + 1 < BK // KC:
                b_next = _x_chunk(p_base, o_rows, m_rows, (i + 1) * KC, H, KC)
            if HALF_W and not X16:
                b_x = (b_x * x_mul).to(tl.float16)
            acc = tl.dot(w_t[i], tl.trans(b_x), acc, input_precision=DOT_PRECISION)
            if i + 1 < BK // KC:
                b_x = b_next if HALF_W else _x_chunk(p_base, o_rows, m_rows, (i + 1) * KC, H, KC)
    else:
        rows, m_r = _transposed_rows(i_h, m_w, H, BH)
        for k0 in range(0, H, KC):
            o_c = k0 + tl.arange(0, KC)
            m_c = o_c < H
            t_w = tl.load(p_w + rows[:, None] * H + o_c[None, :], mask=m_r[:, None] & m_c[None, :], other=0.0)
            b_x = tl.load(p_base + o_rows[:, None] + o_c[None, :], mask=m_rows[:, None] & m_c[None, :], other=0.0,
                          cache_modifier=".cg")
            if HALF_W and not X16:
                b_x = (b_x * x_mul).to(tl.float16)
            acc = tl.dot(t_w, tl.trans(b_x), acc, input_precision=DOT_PRECISION)
    if HALF_W:
        acc = acc * acc_mul
    return _transposed_split(acc_i, acc_f, acc_g, acc_o, acc, BB, BH)


@triton.jit
def _transposed_split(acc_i, acc_f, acc_g, acc_o, acc, BB: tl.constexpr, BH: tl.constexpr):
    """The gates' [BB, BH] tiles of a transposed product acc [4 * BH, BB], added to acc_*."""
    # Row (2a + b) * BH + j -> [BB, BH, a, b]: splitting b then a gives the gates (i, g) and (f, o).
    b_ig, b_fo = tl.split(tl.permute(tl.reshape(acc, [2, 2, BH, BB]), (3, 2, 0, 1)))
    b_i, b_g = tl.split(b_ig)
    b_f, b_o = tl.split(b_fo)
    return acc_i + b_i, acc_f + b_f, acc_g + b_g, acc_o + b_o


@triton.jit
def _gate_grad_dot(acc, p_base, o_rows, m_rows, w_i, w_f, w_g, w_o, p_w, o_k, o_j, m_j, m_w, H,
                   BK: tl.constexpr, W_RESIDENT: tl.constexpr, DOT_PRECISION: tl.constexpr, SK: tl.constexpr):
    """The backward's product of gate gradients with a gate-stacked [4H, H] weight, acc += sum_g dG_g @ W_g[:,
    units], over K = H in BK chunks; gate g of row r of dG starts at p_base + o_rows[r] + g*H. W's tiles are w_* when
    resident, else each chunk's are loaded from p_w (tile (k, j) of gate g at g*H*H + k*H + j, masked by m_w).
    SK > 1: split-K as in _gate_dots."""
    if SK > 1:
        # (An else branch, not an early return: Triton compiles the code after a constexpr return too.)
        acc += _split_grad_dot(p_base, o_rows, m_rows, w_i, w_f, w_g, w_o, p_w, o_j, m_j, m_w, H, BK, W_RESIDENT,
                               DOT_PRECISION, SK)
    else:
        for k0 in range(0, H, BK):
            o_kk = k0 + o_k
            m_k = o_kk < H
            p = p_base + o_rows[:, None] + o_kk[None, :]
            m = m_rows[:, None] & m_k[None, :]
            if W_RESIDENT:
                t_i, t_f, t_g, t_o = w_i, w_f, w_g, w_o
            else:
                t_i, t_f, t_g, t_o = _load_gate_tiles(p_w + k0 * H, o_k, o_j, m_k & m_w, m_j, H, H, 1)
            acc += tl.dot(tl.load(p, mask=m, other=0.0, cache_modifier=".cg"), t_i, input_precision=DOT_PRECISION)
            acc += tl.dot(tl.load(p + H, mask=m, other=0.0, cache_modifier=".cg"), t_f, input_precision=DOT_PRECISION)
            acc += tl.dot(tl.load(p + 2 * H, mask=m, other=0.0, cache_modifier=".cg"), t_g,
                          input_precision=DOT_PRECISION)
            acc += tl.dot(tl.load(p + 3 * H, mask=m, other=0.0, cache_modifier=".cg"), t_o,
                          input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _split_grad_dot(p_base, o_rows, m_rows, w_i, w_f, w_g, w_o, p_w, o_j, m_j, m_w, H, BK: tl.constexpr,
                    W_RESIDENT: tl.constexpr, DOT_PRECISION: tl.constexpr, SK: tl.constexpr,
                    PAIRED: tl.constexpr = False):
    """sum_g dG_g @ W_g[:, units] with split-K (_gate_dots says why): the four gates' batched dots accumulate
    into one [SK, BB, BH] product, reduced over the slices once.

    PAIRED: gates i and f are loaded before either's dot, then g and o. Each dot's operand goes through shared
    memory behind a CTA barrier, which no load can be moved above, so a load written inside its dot is issued only
    after the previous gate's data has arrived: four L2 round trips in series. Paired, the 4-warp tiles at H 512
    take two, and spill nothing where they spilled 172 bytes (SASS, sm_90; perf/NOTES.md v0.66). The same dots in
    the same order: the same result."""
    acc = tl.zeros([SK, o_rows.shape[0], o_j.shape[0]], dtype=tl.float32)
    for k0 in range(0, H, BK):
        o_kx = _chunk_offsets(k0, BK, SK)
        p = p_base + o_rows[None, :, None] + o_kx
        m = m_rows[None, :, None] & (o_kx < H)
        if W_RESIDENT:
            t_i, t_f, t_g, t_o = w_i, w_f, w_g, w_o
        else:
            t_i, t_f, t_g, t_o = _load_chunk_tiles(p_w, k0, o_j, m_j & m_w, H, H, 1, BK, SK)
        if PAIRED:
            b_i = tl.load(p, mask=m, other=0.0, cache_modifier=".cg")
            b_f = tl.load(p + H, mask=m, other=0.0, cache_modifier=".cg")
            acc = tl.dot(b_i, t_i, acc, input_precision=DOT_PRECISION)
            acc = tl.dot(b_f, t_f, acc, input_precision=DOT_PRECISION)
            b_g = tl.load(p + 2 * H, mask=m, other=0.0, cache_modifier=".cg")
            b_o = tl.load(p + 3 * H, mask=m, other=0.0, cache_modifier=".cg")
            acc = tl.dot(b_g, t_g, acc, input_precision=DOT_PRECISION)
            acc = tl.dot(b_o, t_o, acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(tl.load(p, mask=m, other=0.0, cache_modifier=".cg"), t_i, acc,
                         input_precision=DOT_PRECISION)
            acc = tl.dot(tl.load(p + H, mask=m, other=0.0, cache_modifier=".cg"), t_f, acc,
                         input_precision=DOT_PRECISION)
            acc = tl.dot(tl.load(p + 2 * H, mask=m, other=0.0, cache_modifier=".cg"), t_g, acc,
                         input_precision=DOT_PRECISION)
            acc = tl.dot(tl.load(p + 3 * H, mask=m, other=0.0, cache_modifier=".cg"), t_o, acc,
                         input_precision=DOT_PRECISION)
    return tl.sum(acc, axis=0)


@triton.jit
def _load_transposed_grad_tiles(p_wt, i_h, m_w, H, BH: tl.constexpr, BK: tl.constexpr, KC: tl.constexpr,
                                FROM_W: tl.constexpr = False):
    """The backward's resident W_hh[R, :]^T (R = this program's 4 * BH gate rows, _transposed_rows) read from
    W_hh^T [H, 4H] at p_wt, so that each row's gate values lie contiguous (K-major, as Hopper's MMA wants its A
    operand in every dtype): a tuple of [KC, 4 * BH] tiles, one per chunk of the H units the product covers.
    FROM_W: p_wt is W_hh [4H, H] itself, read across its rows (once a launch), so the host makes no W^T copy."""
    rows, m_r = _transposed_rows(i_h, m_w, H, BH)
    tiles = ()
    for i in tl.static_range(BK // KC):
        o_c = i * KC + tl.arange(0, KC)
        if FROM_W:
            p = p_wt + rows[None, :] * H + o_c[:, None]
        else:
            p = p_wt + o_c[:, None] * (4 * H) + rows[None, :]
        tiles = tiles + (tl.load(p, mask=(o_c < H)[:, None] & m_r[None, :], other=0.0),)
    return tiles


@triton.jit
def _gate_grads_transposed(b_dgi, b_dgf, b_dgg, b_dgo, m_live, DT: tl.constexpr, BB: tl.constexpr,
                           BH: tl.constexpr):
    """The program's dG [BB, 4 * BH] as dG^T [4 * BH, BB] in the row order of _transposed_rows (row g * BH + j:
    gate g of unit j), in the stored dtype (what the unfused path's dot reads), zero where a row is not live.
    _transposed_gate_dots' split, inverted: [BB, BH, a, b] -> row (2a + b) * BH + j."""
    b_ig = tl.join(tl.where(m_live, b_dgi, 0.0), tl.where(m_live, b_dgg, 0.0))
    b_fo = tl.join(tl.where(m_live, b_dgf, 0.0), tl.where(m_live, b_dgo, 0.0))
    return tl.reshape(tl.permute(tl.join(b_ig, b_fo), (2, 3, 1, 0)), [4 * BH, BB]).to(DT)


@triton.jit
def _scatter_partials(p_part, o_b, m_b, b_dgt, w_t, p_wt, i_h, H, BH: tl.constexpr, BK: tl.constexpr,
                      KC: tl.constexpr, W_RESIDENT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """This program's share of every unit's dh: partial^T [H, BB] = W_hh[R, :]^T @ dG[:, R]^T over its own gate
    rows R (M = H in KC-row chunks, K = 4 * BH = 64: Hopper's warpgroup MMA at any batch), stored as float32
    [BB, H] rows at p_part. W^T from the resident tiles w_t, or each chunk loaded from p_wt (W_hh^T)."""
    if W_RESIDENT:
        for i in tl.static_range(BK // KC):
            o_c = i * KC + tl.arange(0, KC)
            acc = tl.dot(w_t[i], b_dgt, input_precision=DOT_PRECISION)
            tl.store(p_part + o_b[None, :] * H + o_c[:, None], acc, mask=(o_c < H)[:, None] & m_b[None, :])
    else:
        rows, m_r = _transposed_rows(i_h, True, H, BH)
        for k0 in range(0, H, KC):
            o_c = k0 + tl.arange(0, KC)
            m_c = o_c < H
            t_w = tl.load(p_wt + o_c[:, None] * (4 * H) + rows[None, :], mask=m_c[:, None] & m_r[None, :], other=0.0)
            acc = tl.dot(t_w, b_dgt, input_precision=DOT_PRECISION)
            tl.store(p_part + o_b[None, :] * H + o_c[:, None], acc, mask=m_c[:, None] & m_b[None, :])


@triton.jit
def _gather_partials(p_part, n_h, o_b, m_b, o_j, m_j, B, H, BB: tl.constexpr, BH: tl.constexpr, QP: tl.constexpr,
                     QC: tl.constexpr):
    """dh[:, units] = sum over the n_h producers q of partial_q[:, units] (partial q at p_part + q * B * H), in a
    fixed order (bitwise deterministic): QC producers per load, QP >= n_h in all (powers of two). With QC = 1 the
    sum over the producer axis of each load is a thread's own: no exchange between threads."""
    acc = tl.zeros([BB, BH], dtype=tl.float32)
    o_bj = o_b[:, None] * H + o_j[None, :]
    m_bj = m_b[:, None] & m_j[None, :]
    for i in tl.static_range(QP // QC):
        o_q = i * QC + tl.arange(0, QC)
        p = p_part + (o_q.to(tl.int64) * B * H)[:, None, None] + o_bj[None, :, :]
        m = (o_q < n_h)[:, None, None] & m_bj[None, :, :]
        acc += tl.sum(tl.load(p, mask=m, other=0.0, cache_modifier=".cg"), axis=0)
    return acc


@triton.jit
def _row_steps(LAST, o_b, m_b, s, T, rev, BB: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """For the rows o_b at step s: each row's last live step, the time index it visits (int64, for offsets into
    [T, B, *] buffers past 2^31 elements) and the direction of travel (+1, or -1 when rev)."""
    if HAS_LENGTHS:
        last = tl.load(LAST + o_b, mask=m_b, other=-1)
    else:
        last = tl.full([BB], T - 1, tl.int32)
    o_t = tl.where(rev, last.to(tl.int64) - s, tl.full([BB], s, tl.int64))
    return last, o_t, 1 - 2 * rev.to(tl.int64)


@triton.jit
def _prev_rows(P0, P, o_b, o_t, o_dir, s, B, H, SR):
    """Where the rows o_b read step s's previous state: the initial one ([B, H] at P0) at s = 0, else row
    (o_t - o_dir) * B + o_b of the [T * B, *] buffer P (row stride SR). (base pointer, each row's offset)."""
    o_rows = tl.where(s == 0, o_b.to(tl.int64) * H, ((o_t - o_dir) * B + o_b) * SR)
    return tl.where(s == 0, P0, P), o_rows


@triton.jit
def _load_gate_rows(p_gx, m, H):
    """The four gates' [BB, BH] tiles of one gx row block, as float32."""
    b_gi = tl.load(p_gx, mask=m, other=0.0).to(tl.float32)
    b_gf = tl.load(p_gx + H, mask=m, other=0.0).to(tl.float32)
    b_gg = tl.load(p_gx + 2 * H, mask=m, other=0.0).to(tl.float32)
    b_go = tl.load(p_gx + 3 * H, mask=m, other=0.0).to(tl.float32)
    return b_gi, b_gf, b_gg, b_go


@triton.jit
def _load_carried(P, o_row, SR, o_j, m_row, m_j, j0, H, BH: tl.constexpr, CARRY: tl.constexpr):
    """The [rows, BH] tile P[o_row * SR + o_j] (zeros where not m_row, or not m_j) for a prefetch to carry across
    the barrier: CARRY 0, as float32; 1, as loaded (16-bit values, one a register); 2, a 16-bit P's [rows, BH // 2]
    int32 words of two neighbouring values each, as loaded (o_j = j0 + 0..BH; SR, j0 and H even). The float32 tile
    of 1 and 2 comes from _widen_carried, after the wait: widened (or, two to a thread, split into 16-bit values)
    at the load, the tile waited for its loads before the barrier (perf/NOTES.md v0.68)."""
    if CARRY == 2:
        o_w = j0 // 2 + tl.arange(0, BH // 2)
        p = P.to(tl.pointer_type(tl.int32)) + (o_row[:, None] * SR) // 2 + o_w[None, :]
        x = tl.load(p, mask=m_row[:, None] & (o_w < H // 2)[None, :], other=0)
    else:
        x = tl.load(P + o_row[:, None] * SR + o_j[None, :], mask=m_row[:, None] & m_j[None, :], other=0.0)
        if CARRY == 0:
            x = x.to(tl.float32)
    return x


@triton.jit
def _widen_carried(x, dtype: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, CARRY: tl.constexpr):
    """_load_carried's tile as [BB, BH] float32, P's dtype `dtype` (words: the low half first)."""
    if CARRY == 2:
        lo = (x & 0xFFFF).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
        hi = (x >> 16).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
        x = tl.reshape(tl.join(lo, hi), [BB, BH])
    return x.to(tl.float32)


@triton.jit
def _load_step_gx(GX, LAST, o_b, m_b, o_j, m_j, j0, s, T, B, H, SG, rev, BB: tl.constexpr, BH: tl.constexpr,
                  HAS_LENGTHS: tl.constexpr, CARRY: tl.constexpr):
    """The forward's gx tiles of step s for the rows o_b, as _load_carried's CARRY (zeros where a row is not live at
    s, or s < 0): _load_step_inputs' twin for PREFETCH. j0: o_j's first unit."""
    last, o_t, _ = _row_steps(LAST, o_b, m_b, s, T, rev, BB, HAS_LENGTHS)
    m_row = m_b & (s >= 0) & (s <= last)
    o_row = o_t * B + o_b
    return (_load_carried(GX, o_row, SG, o_j, m_row, m_j, j0, H, BH, CARRY),
            _load_carried(GX + H, o_row, SG, o_j, m_row, m_j, j0, H, BH, CARRY),
            _load_carried(GX + 2 * H, o_row, SG, o_j, m_row, m_j, j0, H, BH, CARRY),
            _load_carried(GX + 3 * H, o_row, SG, o_j, m_row, m_j, j0, H, BH, CARRY))


@triton.jit
def _load_step_inputs(GATES, C_ALL, C0, DY, LAST, o_b, m_b, o_j, m_j, s, T, B, H, SG, SY, rev, BB: tl.constexpr,
                      HAS_LENGTHS: tl.constexpr, CARRY: tl.constexpr = 0, j0=0, BH: tl.constexpr = 2):
    """The backward's saved inputs of step s for the rows o_b, as [BB, BH] tiles: the gates i, f, g, o, c_t,
    c_{t-1} (c0 at s = 0) and dy (all zeros where a row is not live at s, or s < 0); c_t and c_{t-1} float32, the
    gates and dy float32 or (CARRY) as _load_carried's. j0: o_j's first unit."""
    last, o_t, o_dir = _row_steps(LAST, o_b, m_b, s, T, rev, BB, HAS_LENGTHS)
    m_row = m_b & (s >= 0) & (s <= last)
    m_live = m_row[:, None] & m_j[None, :]
    o_row = o_t * B + o_b
    if CARRY == 0:
        # (As one pointer tile for the four gates: built per gate, the float32 stack backward at H = 1000 spilled 8
        # bytes, compile-only.)
        p_g = GATES + o_row[:, None] * SG + o_j[None, :]
        b_i = tl.load(p_g, mask=m_live, other=0.0).to(tl.float32)
        b_f = tl.load(p_g + H, mask=m_live, other=0.0).to(tl.float32)
        b_g = tl.load(p_g + 2 * H, mask=m_live, other=0.0).to(tl.float32)
        b_o = tl.load(p_g + 3 * H, mask=m_live, other=0.0).to(tl.float32)
    else:
        b_i = _load_carried(GATES, o_row, SG, o_j, m_row, m_j, j0, H, BH, CARRY)
        b_f = _load_carried(GATES + H, o_row, SG, o_j, m_row, m_j, j0, H, BH, CARRY)
        b_g = _load_carried(GATES + 2 * H, o_row, SG, o_j, m_row, m_j, j0, H, BH, CARRY)
        b_o = _load_carried(GATES + 3 * H, o_row, SG, o_j, m_row, m_j, j0, H, BH, CARRY)
    b_c = tl.load(C_ALL + o_row[:, None] * SY + o_j[None, :], mask=m_live, other=0.0)
    p_cp, o_prow = _prev_rows(C0, C_ALL, o_b, o_t, o_dir, s, B, H, SY)
    b_cp = tl.load(p_cp + o_prow[:, None] + o_j[None, :], mask=m_live, other=0.0)
    b_dy = _load_carried(DY, o_row, SY, o_j, m_row, m_j, j0, H, BH, CARRY)
    return b_i, b_f, b_g, b_o, b_c, b_cp, b_dy


@triton.jit
def _gate_bias(p, p2, o_j, m_j, TWO: tl.constexpr):
    """One gate's bias of this program's units, [1, BH] float32: p's, plus p2's when TWO, each loaded in its own
    dtype and added in float32 (as b_ih.float() + b_hh was before the launch)."""
    b = tl.load(p + o_j, mask=m_j, other=0.0).to(tl.float32)
    if TWO:
        b += tl.load(p2 + o_j, mask=m_j, other=0.0).to(tl.float32)
    return b[None, :]


@triton.jit
def _cell_grads(b_dh, b_dc, b_i, b_f, b_g, b_o, b_c, b_cp, m_live):
    """One step of the cell's backward on a tile: from the whole dh_t and the dc carried in, the gradients of the
    four gate pre-activations and dc_t (zero where a row is not live)."""
    b_tc = 2.0 * _sigmoid(2.0 * b_c) - 1.0
    b_do = b_dh * b_tc
    b_dc += b_dh * b_o * (1.0 - b_tc * b_tc)
    b_dc = tl.where(m_live, b_dc, 0.0)
    return (b_dc * b_g * b_i * (1.0 - b_i), b_dc * b_cp * b_f * (1.0 - b_f), b_dc * b_i * (1.0 - b_g * b_g),
            b_do * b_o * (1.0 - b_o), b_dc)


# A released barrier counter: above every target a launch waits for (_run splits longer launches).
RELEASED: tl.constexpr = tl.constexpr(1 << 30)
# HALF_W: h_{t-1} (within +-1) times this is within float16's range, its small values clear of the subnormals.
REC_MUL: tl.constexpr = tl.constexpr(16384.0)


@triton.jit
def _grid_barrier(p_flag, p_count, target, max_spin, p_host=None):
    """Waits until the counter reaches target; returns True if the barrier failed (now, or in an earlier launch:
    the flag is sticky until the host reads it).

    The loop's exit depends only on values every thread of the program shares: the count (a scalar atomic, which
    Triton runs in one thread and broadcasts through shared memory, with a CTA barrier) and the spin count. A
    flag polled by each thread on its own can read differently in different warps; warps then leave the loop at
    different polls and every CTA barrier after it pairs the wrong arrivals (on an H100 some outputs of a failed
    launch came out finite and unpoisoned: perf/NOTES.md, v0.14). So the program that gives up releases the
    others through the counter itself, and the flag is read once, after the loop."""
    # bar.sync orders this program's stores before the release; the acquire orders the loads after it. The
    # arrival's own result is the first poll: the last program to arrive goes on without another round trip.
    tl.debug_barrier()
    seen = tl.atomic_add(p_count, 1, sem="acq_rel", scope="gpu") + 1
    return _grid_wait(p_flag, p_count, target, max_spin, seen, p_host)


@triton.jit
def _grid_arrive(p_count):
    """_grid_barrier's arrival alone (ARRIVE_EARLY): bar.sync orders this program's stores so far before the
    release; the count is not read here (a reduction, nothing comes back), so the program goes on (_grid_wait polls
    it)."""
    tl.debug_barrier()
    tl.atomic_add(p_count, 1, sem="release", scope="gpu")


@triton.jit
def _grid_wait(p_flag, p_count, target, max_spin, seen, p_host=None):
    """_grid_barrier's wait: polls the counter (`seen`: a count already read) until it reaches target; returns True
    if the barrier failed. A program that gives up also sets p_host, the host's copy of the flag (BarrierErrors)."""
    spins = 0
    while seen < target:
        seen = tl.atomic_add(p_count, 0, sem="acquire", scope="gpu")
        spins += 1
        if spins > max_spin:
            # Bounded: a program that never arrives must surface as an error, not a hung process. The flag is
            # set before the counter releases the waiters, who then read it. A max, not an add: every waiter
            # gives up at about the same poll, and n adds of 2^30 would wrap the int32 count (4 of them back to
            # where it was), sending the released programs into another max_spin wait at each later barrier.
            # The launcher keeps every target below RELEASED, so this one write releases the rest of the launch.
            tl.atomic_xchg(p_flag, 1, sem="release", scope="gpu")
            tl.atomic_max(p_count, RELEASED, sem="release", scope="gpu")
            if p_host is not None:
                tl.store(p_host, 1)
            seen = target
    tl.debug_barrier()
    return tl.load(p_flag, volatile=True) != 0


@triton.jit
def _ptx_op(x, OP: tl.constexpr):
    """x, after the PTX statement `OP`, which has no result of its own (a barrier, a fence; the interpreter skips
    it): x is a result for the asm to stay in place by."""
    if FENCES:
        x = tl.inline_asm_elementwise(OP + ";\n\tmov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=False,
                                      pack=1)
    return x


@triton.jit
def _cluster_barrier(x):
    """Hopper's cluster barrier, for programs launched as one thread-block cluster (LSTMConfig.exchange "cluster",
    launched by _launch_as_cluster): every thread arrives, releasing its stores at cluster scope, and waits,
    acquiring the other CTAs'. Nothing in memory, no polls, and it cannot fail: the hardware schedules a cluster's
    CTAs together. Returns x."""
    return _ptx_op(x, "barrier.cluster.arrive.release;\n\tbarrier.cluster.wait.acquire")


@triton.jit
def _cluster_arrive(x):
    """_cluster_barrier's first half (ARRIVE_EARLY): this thread arrives, releasing its stores (and ordering its
    loads) so far at cluster scope, and goes on without waiting. Exactly one _cluster_wait must follow before the
    next arrive."""
    return _ptx_op(x, "barrier.cluster.arrive.release")


@triton.jit
def _cluster_wait(x):
    """_cluster_barrier's second half: waits until every thread of the cluster has arrived, acquiring their
    released stores."""
    return _ptx_op(x, "barrier.cluster.wait.acquire")


# Exchange through the cluster's shared memory by bulk copies (BULK, perf/NOTES.md v0.69; a forward cluster launch of
# 16-bit one-chunk transposed tiles, one batch tile a program; off until a GPU has run it: TRITONLSTM_BULK_H=1).
# No barrier a step. Each program keeps two slots of the whole h [P, BB, BH] (producer-major: a producer's tile is
# one contiguous block) and two mbarriers in shared memory it requests beyond the kernel's own (_launch_as_cluster),
# at the end of the dynamic shared memory: every address is global_smem + %dynamic_smem_size + a negative offset
# (`rel`). h of production m (0: the launch's first h_{t-1}, read from memory; u + 1: local step u's output) goes
# into slot m % 2: its producer writes its [BB, BH] tile into a staging block of its own, then copies it into slot
# m % 2 of every program of the cluster with one cp.async.bulk each, which counts its bytes against that program's
# mbarrier m % 2. Step u waits for mbarrier u % 2 (phase u // 2) and reads its slot (_bulk_read); then mbarrier
# u % 2 is armed again (expect_tx, a step's bytes) for production u + 2. Two slots suffice: a producer writes
# production m + 2 into slot m % 2 only after it has received every program's production m + 1, which each sent
# after reading production m. Bytes may arrive before their phase is armed (the tx-count goes below zero; the
# phase cannot complete before the arrival of its arm). The launch ends with a cluster barrier, so that no program
# leaves while a copy into or out of its shared memory is in flight (every production sent is read in the launch).
_BULK_BASE = "mov.u32 %b, global_smem;\n\tmov.u32 %n, %dynamic_smem_size;\n\tadd.u32 %b, %b, %n;\n\t"
# $1: x; $2: rel of the mbarriers; $3: a step's bytes; $4: 1 to arm mbarrier 1 too (a second step in the launch). A
# cluster barrier must follow before any copy (the fence makes the initialisation visible to it).
BULK_INIT = tl.constexpr(
    "{\n\t.reg .b32 %b, %n, %t;\n\t.reg .b64 %st;\n\t.reg .pred %p, %q;\n\t" + _BULK_BASE
    + "add.u32 %b, %b, $2;\n\tmov.u32 %t, %tid.x;\n\tsetp.eq.u32 %p, %t, 0;\n\tsetp.ne.and.u32 %q, $4, 0, %p;\n\t"
    "@%p mbarrier.init.shared::cta.b64 [%b], 1;\n\t@%p mbarrier.init.shared::cta.b64 [%b+8], 1;\n\t"
    "@%p fence.mbarrier_init.release.cluster;\n\t"
    "@%p mbarrier.arrive.expect_tx.shared::cta.b64 %st, [%b], $3;\n\t"
    "@%q mbarrier.arrive.expect_tx.shared::cta.b64 %st, [%b+8], $3;\n\tmov.b32 $0, $1;\n\t}")
# $1: rel of the mbarrier; $2: the phase's parity; $3: how long to wait, in microseconds. $0: 1 if it gave up. Each
# poll suspends the thread until the phase completes or the hardware's own time limit passes, which PTX leaves
# unspecified: so the bound is the global timer's (read only once a poll has come back without the phase), not a
# count of polls, whose length could make a count of them a wait of minutes. A time hint compiles to a NANOSLEEP
# between polls, which could hold a wait past its phase's completion: none. Acquire at CTA scope, as CUTLASS's
# multicast pipelines wait for other CTAs' copies into their shared memory (.cluster adds an L1 invalidation a step).
BULK_WAIT = tl.constexpr(
    "{\n\t.reg .b32 %b, %n, %i;\n\t.reg .b64 %now, %end;\n\t.reg .pred %done, %more, %first;\n\t" + _BULK_BASE
    + "add.u32 %b, %b, $1;\n\tmov.u32 %i, 0;\n\tmov.b32 $0, 0;\n\t"
    "BULK_POLL:\n\tmbarrier.try_wait.parity.shared::cta.b64 %done, [%b], $2;\n\t@%done bra BULK_DONE;\n\t"
    "mov.u64 %now, %globaltimer;\n\tsetp.eq.u32 %first, %i, 0;\n\tmov.u32 %i, 1;\n\t"
    "@%first mul.wide.u32 %end, $3, 1000;\n\t@%first add.u64 %end, %end, %now;\n\t"
    "setp.lt.u64 %more, %now, %end;\n\t@%more bra BULK_POLL;\n\tmov.b32 $0, 1;\n\tBULK_DONE:\n\t}")
# pack = 8: $0-$3 the 8 16-bit values, $4-$11 their bytes in the slot (negative: a unit past H, read as 0), $12
# (-$19) the slot's rel. All 1 bits (NaN) unless the 8 span 16 bytes of one producer's block (the first and the last
# checked, on the step's path: a layout that gave a thread anything else would fail loudly).
BULK_READ = tl.constexpr(
    "{\n\t.reg .b32 %b, %n, %c;\n\t.reg .pred %p, %q;\n\tsetp.ge.s32 %p, $4, 0;\n\tsetp.lt.s32 %q, $4, 0;\n\t"
    "add.s32 %c, $4, 14;\n\tsetp.eq.and.s32 %p, $11, %c, %p;\n\t"
    "mov.b32 $0, -1;\n\tmov.b32 $1, -1;\n\tmov.b32 $2, -1;\n\tmov.b32 $3, -1;\n\t"
    "@%q mov.b32 $0, 0;\n\t@%q mov.b32 $1, 0;\n\t@%q mov.b32 $2, 0;\n\t@%q mov.b32 $3, 0;\n\t" + _BULK_BASE
    + "add.u32 %b, %b, $12;\n\tadd.u32 %b, %b, $4;\n\t@%p ld.shared.v4.b32 {$0, $1, $2, $3}, [%b];\n\t}")
BULK_READ_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 16))
# $1: a 16-bit value; $2: its byte in the staging block; $3: the block's rel.
BULK_PUT = tl.constexpr("{\n\t.reg .b32 %b, %n;\n\t" + _BULK_BASE + "add.u32 %b, %b, $3;\n\tadd.u32 %b, %b, $2;\n\t"
                        "st.shared.b16 [%b], $1;\n\tmov.b32 $0, 0;\n\t}")
# $1: x; $2: rel of the block in the destinations' slot; $3: rel of the staging block; $4: rel of the destinations'
# mbarrier; $5: rel of this program's mbarrier to arm; $6: the destinations (ranks 0 .. $6 - 1; 0: none); $7: the
# bytes to arm it with (0: none); $8: the block's bytes. Thread r * (threads / 16) copies to rank r: a copy's
# operands must be uniform, so ptxas issues a warp's copies one after another; spread, each warp issues a quarter
# (4 warps) or fewer.
BULK_SEND = tl.constexpr(
    "{\n\t.reg .b32 %b, %n, %t, %r, %a, %d, %m;\n\t.reg .b64 %st;\n\t.reg .pred %p, %q;\n\t" + _BULK_BASE
    + "mov.u32 %t, %tid.x;\n\tsetp.eq.u32 %q, %t, 0;\n\tsetp.ne.and.u32 %q, $7, 0, %q;\n\tadd.u32 %a, %b, $5;\n\t"
    "@%q mbarrier.arrive.expect_tx.shared::cta.b64 %st, [%a], $7;\n\t"
    "mov.u32 %n, %ntid.x;\n\tshr.u32 %n, %n, 4;\n\tdiv.u32 %r, %t, %n;\n\trem.u32 %n, %t, %n;\n\t"
    "setp.lt.u32 %p, %r, $6;\n\tsetp.eq.and.u32 %p, %n, 0, %p;\n\t"
    "add.u32 %a, %b, $2;\n\tadd.u32 %m, %b, $4;\n\tadd.u32 %b, %b, $3;\n\t"
    "@%p mapa.shared::cluster.u32 %d, %a, %r;\n\t@%p mapa.shared::cluster.u32 %m, %m, %r;\n\t"
    "@%p cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%d], [%b], $8, [%m];\n\t"
    "mov.b32 $0, $1;\n\t}")


@triton.jit
def _bulk_rel(off, EXTRA: tl.constexpr):
    """The rel of byte `off` of the BULK region (EXTRA bytes at the end of the dynamic shared memory)."""
    return off - EXTRA


# On the interpreter (no shared memory between programs, no inline PTX) each program's region lives in RING, at the
# same byte offsets from its end, followed by its two mbarriers as words (a lock, the phases completed, the pending
# arrivals, the tx-count), which _ring_mbarrier updates as the hardware does: tests/test_concurrent_programs.py runs
# the protocol with the programs at once.
@triton.jit
def _ring_end(rank, EXTRA: tl.constexpr):
    """The byte in RING where the region of program `rank` of this program's cluster ends (its mbarriers follow)."""
    cluster = tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)
    return (cluster * tl.num_programs(0) + rank) * (EXTRA + 32) + EXTRA


@triton.jit
def _ring_mbarrier(RING, end, k, arrivals, tx):
    """mbarrier k of the region ending at byte `end` of RING: `arrivals` arrive and the tx-count grows by tx (a
    copy's complete_tx: -bytes); the phase completes when nothing is pending and the tx-count is 0."""
    p = RING + end // 4 + 4 * k
    while tl.atomic_cas(p, 0, 1) != 0:
        pass
    pending = tl.load(p + 2, volatile=True) - arrivals
    count = tl.load(p + 3, volatile=True) + tx
    if (pending == 0) & (count == 0):
        pending = 1
        tl.atomic_add(p + 1, 1)
    tl.store(p + 2, pending)
    tl.store(p + 3, count)
    tl.atomic_xchg(p, 0)


@triton.jit
def _ring_quiet(RING, EXTRA: tl.constexpr):
    """At a launch's end (after its closing barrier), on the interpreter: every copy into this program was counted by
    a phase it waited for, or (True) the launch's error. A tx-count below zero is a copy nobody waits for, which on
    the GPU could still be in flight when its destination leaves."""
    end = _ring_end(tl.program_id(0), EXTRA)
    return (tl.load(RING + end // 4 + 3, volatile=True) < 0) | (tl.load(RING + end // 4 + 7, volatile=True) < 0)


@triton.jit
def _proxy_fence(x):
    """fence.proxy.async.shared::cta: orders this thread's shared-memory accesses with the async proxy's (the bulk
    copies'). Returns x."""
    return _ptx_op(x, "fence.proxy.async.shared::cta")


@triton.jit
def _bulk_init(RING, step_bytes, two, MBAR: tl.constexpr, EXTRA: tl.constexpr):
    """Initialises the two mbarriers (one arrival a phase) and arms mbarrier 0 (and 1 when `two`) for a step's
    bytes. The cluster barrier that must follow, before any copy, is the caller's."""
    if FENCES:
        tl.inline_asm_elementwise(BULK_INIT, "=r,r,r,r,r", [step_bytes, _bulk_rel(MBAR, EXTRA), step_bytes, two],
                                  dtype=tl.int32, is_pure=False, pack=1)
    else:
        end = _ring_end(tl.program_id(0), EXTRA)
        for k in tl.static_range(2):
            tl.store(RING + end // 4 + 4 * k + 2, 1)
        _ring_mbarrier(RING, end, 0, 1, step_bytes)
        if two != 0:
            _ring_mbarrier(RING, end, 1, 1, step_bytes)


@triton.jit
def _bulk_put(RING, b_h, o_bytes, rel, EXTRA: tl.constexpr):
    """b_h (16-bit) into the staging block at rel, value (b, j) at byte o_bytes[b, j], between proxy fences: after
    the copies that read the block two productions ago (their completion is known only through the other programs'
    copies since), before the copy of this one (once a CTA barrier has ordered every thread's stores)."""
    bits = b_h.to(tl.int16, bitcast=True)
    if FENCES:
        _proxy_fence(rel)
        tl.inline_asm_elementwise(BULK_PUT, "=r,h,r,r", [bits, o_bytes, o_bytes * 0 + rel], dtype=tl.int32,
                                  is_pure=False, pack=1)
        _proxy_fence(rel)
    else:
        tl.store(RING.to(tl.pointer_type(tl.int16)) + (_ring_end(tl.program_id(0), EXTRA) + rel + o_bytes) // 2, bits)


@triton.jit
def _bulk_send(RING, x, rel_dst, rel_src, k_dst, k_arm, n_dest, arm_bytes, STG: tl.constexpr, MBAR: tl.constexpr,
               EXTRA: tl.constexpr):
    """Arms this program's mbarrier k_arm for arm_bytes (none if 0), then copies the staging block at rel_src (STG
    bytes) to rel_dst of programs 0 .. n_dest - 1 of the cluster, each counted against their mbarrier k_dst."""
    if FENCES:
        x = tl.inline_asm_elementwise(BULK_SEND, "=r,r,r,r,r,r,r,r,r",
                                      [x, rel_dst, rel_src, _bulk_rel(MBAR + 8 * k_dst, EXTRA),
                                       _bulk_rel(MBAR + 8 * k_arm, EXTRA), n_dest, arm_bytes, STG],
                                      dtype=tl.int32, is_pure=False, pack=1)
    else:
        if arm_bytes != 0:
            _ring_mbarrier(RING, _ring_end(tl.program_id(0), EXTRA), k_arm, 1, arm_bytes)
        p16 = RING.to(tl.pointer_type(tl.int16))
        o = tl.arange(0, STG // 2)
        block = tl.load(p16 + (_ring_end(tl.program_id(0), EXTRA) + rel_src) // 2 + o)
        for d in range(0, n_dest):
            tl.store(p16 + (_ring_end(d, EXTRA) + rel_dst) // 2 + o, block)
            _ring_mbarrier(RING, _ring_end(d, EXTRA), k_dst, 0, -STG)
    return x


@triton.jit
def _bulk_read(RING, codes, rel, DT: tl.constexpr, EXTRA: tl.constexpr):
    """h [BB, BK] (DT) out of the slot at rel, unit (b, k) at byte codes[b, k] (negative: 0)."""
    if FENCES:
        x = tl.inline_asm_elementwise(BULK_READ, BULK_READ_CONSTRAINTS, [codes, codes * 0 + rel], dtype=tl.int16,
                                      is_pure=False, pack=8)
    else:
        x = tl.load(RING.to(tl.pointer_type(tl.int16)) + (_ring_end(tl.program_id(0), EXTRA) + rel + codes) // 2,
                    mask=codes >= 0, other=0, volatile=True)
    return x.to(DT, bitcast=True)


@triton.jit
def _bulk_wait(RING, k, parity, max_spin, MBAR: tl.constexpr, EXTRA: tl.constexpr):
    """Waits for the phase of parity `parity` of mbarrier k (done once the current phase's parity differs, as the
    hardware's try_wait.parity); returns 1 if it gave up (a protocol that lost a copy would otherwise hang): on the
    GPU after max_spin / 2 microseconds (8.4 s at the default 2^24, about the counter barrier's max_spin polls of
    L2), after one poll when max_spin is 0; on the interpreter after max_spin / 256 + 1 polls."""
    if FENCES:
        gave_up = tl.inline_asm_elementwise(BULK_WAIT, "=r,r,r,r", [_bulk_rel(MBAR + 8 * k, EXTRA), parity,
                                                                   max_spin // 2], dtype=tl.int32, is_pure=False,
                                            pack=1)
    else:
        p = RING + _ring_end(tl.program_id(0), EXTRA) // 4 + 4 * k + 1
        polls = max_spin // 256 + 1
        spins = 0
        while (tl.atomic_add(p, 0) % 2 == parity) & (spins < polls):
            spins += 1
        gave_up = (spins >= polls).to(tl.int32)
    return gave_up


@triton.jit
def _layer_counter(SYNC):
    """A single layer's barrier counter: its (direction, batch group)'s."""
    return SYNC + tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)


@triton.jit
def _step_arrive(SYNC, s_glob, CLUSTER: tl.constexpr):
    """A single layer's arrival at the barrier that ends global step s_glob (ARRIVE_EARLY): the cluster's, or the
    counter's. Exactly one _step_wait follows, at the step's end."""
    if CLUSTER:
        _cluster_arrive(s_glob)
    else:
        _grid_arrive(_layer_counter(SYNC))


@triton.jit
def _step_wait(SYNC, ERR, ERR_HOST, s_glob, S_START, max_spin, CLUSTER: tl.constexpr):
    """_step_arrive's wait; returns True if the barrier failed."""
    if CLUSTER:
        return _cluster_wait(s_glob) < 0
    else:
        p_count = _layer_counter(SYNC)
        return _grid_wait(ERR, p_count, (s_glob - S_START + 1) * tl.num_programs(0), max_spin,
                          tl.atomic_add(p_count, 0, sem="acquire", scope="gpu"), ERR_HOST)


@triton.jit
def _step_barrier(SYNC, ERR, ERR_HOST, s_glob, S_START, failed, max_spin, STACK: tl.constexpr,
                  CLUSTER: tl.constexpr = False):
    """The barrier that ends global step s_glob of a persistent launch, among the programs of one (direction,
    batch group), or of one batch group across all layers of a STACK (axis 2): the counter's (_grid_barrier) or
    the cluster's (_cluster_barrier; a single layer's P programs along axis 0 form the cluster). Returns True if
    it failed."""
    if CLUSTER:
        return failed | (_cluster_barrier(s_glob) < 0)
    if STACK:
        p_count = SYNC + tl.program_id(1)
        n = tl.num_programs(0) * tl.num_programs(2)
    else:
        p_count = _layer_counter(SYNC)
        n = tl.num_programs(0)
    return _grid_barrier(ERR, p_count, (s_glob - S_START + 1) * n, max_spin, ERR_HOST)


# ----------------------------------------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T", "B", "rev0", "S_START", "S_COUNT", "max_spin"])
def lstm_fwd_kernel(
    GX,  # [T, B, D*4H] x @ W_ih^T
    GATES,  # [T, B, D*4H] out: the activated gates i, f, g, o for the backward (when STORE_GATES)
    W,  # [D, 4H, H] W_hh ([L, 4H, H] when STACK)
    W_IH,  # [L-1, 4H, H] W_ih of the layers above the first (when STACK)
    DROP,  # [L-1, T, B, H] dropout scale (0 or 1/(1-p)) of each layer's output but the last (when HAS_DROPOUT)
    XD,  # [L-1, T, B, H] out: those outputs after dropout, the next layer's input (when HAS_DROPOUT)
    BIAS,  # [D, 4H] b_ih (or b_ih + b_hh, or the one bias given), any float dtype
    BIAS_HH,  # [D, 4H] b_hh, added to BIAS in float32 (when TWO_BIASES)
    H0,  # [D, B, H] initial hidden state
    C_WS,  # [D, B, H] float32 cell state carried between steps; holds c0 on entry
    Y,  # [T, B, D*H] output, h_t
    HN,  # [D, B, H] h at each row's last step
    CN,  # [D, B, H] c at each row's last step
    C_ALL,  # [T, B, D*H] float32 c_t for the backward (when STORE_GATES)
    LAST,  # [B] int32 last live step of each row (when HAS_LENGTHS)
    SYNC,  # [D*Q] int32 barrier counters, one per (direction, batch group); zeros on entry
    ERR,  # [1] int32 the device's sticky barrier-error flag
    ERR_HOST,  # [1] int32 the host's copy of the flag, set by a program that gives up (BarrierErrors.flags)
    WSCALE,  # [D or L, 5] float32 the scales of HALF_W's float16 operands (_half_weights)
    HB,  # [2, D, B, H] float16 h_t * REC_MUL at step t's parity, h0 times its scale at slot 1 (when HALF_H)
    CODES,  # [BB, BK] int16 (when BULK): the byte of row b's unit k in a slot (bulk_codes; -1: none)
    RING,  # int32 (when BULK on the interpreter): every program's BULK region and mbarriers (_ring_end)
    T,
    B,
    H,
    rev0,  # 1: a D = 1 launch runs in reverse
    S_START,
    S_COUNT,
    max_spin,
    BK: tl.constexpr,  # K chunk of the recurrent matmul; W_RESIDENT means one chunk covers H
    BH: tl.constexpr,
    BB: tl.constexpr,
    D: tl.constexpr,
    W_RESIDENT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    TWO_BIASES: tl.constexpr,  # HAS_BIAS: BIAS + BIAS_HH (nn.LSTM's two, summed here: no launch to sum them first)
    HAS_LENGTHS: tl.constexpr,
    STACK: tl.constexpr,  # axis 2 is the layer of a unidirectional stack run as a wavefront (D = 1)
    HAS_DROPOUT: tl.constexpr,  # dropout between the layers of a STACK
    STORE_GATES: tl.constexpr,
    PERSISTENT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SK: tl.constexpr,  # split-K ways of the recurrent dots (_gate_dots)
    MERGED: tl.constexpr,  # the four gate dots as one (_merged_gate_dots); single layer, barrier, unsplit
    TRANSPOSED: tl.constexpr,  # the gate dots as W^T @ h^T (_transposed_gate_dots); barrier, unsplit
    KC: tl.constexpr,  # TRANSPOSED: K chunk of the dot
    CLUSTER: tl.constexpr,  # the barrier as Hopper's cluster barrier (_cluster_barrier); single layer, P <= 8 or 16
    PREFETCH: tl.constexpr,  # one batch tile per program, single layer, barrier: next step's gx before the wait
    HALF_W: tl.constexpr,  # TRANSPOSED, float32: W (and W_IH) in float16, scaled; the dots on float16 operands
    HALF_H: tl.constexpr = False,  # HALF_W, single layer: h_{t-1} read from HB, as its producer rounded it
    CARRY: tl.constexpr = 0,  # PREFETCH: how the next step's gx crosses the barrier (_load_carried)
    ARRIVE_EARLY: tl.constexpr = False,  # PREFETCH, a tile a program: arrive after y's store, wait at the step's end
    BULK: tl.constexpr = False,  # h_{t-1} through the cluster's shared memory by bulk copies, no barrier (above)
):
    tl.static_assert(not ARRIVE_EARLY or (PREFETCH and PERSISTENT), "early arrival: a prefetching launch")
    tl.static_assert(not BULK or (CLUSTER and PREFETCH and TRANSPOSED and W_RESIDENT and KC == BK and not HALF_W
                                  and not STACK and not ARRIVE_EARLY and BH % 8 == 0),
                     "bulk exchange: a cluster's prefetching one-chunk transposed 16-bit tiles")
    tl.static_assert(not HALF_W or TRANSPOSED, "float16 weights: transposed dots only")
    tl.static_assert(not HALF_H or (HALF_W and not STACK), "float16 h exchange: a single layer's float16 dots")
    tl.static_assert(not (PREFETCH and STACK), "prefetch: single layer")
    tl.static_assert(not (MERGED and (STACK or SK > 1)), "merged gates: single layer, unsplit")
    tl.static_assert(not (TRANSPOSED and (MERGED or SK > 1)), "transposed dots: unsplit")
    i_h = tl.program_id(0)
    i_q = tl.program_id(1)
    i_d = tl.program_id(2)
    n_q = tl.num_programs(1)
    n_tiles = (B + BB - 1) // BB
    if STACK:
        rev = rev0 == 1  # a stack runs forwards (rev0 = 0)
        # Layer i_l of a wavefront: at global step s it runs its own step s - i_l, reading the layer below's
        # output of that step (written one global step earlier). Y is [L, T, B, H]; so are GATES and C_ALL.
        i_l = i_d
        has_next = i_l < tl.num_programs(2) - 1
        if HAS_DROPOUT:
            # Layer l writes its output after dropout to XD[l]; layer l + 1 reads its input there.
            X = XD + (i_l.to(tl.int64) - 1) * T * B * H
            XD += i_l.to(tl.int64) * T * B * H
            DROP += i_l.to(tl.int64) * T * B * H
        else:
            X = Y + (i_l.to(tl.int64) - 1) * T * B * H
        Y += i_l.to(tl.int64) * T * B * H
        GATES += i_l.to(tl.int64) * T * B * 4 * H
        C_ALL += i_l.to(tl.int64) * T * B * H
        W_IH += (i_l - 1) * 4 * H * H
    else:
        rev = (i_d + rev0) == 1
        # Direction i_d's slice of every buffer; rows of the [T, B, D*X] buffers are D*X apart.
        i_l = 0
        GX += i_d * 4 * H
        GATES += i_d * 4 * H
        Y += i_d * H
        C_ALL += i_d * H
    W += i_d * 4 * H * H
    BIAS += i_d * 4 * H
    BIAS_HH += i_d * 4 * H
    H0 += i_d * B * H
    C_WS += i_d * B * H
    HN += i_d * B * H
    CN += i_d * B * H
    SG = D * 4 * H
    SY = D * H
    HB += i_d * B * H
    HB_SLOT = D * B * H

    o_j = i_h * BH + tl.arange(0, BH)
    m_j = o_j < H
    o_k = tl.arange(0, BK)
    # Streamed (not W_RESIDENT): no tiles held; the dots load them per K chunk.
    b_wi, b_wf, b_wg, b_wo, b_ui, b_uf, b_ug, b_uo = None, None, None, None, None, None, None, None
    b_wm, b_um = None, None
    if W_RESIDENT:
        # Loaded once, reused for every step: tile (k, j) of gate g is W_hh[g*H + j, k].
        if MERGED:
            b_wm = _load_merged_tiles(W, o_k, o_k < H, i_h, H, BH)
        elif TRANSPOSED:
            b_wm = _load_transposed_tiles(W, i_h, i_h >= 0, H, BH, BK, KC)
        elif SK > 1:
            b_wi, b_wf, b_wg, b_wo = _load_chunk_tiles(W, 0, o_j, m_j, H, 1, H, BK, SK)
        else:
            b_wi, b_wf, b_wg, b_wo = _load_gate_tiles(W, o_k, o_j, o_k < H, m_j, H, 1, H)
        if STACK:
            if TRANSPOSED:
                b_um = _load_transposed_tiles(W_IH, i_h, i_l > 0, H, BH, BK, KC)
            elif SK > 1:
                b_ui, b_uf, b_ug, b_uo = _load_chunk_tiles(W_IH, 0, o_j, m_j & (i_l > 0), H, 1, H, BK, SK)
            else:
                b_ui, b_uf, b_ug, b_uo = _load_gate_tiles(W_IH, o_k, o_j, (o_k < H) & (i_l > 0), m_j, H, 1, H)
    if HALF_W:
        # h0 and the layer below's output (within +-max|dropout scale|) have their own scales; h_{t-1} = o *
        # tanh(c) is within +-1, so 2^14 puts it in float16's range.
        p_ws = WSCALE + (i_l if STACK else i_d) * 5
        ws_h0_mul = tl.load(p_ws)
        ws_h0_acc = tl.load(p_ws + 1)
        ws_rec_acc = tl.load(p_ws + 2)
        ws_x_mul = tl.load(p_ws + 3)
        ws_x_acc = tl.load(p_ws + 4)
    else:
        ws_h0_mul, ws_h0_acc, ws_rec_acc, ws_x_mul, ws_x_acc = 1.0, 1.0, 1.0, 1.0, 1.0
    if HAS_BIAS:
        b_bi = _gate_bias(BIAS, BIAS_HH, o_j, m_j, TWO_BIASES)
        b_bf = _gate_bias(BIAS + H, BIAS_HH + H, o_j, m_j, TWO_BIASES)
        b_bg = _gate_bias(BIAS + 2 * H, BIAS_HH + 2 * H, o_j, m_j, TWO_BIASES)
        b_bo = _gate_bias(BIAS + 3 * H, BIAS_HH + 3 * H, o_j, m_j, TWO_BIASES)

    # A failed barrier (here or in an earlier launch not yet reported) turns every later output into NaN, so
    # that the results of a failed launch cannot pass for valid before the host reports the error.
    poisoned = tl.load(ERR, volatile=True) != 0
    if PREFETCH:
        # A program's one tile: its gx rows of the next step are loaded before the barrier's wait, off the
        # step's critical path, and its c stays in registers from step to step.
        o_b0 = i_q * BB + tl.arange(0, BB)
        m_b0 = o_b0 < B
        n_gi, n_gf, n_gg, n_go = _load_step_gx(GX, LAST, o_b0, m_b0, o_j, m_j, i_h * BH, S_START, T, B, H, SG, rev,
                                               BB, BH, HAS_LENGTHS, CARRY)
        n_c = tl.load(C_WS + o_b0[:, None] * H + o_j[None, :], mask=m_b0[:, None] & m_j[None, :], other=0.0)
    if BULK:
        SLOT: tl.constexpr = BB * BK * 2
        STG: tl.constexpr = BB * BH * 2
        MBAR: tl.constexpr = 2 * SLOT + 2 * STG
        EXTRA: tl.constexpr = MBAR + 16  # bulk_bytes
        step_bytes = tl.num_programs(0) * STG
        codes = tl.load(CODES + tl.arange(0, BB)[:, None] * BK + tl.arange(0, BK)[None, :]).to(tl.int32)
        o_put = (tl.arange(0, BB)[:, None] * BH + tl.arange(0, BH)[None, :]) * 2
        _bulk_init(RING, step_bytes, (S_COUNT > 1).to(tl.int32), MBAR, EXTRA)
        _cluster_barrier(S_START)  # every program's mbarriers ready before any copy
        # Production 0: this program's units of the launch's first h_{t-1} (h0, or the previous launch's output).
        last0, o_t0, o_dir0 = _row_steps(LAST, o_b0, m_b0, S_START, T, rev, BB, HAS_LENGTHS)
        p_h0, o_h0 = _prev_rows(H0, Y, o_b0, o_t0, o_dir0, S_START, B, H, SY)
        b_h0 = tl.load(p_h0 + o_h0[:, None] + o_j[None, :],
                       mask=(m_b0 & (S_START <= last0))[:, None] & m_j[None, :], other=0.0)
        _bulk_put(RING, b_h0, o_put, _bulk_rel(2 * SLOT, EXTRA), EXTRA)
        tl.debug_barrier()
        _bulk_send(RING, S_START, _bulk_rel(i_h * STG, EXTRA), _bulk_rel(2 * SLOT, EXTRA), 0, 0, tl.num_programs(0),
                   0, STG, MBAR, EXTRA)
        failed = S_START * 0
    for s_glob in range(S_START, S_START + S_COUNT):
        s = s_glob - i_l  # this program's own step (the wavefront's lag in a stack)
        for i_b in range(i_q, n_tiles, n_q):
            o_b = i_b * BB + tl.arange(0, BB)
            m_b = o_b < B
            last, o_t, o_dir = _row_steps(LAST, o_b, m_b, s, T, rev, BB, HAS_LENGTHS)
            live = m_b & (s >= 0) & (s <= last)
            o_row = o_t * B + o_b  # row of [T*B, *] buffers
            m_live = live[:, None] & m_j[None, :]

            # Independent of the other programs: issued before the h_{t-1} loads.
            p_gx = GX + o_row[:, None] * SG + o_j[None, :]
            p_c = C_WS + o_b[:, None] * H + o_j[None, :]
            if PREFETCH:
                t_gx: tl.constexpr = GX.dtype.element_ty
                b_gi, b_gf = _widen_carried(n_gi, t_gx, BB, BH, CARRY), _widen_carried(n_gf, t_gx, BB, BH, CARRY)
                b_gg, b_go = _widen_carried(n_gg, t_gx, BB, BH, CARRY), _widen_carried(n_go, t_gx, BB, BH, CARRY)
                b_c = n_c
            elif STACK:
                if i_l == 0:
                    b_gi, b_gf, b_gg, b_go = _load_gate_rows(p_gx, m_live, H)
                else:
                    # The input projection of the layers above the first, in the loop: x_t = the layer
                    # below's h_t, which it wrote one global step ago.
                    zero = tl.zeros([BB, BH], dtype=tl.float32)
                    if TRANSPOSED:
                        b_gi, b_gf, b_gg, b_go = _transposed_gate_dots(zero, zero, zero, zero, X, o_row * H, live,
                                                                       b_um, W_IH, i_h, i_l > 0, H, BB, BH, BK, KC,
                                                                       W_RESIDENT, DOT_PRECISION, HALF_W, ws_x_mul,
                                                                       ws_x_acc)
                    else:
                        b_gi, b_gf, b_gg, b_go = _gate_dots(zero, zero, zero, zero, X, o_row * H, live, b_ui, b_uf,
                                                            b_ug, b_uo, W_IH, o_k, o_j, m_j, i_l > 0, H, BK,
                                                            W_RESIDENT, DOT_PRECISION, SK)
            else:
                b_gi, b_gf, b_gg, b_go = _load_gate_rows(p_gx, m_live, H)
            if not PREFETCH:
                b_c = tl.load(p_c, mask=m_live, other=0.0, cache_modifier=".cg")

            # h_{t-1}: the previous output row, or h0 at the first step.
            if HALF_H:
                # ... as float16, scaled (h0's slot written by _half_weights): half the bytes of float32's, and
                # straight into the dot, where the conversion in the loop cost more than the bytes it saved
                # (perf/NOTES.md v0.42, v0.63).
                o_hrow = o_b.to(tl.int64) * H
                p_hbase = HB + ((s + 1) % 2) * HB_SLOT
            else:
                p_hbase, o_hrow = _prev_rows(H0, Y, o_b, o_t, o_dir, s, B, H, SY)
            if MERGED:
                b_gi, b_gf, b_gg, b_go = _merged_gate_dots(b_gi, b_gf, b_gg, b_go, p_hbase, o_hrow, live, b_wm,
                                                           W, o_k, i_h, H, BK, BB, BH, W_RESIDENT, DOT_PRECISION)
            elif BULK:
                # Production u (h_{t-1}) in slot u % 2, once every program's copy has landed.
                u = s_glob - S_START
                # After a wait that gave up, none: a lost copy costs the launch one timeout.
                gave_up = _bulk_wait(RING, u % 2, (u // 2) % 2, tl.where(failed != 0, 0, max_spin), MBAR, EXTRA)
                failed = failed | gave_up
                poisoned = poisoned | (gave_up != 0)
                b_hx = _bulk_read(RING, codes, _bulk_rel((u % 2) * SLOT, EXTRA), GX.dtype.element_ty, EXTRA)
                acc = tl.dot(b_wm[0], tl.trans(b_hx), tl.zeros([4 * BH, BB], dtype=tl.float32),
                             input_precision=DOT_PRECISION)
                b_gi, b_gf, b_gg, b_go = _transposed_split(b_gi, b_gf, b_gg, b_go, acc, BB, BH)
            elif TRANSPOSED:
                b_gi, b_gf, b_gg, b_go = _transposed_gate_dots(b_gi, b_gf, b_gg, b_go, p_hbase, o_hrow, live,
                                                               b_wm, W, i_h, i_h >= 0, H, BB, BH, BK, KC,
                                                               W_RESIDENT, DOT_PRECISION, HALF_W,
                                                               tl.where(s == 0, ws_h0_mul, REC_MUL),
                                                               tl.where(s == 0, ws_h0_acc, ws_rec_acc), HALF_H)
            else:
                b_gi, b_gf, b_gg, b_go = _gate_dots(b_gi, b_gf, b_gg, b_go, p_hbase, o_hrow, live, b_wi, b_wf,
                                                    b_wg, b_wo, W, o_k, o_j, m_j, i_h >= 0, H, BK, W_RESIDENT,
                                                    DOT_PRECISION, SK)
            if HAS_BIAS:
                b_gi += b_bi
                b_gf += b_bf
                b_gg += b_bg
                b_go += b_bo

            b_i = _sigmoid(b_gi)
            b_f = _sigmoid(b_gf)
            b_g = 2.0 * _sigmoid(2.0 * b_gg) - 1.0
            b_o = _sigmoid(b_go)
            b_c = b_f * b_c + b_i * b_g
            b_y = b_o * (2.0 * _sigmoid(2.0 * b_c) - 1.0)
            b_c = tl.where(poisoned, float("nan"), b_c)
            b_y = tl.where(poisoned, float("nan"), b_y)

            o_bh = o_b[:, None] * H + o_j[None, :]
            if BULK:
                # Production u + 1 (h_t) to every program, if the launch reads it; mbarrier u % 2 armed for u + 2.
                p_next = (u + 1) % 2
                _bulk_put(RING, b_y.to(Y.dtype.element_ty), o_put, _bulk_rel(2 * SLOT + p_next * STG, EXTRA), EXTRA)
                tl.debug_barrier()
                _bulk_send(RING, s_glob, _bulk_rel(p_next * SLOT + i_h * STG, EXTRA),
                           _bulk_rel(2 * SLOT + p_next * STG, EXTRA), p_next, u % 2,
                           tl.where(u + 1 < S_COUNT, tl.num_programs(0), 0), tl.where(u + 2 < S_COUNT, step_bytes, 0),
                           STG, MBAR, EXTRA)
            tl.store(Y + o_row[:, None] * SY + o_j[None, :], b_y.to(Y.dtype.element_ty), mask=m_live)
            if HALF_H:
                # The slot step s - 1 read h_{t-2} from: the barrier before this step waited for those reads.
                tl.store(HB + (s % 2) * HB_SLOT + o_bh, (b_y * REC_MUL).to(tl.float16), mask=m_live)
            if ARRIVE_EARLY:
                # The other programs need nothing after this store before the barrier: the fence waits for the
                # exchange alone, and the stores below and the next step's loads go on while they arrive.
                _step_arrive(SYNC, s_glob, CLUSTER)
            if STACK:
                if HAS_DROPOUT:
                    # On the [BB, BH] output tile, where it costs no registers (on the next layer's [BB, H]
                    # input tile it spilled).
                    o_xd = o_row[:, None] * H + o_j[None, :]
                    m_xd = m_live & has_next
                    b_scale = tl.load(DROP + o_xd, mask=m_xd, other=0.0).to(tl.float32)
                    tl.store(XD + o_xd, (b_y * b_scale).to(XD.dtype.element_ty), mask=m_xd)
            tl.store(p_c, b_c, mask=m_live)
            if STORE_GATES:
                if not STACK:
                    # GATES may be GX (lstm_forward's gates_out; a stack's never is): every warp's gx loads of this
                    # tile must be done before any warp stores over them (as before the backward's dG stores).
                    tl.debug_barrier()
                p_gates = GATES + o_row[:, None] * SG + o_j[None, :]
                tl.store(p_gates, b_i.to(GATES.dtype.element_ty), mask=m_live)
                tl.store(p_gates + H, b_f.to(GATES.dtype.element_ty), mask=m_live)
                tl.store(p_gates + 2 * H, b_g.to(GATES.dtype.element_ty), mask=m_live)
                tl.store(p_gates + 3 * H, b_o.to(GATES.dtype.element_ty), mask=m_live)
                tl.store(C_ALL + o_row[:, None] * SY + o_j[None, :], b_c, mask=m_live)
            m_last = (m_b & (s == last))[:, None] & m_j[None, :]
            tl.store(HN + o_bh, b_y.to(HN.dtype.element_ty), mask=m_last)
            tl.store(CN + o_bh, b_c.to(CN.dtype.element_ty), mask=m_last)
            if PREFETCH:
                # The next step's rows (none past this launch's last step): gx is read-only to the other
                # programs' stores, and over it go only this program's own gates, of this step's rows.
                n_s = tl.where(s_glob + 1 < S_START + S_COUNT, s + 1, -1)
                n_gi, n_gf, n_gg, n_go = _load_step_gx(GX, LAST, o_b, m_b, o_j, m_j, i_h * BH, n_s, T, B, H, SG, rev,
                                                       BB, BH, HAS_LENGTHS, CARRY)
                n_c = b_c
        if ARRIVE_EARLY:
            poisoned = poisoned | _step_wait(SYNC, ERR, ERR_HOST, s_glob, S_START, max_spin, CLUSTER)
        elif PERSISTENT and not BULK:
            # A stack's barrier spans its layers: layer l's step needs layer l-1's output of the same step.
            poisoned = poisoned | _step_barrier(SYNC, ERR, ERR_HOST, s_glob, S_START, poisoned, max_spin, STACK,
                                                CLUSTER)
    if BULK:
        # No program leaves while a copy into or out of its shared memory may be in flight; a wait that gave up in
        # any thread is the launch's error.
        _cluster_barrier(S_START)
        lost = tl.max(tl.full([BB], failed, tl.int32), axis=0) != 0
        if not FENCES:
            lost = lost | _ring_quiet(RING, EXTRA)
        if lost:
            tl.atomic_xchg(ERR, 1)
            tl.store(ERR_HOST, 1)


# ----------------------------------------------------------------------------------------------------------
# Backward kernel
# ----------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T", "B", "rev0", "S_START", "S_COUNT", "max_spin"])
def lstm_bwd_kernel(
    GATES,  # [T, B, D*4H] activated gates i, f, g, o from the forward
    C_ALL,  # [T, B, D*H] float32 c_t from the forward
    C0,  # [D, B, H] float32 initial cell state
    W,  # [D, 4H, H] W_hh ([L, 4H, H] when STACK)
    W_IH,  # [L-1, 4H, H] W_ih of the layers above the first (when STACK)
    DROP,  # [L-1, T, B, H] the forward's dropout scale between layers (when HAS_DROPOUT)
    DY,  # [T, B, D*H] gradient of the output
    DHN,  # [D, B, H] gradient of h_n
    DCN,  # [D, B, H] gradient of c_n
    DG,  # [T, B, D*4H] out: gradient of the gate pre-activations (zeros on entry when HAS_LENGTHS)
    DC_WS,  # [D, B, H] float32 carried dc_{t+1} * f_{t+1}; zeros on entry
    DH0,  # [D, B, H] out
    DC0,  # [D, B, H] out
    LAST,  # [B] int32 last live step of each row (when HAS_LENGTHS)
    SYNC,  # [D*Q] int32 barrier counters, one per (direction, batch group); zeros on entry
    ERR,  # [1] int32 the device's sticky barrier-error flag
    ERR_HOST,  # [1] int32 the host's copy of the flag, set by a program that gives up (BarrierErrors.flags)
    W_T,  # [D, H, 4H] W_hh^T (when TRANSPOSED)
    PART,  # [2, D, P, B, H] float32: program p's share of dh at step r in slot r % 2 (when TRANSPOSED)
    AMAX,  # [D, H] float32 max |W_hh| of each direction's columns (when HALF_W)
    RMAX,  # [2, D, P, B] float32: program p's largest |dG| of each row of its units at step r, slot r % 2 (HALF_W)
    DBIAS,  # [BIAS_COPIES, D*4H] out: dG summed over its T*B rows, the bias gradients (when BIAS_COPIES)
    T,
    B,
    H,
    rev0,  # 1: a D = 1 launch runs in reverse
    S_START,
    S_COUNT,
    max_spin,
    BK: tl.constexpr,
    BH: tl.constexpr,
    BB: tl.constexpr,
    D: tl.constexpr,
    W_RESIDENT: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    STACK: tl.constexpr,  # axis 2 is the layer of a unidirectional stack run as a reverse wavefront (D = 1)
    HAS_DROPOUT: tl.constexpr,  # dropout between the layers of a STACK
    PERSISTENT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SK: tl.constexpr,  # split-K ways of the recurrent dots (_gate_dots)
    CLUSTER: tl.constexpr,
    PREFETCH: tl.constexpr,  # as the forward's: the next step's gates, c, c_{t-1} and dy before the wait
    TRANSPOSED: tl.constexpr,  # dh by reduce-scatter: each program's dG[:, R] @ W_hh[R, :] as W^T @ dG^T, summed
    KC: tl.constexpr,  # TRANSPOSED: rows (units) of each chunk of that product
    QP: tl.constexpr,  # TRANSPOSED: power of two >= P, the producers each program sums
    QC: tl.constexpr,  # TRANSPOSED: producers per load of that sum
    HALF_W: tl.constexpr,  # float32: dG_{t+1} @ W_hh on float16 operands, W and each row of dG scaled (v0.41)
    PAIRED: tl.constexpr = False,  # SK > 1, single layer: dG_{t+1}'s gates loaded two at a time (_split_grad_dot)
    CARRY: tl.constexpr = 0,  # PREFETCH: how the next step's gates and dy cross the barrier (_load_carried)
    ARRIVE_EARLY: tl.constexpr = False,  # as the forward's, after the exchange: the shares (TRANSPOSED), else dG
    WT_FROM_W: tl.constexpr = False,  # TRANSPOSED, W_RESIDENT: W^T's tiles read from W_hh (W_T unused)
    BIAS_COPIES: tl.constexpr = 0,  # persistent, one batch group, one layer: DBIAS in this many copies (v0.73)
):
    tl.static_assert(not ARRIVE_EARLY or (PREFETCH and PERSISTENT), "early arrival: a prefetching launch")
    tl.static_assert(not WT_FROM_W or (TRANSPOSED and W_RESIDENT), "W^T from W: reduce-scatter, W resident")
    tl.static_assert(BIAS_COPIES == 0 or (PERSISTENT and not STACK), "bias sums: one persistent launch, one layer")
    # Step r runs the forward's step s = T - 1 - r; r = T (s = -1) only finishes dh0 and dc0.
    tl.static_assert(not (TRANSPOSED and (STACK or SK > 1)), "reduce-scatter: single layer, unsplit")
    tl.static_assert(not (PREFETCH and STACK), "prefetch: single layer")
    tl.static_assert(not (HALF_W and (STACK or TRANSPOSED or not W_RESIDENT)),
                     "float16 operands: a single layer's tiles, W resident")
    i_h = tl.program_id(0)
    i_q = tl.program_id(1)
    i_d = tl.program_id(2)
    n_q = tl.num_programs(1)
    n_tiles = (B + BB - 1) // BB
    if STACK:
        # Layer i_l of a reverse wavefront lags the layer above by one step: its dh_t needs the layer above's
        # dG_t (through that layer's W_ih), written one global step earlier. GATES, DG, C_ALL and DY are
        # [L, T, B, *]; DG_UP is the layer above's dG.
        rev = rev0 == 1  # a stack runs forwards (rev0 = 0)
        i_l = i_d
        lag = tl.num_programs(2) - 1 - i_l
        has_up = lag > 0
        GATES += i_l.to(tl.int64) * T * B * 4 * H
        DG += i_l.to(tl.int64) * T * B * 4 * H
        DG_UP = DG + T.to(tl.int64) * B * 4 * H
        C_ALL += i_l.to(tl.int64) * T * B * H
        DY += i_l.to(tl.int64) * T * B * H
        W_IH += i_l * 4 * H * H
        DROP += i_l.to(tl.int64) * T * B * H
    else:
        rev = (i_d + rev0) == 1
        lag = 0
        GATES += i_d * 4 * H
        DG += i_d * 4 * H
        C_ALL += i_d * H
        DY += i_d * H
    W += i_d * 4 * H * H
    C0 += i_d * B * H
    DHN += i_d * B * H
    DCN += i_d * B * H
    DC_WS += i_d * B * H
    DH0 += i_d * B * H
    DC0 += i_d * B * H
    SG = D * 4 * H
    SY = D * H

    o_j = i_h * BH + tl.arange(0, BH)
    m_j = o_j < H
    o_k = tl.arange(0, BK)
    # Streamed (not W_RESIDENT): no tiles held; the dots load them per K chunk.
    b_wi, b_wf, b_wg, b_wo, b_ui, b_uf, b_ug, b_uo = None, None, None, None, None, None, None, None
    b_wt = None
    n_h = tl.num_programs(0)
    if TRANSPOSED:
        # Program p stores its share of every unit's dh_{t-1} (its own dG_t rows times their W_hh rows) before the
        # barrier, and after it sums the P shares of its own units: P * BB * BH float32 read per step instead of
        # dG_t's BB * 4H, and the product on a 64-row MMA (perf/NOTES.md v0.24).
        W_T += i_d * H * 4 * H
        PART += (i_d * n_h).to(tl.int64) * B * H
        if W_RESIDENT:
            if WT_FROM_W:
                b_wt = _load_transposed_grad_tiles(W, i_h, True, H, BH, BK, KC, FROM_W=True)
            else:
                b_wt = _load_transposed_grad_tiles(W_T, i_h, True, H, BH, BK, KC)
    elif W_RESIDENT:
        # dh_{t-1} = dG_t @ W_hh: tile (k, j) of gate g is W_hh[g*H + k, j].
        if SK > 1:
            b_wi, b_wf, b_wg, b_wo = _load_chunk_tiles(W, 0, o_j, m_j, H, H, 1, BK, SK)
        else:
            b_wi, b_wf, b_wg, b_wo = _load_gate_tiles(W, o_k, o_j, o_k < H, m_j, H, H, 1)
        if STACK:
            # dX_{l+1,t} = dG_{l+1,t} @ W_ih_{l+1}: tile (k, j) of gate g is W_ih_{l+1}[g*H + k, j].
            if SK > 1:
                b_ui, b_uf, b_ug, b_uo = _load_chunk_tiles(W_IH, 0, o_j, m_j & has_up, H, H, 1, BK, SK)
            else:
                b_ui, b_uf, b_ug, b_uo = _load_gate_tiles(W_IH, o_k, o_j, (o_k < H) & has_up, m_j, H, H, 1)

    k_w = 0
    if HALF_W:
        # Half the shared memory, so float32 takes 16-bit's tiles (perf/NOTES.md v0.41).
        k_w, b_wi, b_wf, b_wg, b_wo = _half_tiles(tl.load(AMAX + i_d * H + o_j, mask=m_j, other=0.0), b_wi, b_wf,
                                                  b_wg, b_wo)
        RMAX += (i_d * n_h).to(tl.int64) * B
    poisoned = tl.load(ERR, volatile=True) != 0  # as in the forward
    if PREFETCH:
        # A program's one tile: the saved tensors of its next step (read-only but for its own dG stores over
        # gates of this step's rows) are loaded before the barrier's wait, and dc stays in registers.
        o_b0 = i_q * BB + tl.arange(0, BB)
        m_b0 = o_b0 < B
        n_gi, n_gf, n_gg, n_go, n_c, n_cp, n_dy = _load_step_inputs(GATES, C_ALL, C0, DY, LAST, o_b0, m_b0, o_j, m_j,
                                                                     T - 1 - S_START, T, B, H, SG, SY, rev, BB,
                                                                     HAS_LENGTHS, CARRY, i_h * BH, BH)
        n_dc = tl.load(DC_WS + o_b0[:, None] * H + o_j[None, :], mask=m_b0[:, None] & m_j[None, :], other=0.0)
    if BIAS_COPIES:
        # This program's dG summed over its steps and rows, in registers (its batch group holds every row): the
        # bias gradients of its units without another launch or a memset (perf/NOTES.md v0.73).
        s_i = tl.zeros([BB, BH], dtype=tl.float32)
        s_f = tl.zeros([BB, BH], dtype=tl.float32)
        s_g = tl.zeros([BB, BH], dtype=tl.float32)
        s_o = tl.zeros([BB, BH], dtype=tl.float32)
    for r_glob in range(S_START, S_START + S_COUNT):
        r = r_glob - lag
        s = T - 1 - r
        # Outside its own steps 0..T (the wavefront's ramps) a layer only keeps the barrier.
        n_active = tl.where((r >= 0) & (r <= T), n_tiles, 0)
        for i_b in range(i_q, n_active, n_q):
            o_b = i_b * BB + tl.arange(0, BB)
            m_b = o_b < B
            last, o_t, o_dir = _row_steps(LAST, o_b, m_b, s, T, rev, BB, HAS_LENGTHS)
            o_tn = o_t + o_dir
            o_bh = o_b[:, None] * H + o_j[None, :]

            # Recurrent part of dh_t: dG_{t+1} @ W_hh, over all 4H gate columns.
            m_next = m_b & (s + 1 <= last)
            o_nrow = o_tn * B + o_b
            # (_gate_grad_dot computes the same, but written through it this loop spills registers in the fp16
            # stack backward at K = 512: 288 bytes, compilecheck 2026-11-26; inline it compiles without.)
            b_dh = tl.zeros([BB, BH], dtype=tl.float32)
            if TRANSPOSED:
                # The shares of step r - 1 (slot (r + 1) % 2); none before the first step.
                p_prev = PART + (((r + 1) % 2) * D * n_h).to(tl.int64) * B * H
                b_dh = _gather_partials(p_prev, n_h, o_b, m_b & (r > 0), o_j, m_j, B, H, BB, BH, QP, QC)
            elif HALF_W:
                # Each row's largest |dG_{t+1}|: the largest of the P programs' own, stored with dG (slot r - 1).
                p_rmax = RMAX + (((r + 1) % 2) * D * n_h).to(tl.int64) * B + o_b
                amax = tl.zeros([BB], dtype=tl.float32)
                for q0 in range(0, n_h, 16):
                    o_q = q0 + tl.arange(0, 16)
                    amax = tl.maximum(amax, tl.max(tl.load(p_rmax[:, None] + o_q[None, :] * B,
                                                           mask=m_next[:, None] & (o_q < n_h)[None, :], other=0.0,
                                                           cache_modifier=".cg"), axis=1))
                b_dh = _half_grad_dot(DG, o_nrow * SG, m_next, b_wi, b_wf, b_wg, b_wo, H, BK, SK, k_w, amax)
            elif SK > 1:
                b_dh = _split_grad_dot(DG, o_nrow * SG, m_next, b_wi, b_wf, b_wg, b_wo, W, o_j, m_j, True, H, BK,
                                       W_RESIDENT, DOT_PRECISION, SK, PAIRED)
            else:
                for k0 in range(0, H, BK):
                    o_kk = k0 + o_k
                    m_k = o_kk < H
                    p_dg = DG + o_nrow[:, None] * SG + o_kk[None, :]
                    m_dg = m_next[:, None] & m_k[None, :]
                    if W_RESIDENT:
                        t_i, t_f, t_g, t_o = b_wi, b_wf, b_wg, b_wo
                    else:
                        t_i, t_f, t_g, t_o = _load_gate_tiles(W + k0 * H, o_k, o_j, m_k, m_j, H, H, 1)
                    b_dh += tl.dot(tl.load(p_dg, mask=m_dg, other=0.0, cache_modifier=".cg"), t_i,
                                   input_precision=DOT_PRECISION)
                    b_dh += tl.dot(tl.load(p_dg + H, mask=m_dg, other=0.0, cache_modifier=".cg"), t_f,
                                   input_precision=DOT_PRECISION)
                    b_dh += tl.dot(tl.load(p_dg + 2 * H, mask=m_dg, other=0.0, cache_modifier=".cg"), t_g,
                                   input_precision=DOT_PRECISION)
                    b_dh += tl.dot(tl.load(p_dg + 3 * H, mask=m_dg, other=0.0, cache_modifier=".cg"), t_o,
                                   input_precision=DOT_PRECISION)
            if STACK:
                # The gradient arriving from the layer above at this step: its dG_t @ W_ih over all 4H columns.
                m_up = (m_b & (s >= 0) & (s <= last)) & has_up
                o_row_up = o_t * B + o_b
                b_up = _gate_grad_dot(tl.zeros([BB, BH], dtype=tl.float32), DG_UP, o_row_up * SG, m_up, b_ui, b_uf,
                                      b_ug, b_uo, W_IH, o_k, o_j, m_j, has_up, H, BK, W_RESIDENT, DOT_PRECISION,
                                      SK)
                if HAS_DROPOUT:
                    o_drop = o_row_up[:, None] * H + o_j[None, :]
                    b_up *= tl.load(DROP + o_drop, mask=m_up[:, None] & m_j[None, :], other=0.0).to(tl.float32)
                b_dh += b_up
            b_dh = tl.where(poisoned, float("nan"), b_dh)
            p_dc = DC_WS + o_bh
            if PREFETCH:
                b_dc = n_dc
            else:
                b_dc = tl.load(p_dc, mask=m_b[:, None] & m_j[None, :], other=0.0, cache_modifier=".cg")

            if s >= 0:
                live = m_b & (s <= last)
                m_live = live[:, None] & m_j[None, :]
                m_last = (m_b & (s == last))[:, None] & m_j[None, :]
                o_row = o_t * B + o_b
                if PREFETCH:
                    t_g: tl.constexpr = GATES.dtype.element_ty
                    b_i, b_f = _widen_carried(n_gi, t_g, BB, BH, CARRY), _widen_carried(n_gf, t_g, BB, BH, CARRY)
                    b_g, b_o = _widen_carried(n_gg, t_g, BB, BH, CARRY), _widen_carried(n_go, t_g, BB, BH, CARRY)
                    b_c, b_cp, b_dy = n_c, n_cp, _widen_carried(n_dy, DY.dtype.element_ty, BB, BH, CARRY)
                else:
                    b_i, b_f, b_g, b_o, b_c, b_cp, b_dy = _load_step_inputs(GATES, C_ALL, C0, DY, LAST, o_b, m_b, o_j,
                                                                            m_j, s, T, B, H, SG, SY, rev, BB,
                                                                            HAS_LENGTHS)
                b_dh += b_dy
                b_dh += tl.load(DHN + o_bh, mask=m_last, other=0.0).to(tl.float32)
                b_dc += tl.load(DCN + o_bh, mask=m_last, other=0.0).to(tl.float32)

                b_dgi, b_dgf, b_dgg, b_dgo, b_dc = _cell_grads(b_dh, b_dc, b_i, b_f, b_g, b_o, b_c, b_cp, m_live)
                if BIAS_COPIES:
                    s_i += tl.where(m_live, b_dgi, 0.0)
                    s_f += tl.where(m_live, b_dgf, 0.0)
                    s_g += tl.where(m_live, b_dgg, 0.0)
                    s_o += tl.where(m_live, b_dgo, 0.0)

                if TRANSPOSED:
                    # The exchange first: the shares, the only thing the other programs read of this step.
                    b_dgt = _gate_grads_transposed(b_dgi, b_dgf, b_dgg, b_dgo, m_live, DG.dtype.element_ty, BB, BH)
                    p_part = PART + ((r % 2) * D * n_h + i_h).to(tl.int64) * B * H
                    _scatter_partials(p_part, o_b, m_b, b_dgt, b_wt, W_T, i_h, H, BH, BK, KC, W_RESIDENT,
                                      DOT_PRECISION)
                    if ARRIVE_EARLY:
                        _step_arrive(SYNC, r_glob, CLUSTER)
                # DG may be GATES (lstm_backward's into_gates): every warp's loads of this tile's gates must be
                # done before any warp stores over them (in a replicated layout several warps load one element).
                tl.debug_barrier()
                p_out = DG + o_row[:, None] * SG + o_j[None, :]
                tl.store(p_out, b_dgi.to(DG.dtype.element_ty), mask=m_live)
                tl.store(p_out + H, b_dgf.to(DG.dtype.element_ty), mask=m_live)
                tl.store(p_out + 2 * H, b_dgg.to(DG.dtype.element_ty), mask=m_live)
                tl.store(p_out + 3 * H, b_dgo.to(DG.dtype.element_ty), mask=m_live)
                if HALF_W:
                    tl.store(RMAX + ((r % 2) * D * n_h + i_h).to(tl.int64) * B + o_b,
                             _row_amax(b_dgi, b_dgf, b_dgg, b_dgo, m_live), mask=m_b)
                if not TRANSPOSED:
                    if ARRIVE_EARLY:
                        # dG (and its rows' largest |dG|) is what the other programs read of this step.
                        _step_arrive(SYNC, r_glob, CLUSTER)
                # The exact c_t -> c_{t-1} path: dc_{t-1} gets dc_t * f_t.
                tl.store(p_dc, b_dc * b_f, mask=m_b[:, None] & m_j[None, :])
                if PREFETCH:
                    n_dc = b_dc * b_f
                    # The next step's (none past this launch's last step, nor before s = 0).
                    n_s = tl.where(r_glob + 1 < S_START + S_COUNT, s - 1, -1)
                    n_gi, n_gf, n_gg, n_go, n_c, n_cp, n_dy = _load_step_inputs(GATES, C_ALL, C0, DY, LAST, o_b, m_b,
                                                                                 o_j, m_j, n_s, T, B, H, SG, SY, rev,
                                                                                 BB, HAS_LENGTHS, CARRY, i_h * BH,
                                                                                 BH)
            else:
                m_out = m_b[:, None] & m_j[None, :]
                tl.store(DH0 + o_bh, b_dh.to(DH0.dtype.element_ty), mask=m_out)
                tl.store(DC0 + o_bh, b_dc.to(DC0.dtype.element_ty), mask=m_out)
                if ARRIVE_EARLY:
                    _step_arrive(SYNC, r_glob, CLUSTER)
        if ARRIVE_EARLY:
            poisoned = poisoned | _step_wait(SYNC, ERR, ERR_HOST, r_glob, S_START, max_spin, CLUSTER)
        elif PERSISTENT:
            # A stack's barrier spans its layers: a layer's step needs the layer above's dG of the same t.
            poisoned = poisoned | _step_barrier(SYNC, ERR, ERR_HOST, r_glob, S_START, poisoned, max_spin, STACK,
                                                CLUSTER)
    if BIAS_COPIES:
        p_bias = DBIAS + i_d * 4 * H + o_j
        t_b: tl.constexpr = DBIAS.dtype.element_ty
        for copy in tl.static_range(BIAS_COPIES):
            p_copy = p_bias + copy * D * 4 * H
            tl.store(p_copy, tl.where(poisoned, float("nan"), tl.sum(s_i, axis=0)).to(t_b), mask=m_j)
            tl.store(p_copy + H, tl.where(poisoned, float("nan"), tl.sum(s_f, axis=0)).to(t_b), mask=m_j)
            tl.store(p_copy + 2 * H, tl.where(poisoned, float("nan"), tl.sum(s_g, axis=0)).to(t_b), mask=m_j)
            tl.store(p_copy + 3 * H, tl.where(poisoned, float("nan"), tl.sum(s_o, axis=0)).to(t_b), mask=m_j)


@triton.jit
def _exp_below_half_max(amax):
    """The exponent k (int32, unclamped) that takes magnitudes up to amax (float32, >= 0) below 2^15, and amax's
    biased exponent e: amax < 2^(e - 126), so 2^(141 - e) does it. e is 0 for zero and subnormals, 255 for inf and
    NaN."""
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return 141 - e, e


@triton.jit
def _half_exp(amax):
    """_exp_below_half_max's k clamped to +-126, so that 2^k and 2^-k are normal float32. Zero (and float32
    subnormals) scale by 2^126 and stay below 1; inf and NaN by 2^-114, and stay what they are."""
    k, _ = _exp_below_half_max(amax)
    return tl.minimum(tl.maximum(k, -126), 126)


@triton.jit
def _half_tiles(amax, w_i, w_f, w_g, w_o):
    """A HALF_W backward's W tiles (float32, the last axis the output units) in float16, each output unit's column
    scaled by the power of two 2^k_w that takes amax (its largest magnitude over W_hh's 4H rows) below 2^15, so
    that a unit whose weights are all small keeps their precision. Returns k_w [units] and the four tiles."""
    k_w = _half_exp(amax)
    s_w = _exp2_bits(k_w)  # broadcast along the last axis, [BK, BH] or split-K's [SK, BK // SK, BH]
    return (k_w, (w_i * s_w).to(tl.float16), (w_f * s_w).to(tl.float16), (w_g * s_w).to(tl.float16),
            (w_o * s_w).to(tl.float16))


@triton.jit
def _half_dots(acc, p, m, H, w_i, w_f, w_g, w_o, scale):
    """acc + sum_g dG_g @ w_g on float16 operands: dG's four gates' columns (float32, at p, p + H, ..) times scale,
    one power of two a row (_half_exp: its largest magnitude below 2^15), rounded to float16, so the rounding is
    TF32's (11 significant bits) and nothing of a row underflows but what lies 2^29 below its largest value."""
    acc = tl.dot((tl.load(p, mask=m, other=0.0, cache_modifier=".cg") * scale).to(tl.float16), w_i, acc)
    acc = tl.dot((tl.load(p + H, mask=m, other=0.0, cache_modifier=".cg") * scale).to(tl.float16), w_f, acc)
    acc = tl.dot((tl.load(p + 2 * H, mask=m, other=0.0, cache_modifier=".cg") * scale).to(tl.float16), w_g, acc)
    return tl.dot((tl.load(p + 3 * H, mask=m, other=0.0, cache_modifier=".cg") * scale).to(tl.float16), w_o, acc)


@triton.jit
def _producers_half_dots(acc, p, m, H, w_i, w_f, w_g, w_o, k, r_max, BO: tl.constexpr):
    """_half_dots on dG as the gate phase's NB programs left it in float16 (HALF_G): program q's BO units of a row
    (r_max[:, q] their largest magnitude) scaled by its own 2^k_q, brought to the row's 2^k (k <= k_q) by 2^(k - k_q)
    in float16. Exact where the result is a normal float16, as _half_dots' rounding of dG * 2^k; below that (2^29
    under the row's largest) a second rounding, and under 2^-24 a zero, as there."""
    d = tl.minimum(tl.maximum(k[:, None] - _half_exp(r_max), -30), 0)  # (NaN's k_q may exceed a row's k)
    f = _exp2_bits(d).to(tl.float16)
    f = tl.reshape(tl.broadcast_to(f[:, :, None], (f.shape[0], f.shape[1], BO)), (f.shape[0], f.shape[1] * BO))
    acc = tl.dot(tl.load(p, mask=m, other=0.0, cache_modifier=".cg") * f, w_i, acc)
    acc = tl.dot(tl.load(p + H, mask=m, other=0.0, cache_modifier=".cg") * f, w_f, acc)
    acc = tl.dot(tl.load(p + 2 * H, mask=m, other=0.0, cache_modifier=".cg") * f, w_g, acc)
    return tl.dot(tl.load(p + 3 * H, mask=m, other=0.0, cache_modifier=".cg") * f, w_o, acc)


@triton.jit
def _half_unscale(acc, k, k_w):
    """A [rows, units] product of rows scaled by 2^k and W's columns by 2^k_w, scaled back exactly: by 2^-(k + k_w)
    in two halves, so that no partial scale leaves float32's normal range where the result does not."""
    k_all = k[:, None] + k_w[None, :]
    k_one = k_all // 2
    return acc * _exp2_bits(-k_one) * _exp2_bits(k_one - k_all)


@triton.jit
def _half_grad_dot(p_base, o_rows, m_rows, w_i, w_f, w_g, w_o, H, BK: tl.constexpr, SK: tl.constexpr, k_w, amax):
    """lstm_bwd_kernel's sum_g dG_g @ W_g[:, units] on float16 operands (HALF_W), W resident in one K chunk (BK >= H)
    as float16 tiles, their columns scaled by 2^k_w; each row of dG scaled by the power of two that takes its
    largest magnitude (amax) below 2^15 (_half_dots). SK > 1: split-K as in _split_grad_dot."""
    k = _half_exp(amax)
    if SK > 1:
        o_kx = _chunk_offsets(0, BK, SK)
        acc = _half_dots(tl.zeros([SK, o_rows.shape[0], w_i.shape[2]], dtype=tl.float32),
                         p_base + o_rows[None, :, None] + o_kx, m_rows[None, :, None] & (o_kx < H), H, w_i, w_f, w_g,
                         w_o, _exp2_bits(k)[None, :, None])
        acc = tl.sum(acc, axis=0)
    else:
        o_kx = tl.arange(0, BK)
        acc = _half_dots(tl.zeros([o_rows.shape[0], w_i.shape[1]], dtype=tl.float32),
                         p_base + o_rows[:, None] + o_kx[None, :], m_rows[:, None] & (o_kx < H)[None, :], H, w_i, w_f,
                         w_g, w_o, _exp2_bits(k)[:, None])
    return _half_unscale(acc, k, k_w)


@triton.jit
def _row_amax(b_i, b_f, b_g, b_o, m):
    """The largest magnitude of each row of the four [BB, BU] tiles where m."""
    big = tl.maximum(tl.maximum(tl.abs(b_i), tl.abs(b_f)), tl.maximum(tl.abs(b_g), tl.abs(b_o)))
    return tl.max(tl.where(m, big, 0.0), axis=1)


@triton.jit(do_not_specialize=["T", "B", "rev0", "S_START", "S_COUNT", "max_spin"])
def lstm_bwd_2d_kernel(
    GATES,  # [T, B, D*4H] activated gates i, f, g, o from the forward
    C_ALL,  # [T, B, D*H] float32 c_t from the forward
    C0,  # [D, B, H] float32 initial cell state
    W,  # [D, 4H, H] W_hh
    DY,  # [T, B, D*H] gradient of the output
    DHN,  # [D, B, H] gradient of h_n
    DCN,  # [D, B, H] gradient of c_n
    DG,  # [T, B, D*4H] out: gradient of the gate pre-activations (zeros on entry when HAS_LENGTHS; may be GATES)
    DC_WS,  # [D, B, H] float32 carried dc_{t+1} * f_{t+1}; zeros on entry
    DH0,  # [D, B, H] out
    DC0,  # [D, B, H] out
    LAST,  # [B] int32 last live step of each row (when HAS_LENGTHS)
    SYNC,  # [D*Q] int32 barrier counters, one per (direction, batch group); zeros on entry
    ERR,  # [1] int32 the device's sticky barrier-error flag
    ERR_HOST,  # [1] int32 the host's copy of the flag, set by a program that gives up (BarrierErrors.flags)
    PART,  # [D, NB, B, H] float32: block a's share of every unit's dh
    AMAX,  # [D, H] float32 max |W_hh| of each direction's columns (when HALF_W)
    RMAX,  # [D, NB, NB, B] float32: program (a, b)'s largest |dG| of each row of its units, at [b, a] (when HALF_W)
    DG16,  # [B, D*4H] float16: the latest dG, each program's units of a row times its own power of two (when HALF_G)
    T,
    B,
    H,
    rev0,  # 1: a D = 1 launch runs in reverse
    S_START,  # half-steps: 2 r + phase
    S_COUNT,
    max_spin,
    BU: tl.constexpr,  # units per block (the product's N, and its K per gate)
    NB: tl.constexpr,  # blocks a side, a power of two >= cdiv(H, BU); program (a, b) = (i_p // NB, i_p % NB)
    BB: tl.constexpr,
    D: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    PERSISTENT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CLUSTER: tl.constexpr,  # never (LSTMConfig refuses a cluster on the 2-D grid); one signature for _barrier_state
    HALF_W: tl.constexpr,  # float32: the product on float16 operands, W's block and dG's rows scaled (_half_dots)
    HALF_G: tl.constexpr = False,  # HALF_W: dG_{t+1} read in float16 from DG16, as its producers scaled it
):
    """The single-layer backward with its recurrent product on a 2-D grid (perf/NOTES.md v0.26), for large batches:
    program (a, b) keeps the block of W_hh that maps unit block a's four gate rows to unit block b. Step r runs
    in two phases, each ended by the barrier: 0, the product: partial_{a,b} = dG_{t+1}[:, gate rows of block a] @
    that block, stored as float32 block a's share of block b's units; 1, the gates: the program owns BU / NB units
    of block b, sums the NB shares of them (fixed order) into dh_t and runs the gate arithmetic of
    lstm_bwd_kernel, storing dG_t (or, at r = T, dh0 and dc0). Each program reads dG for its K block only, not
    all 4H columns, at the price of a second barrier and the shares' round trip."""
    i_p = tl.program_id(0)
    i_q = tl.program_id(1)
    i_d = tl.program_id(2)
    n_q = tl.num_programs(1)
    n_tiles = (B + BB - 1) // BB
    a = i_p // NB
    b = i_p % NB
    BO: tl.constexpr = BU // NB
    rev = (i_d + rev0) == 1
    GATES += i_d * 4 * H
    DG += i_d * 4 * H
    C_ALL += i_d * H
    DY += i_d * H
    W += i_d * 4 * H * H
    C0 += i_d * B * H
    DHN += i_d * B * H
    DCN += i_d * B * H
    DC_WS += i_d * B * H
    DH0 += i_d * B * H
    DC0 += i_d * B * H
    PART += (i_d * NB).to(tl.int64) * B * H
    RMAX += (i_d * NB * NB).to(tl.int64) * B
    DG16 += i_d * 4 * H
    SG = D * 4 * H
    SY = D * H

    # Phase 0's operands: block a's units (the K of each gate's product), block b's (its N).
    o_ka = a * BU + tl.arange(0, BU)
    m_ka = o_ka < H
    o_nb = b * BU + tl.arange(0, BU)
    m_nb = o_nb < H
    b_wi, b_wf, b_wg, b_wo = _load_gate_tiles(W, o_ka, o_nb, m_ka, m_nb, H, H, 1)
    k_w = 0
    if HALF_W:
        # Half the shared memory, so that 128-unit blocks fit at float32 (perf/NOTES.md v0.40).
        k_w, b_wi, b_wf, b_wg, b_wo = _half_tiles(tl.load(AMAX + i_d * H + o_nb, mask=m_nb, other=0.0), b_wi,
                                                  b_wf, b_wg, b_wo)
    # Phase 1's units: this program's share of block b.
    o_j = b * BU + a * BO + tl.arange(0, BO)
    m_j = o_j < H

    poisoned = tl.load(ERR, volatile=True) != 0
    for u in range(S_START, S_START + S_COUNT):
        r = u // 2
        s = T - 1 - r
        for i_b in range(i_q, n_tiles, n_q):
            o_b = i_b * BB + tl.arange(0, BB)
            m_b = o_b < B
            last, o_t, o_dir = _row_steps(LAST, o_b, m_b, s, T, rev, BB, HAS_LENGTHS)
            if u % 2 == 0:
                # dG_{t+1} of block a's gate rows (none past a row's end, nor before the first step).
                m_next = m_b & (s + 1 <= last) & (r > 0)
                p_dg = DG + ((o_t + o_dir) * B + o_b)[:, None] * SG + o_ka[None, :]
                m_dg = m_next[:, None] & m_ka[None, :]
                if HALF_W:
                    # Each row's largest |dG| over block a's units: the largest of the NB shares' own, which the
                    # gate phase stored with dG (a [BB, NB] load instead of holding the four tiles at once).
                    p_rmax = RMAX + (a * NB * B + tl.arange(0, NB) * B)[None, :] + o_b[:, None]
                    r_max = tl.load(p_rmax, mask=m_next[:, None], other=0.0, cache_modifier=".cg")
                    k = _half_exp(tl.max(r_max, axis=1))
                    if HALF_G:
                        acc = _producers_half_dots(tl.zeros([BB, BU], dtype=tl.float32),
                                                   DG16 + o_b[:, None] * SG + o_ka[None, :], m_dg, H, b_wi, b_wf,
                                                   b_wg, b_wo, k, r_max, BO)
                    else:
                        acc = _half_dots(tl.zeros([BB, BU], dtype=tl.float32), p_dg, m_dg, H, b_wi, b_wf, b_wg,
                                         b_wo, _exp2_bits(k)[:, None])
                    acc = _half_unscale(acc, k, k_w)
                else:
                    acc = tl.dot(tl.load(p_dg, mask=m_dg, other=0.0, cache_modifier=".cg"), b_wi,
                                 input_precision=DOT_PRECISION)
                    acc = tl.dot(tl.load(p_dg + H, mask=m_dg, other=0.0, cache_modifier=".cg"), b_wf, acc,
                                 input_precision=DOT_PRECISION)
                    acc = tl.dot(tl.load(p_dg + 2 * H, mask=m_dg, other=0.0, cache_modifier=".cg"), b_wg, acc,
                                 input_precision=DOT_PRECISION)
                    acc = tl.dot(tl.load(p_dg + 3 * H, mask=m_dg, other=0.0, cache_modifier=".cg"), b_wo, acc,
                                 input_precision=DOT_PRECISION)
                tl.store(PART + a.to(tl.int64) * B * H + o_b[:, None] * H + o_nb[None, :], acc,
                         mask=m_b[:, None] & m_nb[None, :])
            else:
                o_bh = o_b[:, None] * H + o_j[None, :]
                m_bh = m_b[:, None] & m_j[None, :]
                # The NB shares in a fixed order (bitwise deterministic), one load each (a [NB, BB, BO] load held
                # more registers: compile-only).
                b_dh = tl.zeros([BB, BO], dtype=tl.float32)
                for i_a in tl.static_range(NB):
                    b_dh += tl.load(PART + (B * H).to(tl.int64) * i_a + o_bh, mask=m_bh, other=0.0,
                                    cache_modifier=".cg")
                b_dh = tl.where(poisoned, float("nan"), b_dh)
                p_dc = DC_WS + o_bh
                b_dc = tl.load(p_dc, mask=m_bh, other=0.0, cache_modifier=".cg")
                if s >= 0:
                    live = m_b & (s <= last)
                    m_live = live[:, None] & m_j[None, :]
                    m_last = (m_b & (s == last))[:, None] & m_j[None, :]
                    b_i, b_f, b_g, b_o, b_c, b_cp, b_dy = _load_step_inputs(GATES, C_ALL, C0, DY, LAST, o_b, m_b, o_j,
                                                                            m_j, s, T, B, H, SG, SY, rev, BB,
                                                                            HAS_LENGTHS)
                    b_dh += b_dy
                    b_dh += tl.load(DHN + o_bh, mask=m_last, other=0.0).to(tl.float32)
                    b_dc += tl.load(DCN + o_bh, mask=m_last, other=0.0).to(tl.float32)
                    b_dgi, b_dgf, b_dgg, b_dgo, b_dc = _cell_grads(b_dh, b_dc, b_i, b_f, b_g, b_o, b_c, b_cp,
                                                                   m_live)
                    # DG may be GATES: every warp's loads of this tile's gates before any warp stores over them.
                    tl.debug_barrier()
                    p_out = DG + (o_t * B + o_b)[:, None] * SG + o_j[None, :]
                    tl.store(p_out, b_dgi.to(DG.dtype.element_ty), mask=m_live)
                    tl.store(p_out + H, b_dgf.to(DG.dtype.element_ty), mask=m_live)
                    tl.store(p_out + 2 * H, b_dgg.to(DG.dtype.element_ty), mask=m_live)
                    tl.store(p_out + 3 * H, b_dgo.to(DG.dtype.element_ty), mask=m_live)
                    tl.store(p_dc, b_dc * b_f, mask=m_bh)
                    if HALF_W:
                        r_own = _row_amax(b_dgi, b_dgf, b_dgg, b_dgo, m_live)
                        tl.store(RMAX + (b * NB + a) * B + o_b, r_own, mask=m_b)
                        if HALF_G:
                            # In float16 for the next product phase, each row times this program's own power of
                            # two (the row's over every unit is known only after the barrier).
                            s_own = _exp2_bits(_half_exp(r_own))[:, None]
                            p_16 = DG16 + o_b[:, None] * SG + o_j[None, :]
                            tl.store(p_16, (b_dgi * s_own).to(tl.float16), mask=m_live)
                            tl.store(p_16 + H, (b_dgf * s_own).to(tl.float16), mask=m_live)
                            tl.store(p_16 + 2 * H, (b_dgg * s_own).to(tl.float16), mask=m_live)
                            tl.store(p_16 + 3 * H, (b_dgo * s_own).to(tl.float16), mask=m_live)
                else:
                    tl.store(DH0 + o_bh, b_dh.to(DH0.dtype.element_ty), mask=m_bh)
                    tl.store(DC0 + o_bh, b_dc.to(DC0.dtype.element_ty), mask=m_bh)
        if PERSISTENT:
            poisoned = poisoned | _step_barrier(SYNC, ERR, ERR_HOST, u, S_START, poisoned, max_spin, False)


if interpreting():
    # Without it, bf16 on the interpreter gives wrong answers silently (kernels/interpreter.py says why).
    from tritonlstm.kernels.interpreter import fix_bf16

    fix_bf16()


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


# PyTorch's per-operator precision API (2.9 and later), looked for once: a call reads only the settings it needs.
_PRECISION_API = hasattr(getattr(torch.backends.cudnn, "rnn", None), "fp32_precision")


def _rnn_allows_tf32() -> bool:
    """Whether nn.LSTM's cuDNN path would run float32 on TF32 tensor cores: PyTorch's per-operator setting
    (torch.backends.cudnn.rnn.fp32_precision, inheriting "none" from cuDNN's, then the global one; all "none" is
    full precision), or the legacy torch.backends.cudnn.allow_tf32 where that API is missing. Reading the legacy
    flag once conv and RNN precisions differ raises in PyTorch, so it is not read where the new API exists. Read at
    every launch (the settings may change between calls): ~1 us where the RNN's own setting decides, the usual case
    (v0.77; reading all three first took 4)."""
    if not _PRECISION_API:
        return bool(torch.backends.cudnn.allow_tf32)
    precision = torch.backends.cudnn.rnn.fp32_precision
    if precision == "none":
        precision = torch.backends.cudnn.fp32_precision
        if precision == "none":
            precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not _rnn_allows_tf32():
        return "ieee"
    return "tf32"  # ignored for 16-bit operands


def half_w_allowed(dtype: torch.dtype) -> bool:
    """Whether layers of `dtype` may take LSTMConfig.half_w: float32 ones whose dots may round to TF32 (float16
    operands round as TF32 does)."""
    return dtype == torch.float32 and _dot_precision(dtype) == "tf32"


def _half_w(config, dtype: torch.dtype, backward: bool = False) -> bool:
    """Whether a launch of `config` takes its dots on float16 operands (LSTMConfig.half_w): a forward's transposed
    dots; a single layer's backward on the 2-D grid or on tiles with W resident (not its reduce-scatter, which
    ignores the flag of a forward's config). A config that may not is refused (functional._launch swaps it for
    configs.without_half_w before it gets here)."""
    if not config.half_w or backward and config.transposed:
        return False
    layout = (config.grid_2d or config.w_resident) if backward else config.transposed
    if not layout or not half_w_allowed(dtype):
        where = "the backward's 2-D grid or resident tiles" if backward else "the forward's transposed dots"
        raise ValueError(f"config: half_w is for float32 layers on {where} where PyTorch's RNN precision allows TF32 "
                         f"(configs.without_half_w gives the full-precision stand-in), got {dtype}, {config}, "
                         f"float32 dot precision {_dot_precision(torch.float32)!r}")
    return True


def _check_tiles(config, H: int) -> None:
    """W resident means one K chunk: the kernels read a resident W's [.., BK] tile once, and a block_k below H left
    the rest of K out, silently (a grid_2d config's block_k is its unit block, not a K chunk)."""
    if not config.covers_k(H):
        raise ValueError(f"config: w_resident=True holds W in one K chunk, so block_k must be >= H = {H}, got "
                         f"block_k={config.block_k} ({config})")


def _check_residency(config, H: int, D: int, device: torch.device) -> None:
    if not config.persistent:
        return
    programs = config.programs(H) * D
    if interpreting():
        if programs != 1:
            raise ValueError(f"config: a persistent launch under the interpreter needs 1 program, got {programs} "
                             "(the interpreter runs programs one after another; use persistent=False)")
        return
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs > sms:
        raise ValueError(f"config: a persistent launch needs all programs resident: {programs} programs > {sms} SMs")


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every buffer the kernels must fully write comes from here (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _zeroed(device, *parts) -> list[torch.Tensor]:
    """Zero-filled tensors of the given (shape, dtype), carved from one allocation at 128-byte boundaries: one memset
    launch on a GPU where one each cost a host-bound call ~25-60 us of host time apiece there (perf/NOTES.md, v0.70).
    For a launch's own workspaces (counters, carried states, zero initial states), not for what it returns: a view
    keeps the whole buffer alive."""
    if len(parts) == 1:
        return [torch.zeros(parts[0][0], dtype=parts[0][1], device=device)]
    total, layout = _zeroed_layout(parts)
    buf = torch.zeros(total, dtype=torch.uint8, device=device)
    typed = {}
    out = []
    for shape, dtype, strides, offset in layout:
        view = typed.get(dtype)
        if view is None:
            view = typed[dtype] = buf.view(dtype)
        out.append(view.as_strided(shape, strides, offset))
    return out


@functools.lru_cache(maxsize=1024)
def _zeroed_layout(parts: tuple) -> tuple:
    """(bytes, ((shape, dtype, strides, offset in elements), ...)) of _zeroed's parts."""
    layout, total = [], 0
    for shape, dtype in parts:
        strides, step = [], 1
        for n in reversed(shape):
            strides.append(step)
            step *= n
        layout.append((tuple(shape), dtype, tuple(reversed(strides)), total // dtype.itemsize))
        total += -(-step * dtype.itemsize // 128) * 128
    return total, tuple(layout)


def _zeroed_states(device, words: int, state: tuple, dtype, h0, c_ws) -> tuple:
    """A forward launch's (barrier counters, h0, c_ws) from one memset: the counters, and h0 (`dtype`) and c_ws
    (float32) as zeros of shape `state` where they are None; as given otherwise."""
    zero_h, zero_c = h0 is None, c_ws is None
    sync, *states = _zeroed(device, ((words,), torch.int32), *([(state, dtype)] if zero_h else []),
                            *([(state, torch.float32)] if zero_c else []))
    return sync, states.pop(0) if zero_h else h0, states.pop(0) if zero_c else c_ws


def _zeroed_workspace(device, words: int | None, state: tuple, dtype, c0, dhn, dcn, extra: tuple = ()) -> tuple:
    """A backward launch's (barrier counters, carried dc float32, c0, dhn, dcn) from one memset: the counters (None
    for words None), dc, and whichever of c0 (float32), dhn and dcn (`dtype`) are None, as zeros of shape
    `state`; the others as given; and a sixth value, the zeroed views of `extra` ((shape, dtype) parts: the bias
    sums' workspace, v0.74) from the same memset."""
    zero = [name for name, t in (("c0", c0), ("dhn", dhn), ("dcn", dcn)) if t is None]
    parts = ([] if words is None else [((words,), torch.int32)]) + [(state, torch.float32)] + \
        [(state, torch.float32 if name == "c0" else dtype) for name in zero] + list(extra)
    ws = _zeroed(device, *parts)
    extras = tuple(ws[len(ws) - len(extra):])
    ws = ws[:len(ws) - len(extra)]
    sync = None if words is None else ws.pop(0)
    dc_ws = ws.pop(0)
    zeros = dict(zip(zero, ws))
    return sync, dc_ws, zeros.get("c0", c0), zeros.get("dhn", dhn), zeros.get("dcn", dcn), extras


def _per_step(shape, dtype, device, lengths: bool) -> torch.Tensor:
    """A [.., T, B, ..] output. With lengths, positions past a row's end are never written and must read as
    zero (y is the caller's, the dropped outputs meet dG in a GEMM, and every output should be defined)."""
    return torch.zeros(shape, dtype=dtype, device=device) if lengths else _alloc(shape, dtype, device)


# TRITONLSTM_FLAG_COPY=1: the host flag of a CUDA device copied behind each launch (an ATen copy a launch) instead of
# written by the kernels that fail (perf/NOTES.md v0.75).
FLAG_COPY = os.environ.get("TRITONLSTM_FLAG_COPY", "0") == "1"


class BarrierErrors:
    """The sticky barrier-error flag of each device, and its report to the host without a sync per launch.

    A persistent launch whose grid barrier fails sets the device's flag and writes NaN into the rest of its
    outputs (and so does every launch that starts while the flag is set). The program that gives up (at a barrier,
    or at a bulk exchange's wait) also sets the device's host flag: pinned host memory on a CUDA device, which a
    kernel writes directly (unified addressing); nothing writes it when all goes well. The next launch on that
    device, or `tritonlstm.synchronize()`, finds it there and raises. Reading the device's flag with a sync per
    launch would cost the host-device round trip and stop the CPU from queueing the next launches while the GPU
    runs; a copy of it behind each launch (until v0.75, and with TRITONLSTM_FLAG_COPY=1) costs an ATen op a launch.
    half_operands_kernel reports an operand out of range (RANGE) the same way. On the CPU interpreter, which runs
    synchronously, the check follows each launch at once."""

    MESSAGE = ("tritonlstm: a grid barrier (or a wait on another program's h) did not complete (a program never "
               "arrived; were all programs resident?). The outputs of that launch, and of launches queued while it "
               "failed, are NaN.")
    # The flag's value 2 (set by _half_weights' launchers, before the launch): an operand out of range.
    RANGE = 2
    RANGE_MESSAGE = ("tritonlstm: a float32 weight, h0 or dropout scale beyond 2^75 in magnitude, out of the range of "
                     "the float16 operands (power-of-two scaled) that the forward takes where TF32 is allowed "
                     "(LSTMConfig.half_w). The outputs of that launch, and of launches queued after it, are NaN. "
                     "Disallow TF32 for RNNs (torch.backends.cudnn.rnn.fp32_precision = 'ieee') to run such values "
                     "in float32.")

    def __init__(self):
        self._err: dict[torch.device, torch.Tensor] = {}
        self._host: dict[torch.device, torch.Tensor] = {}  # each device's flag as the host reads it

    def flag(self, device: torch.device) -> torch.Tensor:
        """The device's [1] int32 flag, for the kernels."""
        return self.flags(device)[0]

    def flags(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(ERR, ERR_HOST) of a launch on the device: its flag, and the host's copy the kernels report into. The
        flag itself, a report into nothing, with TRITONLSTM_FLAG_COPY=1, and for a first launch on the device inside
        a CUDA graph capture (no pinned allocation there): a replay of that graph that fails leaves the later
        launches NaN, and synchronize() (check(wait=True)) reports it."""
        err = self._err.get(device)
        if err is None:
            err = self._err[device] = torch.zeros(1, dtype=torch.int32, device=device)
        on_cuda = device.type == "cuda"
        host = self._host.get(device)
        if host is None:
            if on_cuda and torch.cuda.is_current_stream_capturing():
                return err, err
            host = self._host[device] = torch.zeros(1, dtype=torch.int32, pin_memory=on_cuda)
        return (err, err) if on_cuda and FLAG_COPY else (err, host)

    def launched(self, device: torch.device, capturing: bool) -> None:
        if device.type != "cuda":
            self.check(device)
        elif FLAG_COPY and not capturing and device in self._host:  # no copy inside a CUDA graph capture
            self._host[device].copy_(self._err[device], non_blocking=True)

    def check(self, device: torch.device, wait: bool = False) -> None:
        """Raises if the device's flag is set as far as the host can see it now (the host's copy), or after waiting
        for the device when wait (the flag itself); clears both first, so each failure is raised once."""
        err = self._err.get(device)
        if err is None:
            return
        on_cuda = device.type == "cuda"
        if wait:
            if on_cuda:
                torch.cuda.synchronize(device)
            seen = int(err.item())
        else:
            host = self._host.get(device)
            seen = 0 if host is None else host.item()  # (item: a fifth of int(host[0])'s host time)
        if seen:
            if on_cuda:
                torch.cuda.synchronize(device)  # so that no report still in flight sets the host flag again
            if device in self._host:
                self._host[device].zero_()
            err.zero_()
            raise RuntimeError(self.RANGE_MESSAGE if seen == self.RANGE else self.MESSAGE)


barrier_errors = BarrierErrors()
# The cluster barrier's PTX, in inline assembly, which the CPU interpreter cannot run (it
# runs programs one after another and needs none). Read when the kernels compile, after this module is loaded.
FENCES = tl.constexpr(not interpreting())


_compiling_only: contextvars.ContextVar[bool] = contextvars.ContextVar("tritonlstm_compile_only", default=False)


@contextlib.contextmanager
def compile_only():
    """Inside, the launchers compile the kernel they would launch (`kernel.warmup`, same arguments, so the same
    specialisation) and launch nothing: their outputs are left unwritten. Under triton's AsyncCompileMode the
    compiles go to its executor: the tuner compiles its candidates in parallel this way."""
    token = _compiling_only.set(True)
    try:
        yield
    finally:
        _compiling_only.reset(token)


def launch_or_compile(kernel, grid, args: tuple, **meta) -> bool:
    """kernel[grid](*args, **meta), or inside compile_only() its warmup (the same specialisation, nothing launched,
    the outputs left unwritten). Returns whether it launched."""
    if _compiling_only.get():
        kernel.warmup(*args, grid=grid, **meta)
        return False
    launcher.launch(kernel, grid, args, meta)
    return True


def _run(kernel, grid, n_steps: int, config, device: torch.device, args: tuple, constexprs: dict,
         sync: torch.Tensor, grid_2d: bool = False) -> None:
    """Launches the kernel: once for all steps (persistent), or once per step. sync: the barrier counters in
    args (zeros). grid_2d: lstm_bwd_2d_kernel, which takes its tiles in `constexprs`."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        # Triton launches on the current device (and its stream); tensors on another GPU must not be run there.
        with torch.cuda.device(device):
            return _run(kernel, grid, n_steps, config, device, args, constexprs, sync, grid_2d)
    meta = dict(BB=config.block_b, PERSISTENT=config.persistent, num_warps=config.num_warps,
                num_stages=config.num_stages, **constexprs)
    if not grid_2d:
        meta.update(BK=config.block_k, BH=config.block_h, W_RESIDENT=config.w_resident, SK=config.split_k)
    cluster = meta.get("CLUSTER", False) and not interpreting()
    if cluster and torch.cuda.get_device_capability(device)[0] < 9:
        # A cluster config on a GPU without thread-block clusters (a tuned cache copied from an H100): the counter
        # barrier instead, over the same zeroed counters (_barrier_state allocates them for every exchange).
        warnings.warn(f"tritonlstm: exchange='cluster' needs thread-block clusters (sm_90 or newer); "
                      f"{torch.cuda.get_device_name(device)} runs this launch with the grid barrier instead",
                      RuntimeWarning, stacklevel=2)
        meta["CLUSTER"] = cluster = False
        meta["BULK"] = False
    if _compiling_only.get():
        kernel.warmup(*args, 0, n_steps, config.max_spin, grid=grid, **meta)
        return
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if not capturing:
        barrier_errors.check(device)  # an earlier launch's failure, now visible on the host
    if config.persistent:
        chunk = steps_a_launch(grid)
        for start in range(0, n_steps, chunk):
            if start:
                sync.zero_()
            if cluster:
                _launch_as_cluster(kernel, grid, (*args, start, min(chunk, n_steps - start), config.max_spin), meta)
            else:
                launcher.launch(kernel, grid, (*args, start, min(chunk, n_steps - start), config.max_spin), meta)
        barrier_errors.launched(device, capturing)
    else:
        for step in range(n_steps):
            launcher.launch(kernel, grid, (*args, step, 1, config.max_spin), meta)


def steps_a_launch(grid: tuple) -> int:
    """The most steps one persistent launch of `grid` runs. A counter gains at most grid[0] * grid[2] arrivals a
    step (a stack's spans its layers) and must stay below RELEASED: a sequence longer than that runs as consecutive
    launches, each from zeroed counters (the state between steps lives in memory, as in stepwise mode)."""
    return max(1, (RELEASED.value - 1) // (grid[0] * grid[2]))


def _launch_as_cluster(kernel, grid, args: tuple, meta: dict) -> None:
    """kernel[grid](*args, **meta) with each grid[0] programs of one (batch group, direction) as one thread-block
    cluster: built as usual (one CTA a program, num_ctas = 1, whose tl.program_id(0) reads %ctaid.x: compile-
    checked), then handed to Triton's launcher with num_ctas = grid[0] in its metadata, which makes it launch
    1 x grid[0] CTAs along x with that cluster dimension (and allow 16, non-portable, on an H100)."""
    found = launcher.compiled_kernel(kernel, args, meta)
    if found is None:
        raise RuntimeError(f"exchange='cluster': {kernel.fn.__name__}'s arguments cannot be bound for a cluster launch")
    compiled, params = found
    if compiled.metadata.global_scratch_size or compiled.metadata.profile_scratch_size:
        # The launcher sizes scratch memory by the grid it is given (x = 1 here), not the CTAs it launches.
        raise RuntimeError(f"exchange='cluster': {kernel.fn.__name__} needs global scratch memory, which a cluster "
                           "launch through Triton's launcher would under-allocate")
    launch = compiled.run  # (loads the module: compiled.function is set from here on)
    stream = torch.cuda.current_stream().cuda_stream
    shared = compiled.metadata.shared
    if meta.get("BULK"):
        # The BULK region after the kernel's own, 16-aligned, at the end, where the kernel finds it.
        shared = cdiv(shared, 16) * 16 + bulk_bytes(meta["BB"], meta["BH"], meta["BK"])
        _allow_dynamic_shared(compiled.function, shared)
    packed = (compiled.metadata.num_warps, grid[0], shared)
    # As JITFunction.run hands them over (profilers' launch hooks included), but for grid x and num_ctas.
    launch(1, grid[1], grid[2], stream, compiled.function, packed, compiled.launch_metadata(grid, stream, *params),
           knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *params)


def bulk_bytes(block_b: int, block_h: int, block_k: int) -> int:
    """The shared memory BULK adds to a launch (the kernel's EXTRA): two slots of h [BB, BK], two staging blocks
    [BB, BH] (16-bit), two mbarriers and 8 bytes to keep it a multiple of 16."""
    return 2 * block_b * block_k * 2 + 2 * block_b * block_h * 2 + 16


_bulk_codes: dict[tuple, torch.Tensor] = {}


def bulk_codes(block_b: int, block_h: int, block_k: int, hidden: int, device: torch.device) -> torch.Tensor | None:
    """BULK's CODES [BB, BK] int16: the byte of row b's unit k in a slot, whose producer-major layout [P, BB, BH]
    makes each producer's tile one block for its copy (-1 past H: read as 0). Loaded by the kernel, which gives
    them a load's layout (8 consecutive units a thread), the one _bulk_read's 16-byte reads need. Made once per key,
    outside a CUDA graph's capture (a copy to the GPU cannot be captured): None while capturing a key not yet made."""
    key = (block_b, block_h, block_k, hidden, device)
    if key not in _bulk_codes:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        k = torch.arange(block_k)
        b = torch.arange(block_b)[:, None]
        codes = (((k // block_h) * block_b + b) * block_h + k % block_h) * 2
        _bulk_codes[key] = torch.where(k < hidden, codes, -1).to(torch.int16).to(device)
    return _bulk_codes[key]


_shared_allowed: dict[int, int] = {}


def _allow_dynamic_shared(function: int, nbytes: int) -> None:
    """Raises a kernel's dynamic shared memory limit to nbytes (Triton's loader raises it only for kernels that
    need more than 48 KB themselves)."""
    if _shared_allowed.get(function, 0) >= nbytes:
        return
    import ctypes

    cuda = ctypes.CDLL("libcuda.so.1")
    max_dynamic_shared_size_bytes = 8  # CUfunction_attribute
    rc = cuda.cuFuncSetAttribute(ctypes.c_void_p(function), max_dynamic_shared_size_bytes, ctypes.c_int(nbytes))
    if rc != 0:
        raise RuntimeError(f"BULK: cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES, {nbytes}) failed with CUresult "
                           f"{rc}")
    _shared_allowed[function] = nbytes


# A transposed dot's K chunk holds this much of h_{t-1} ([BB, KC]): compile-only sm_90 (perf/NOTES.md v0.18), no
# spills at BB = 16 up to K = 1024 in 16-bit and K = 512 in fp32, at BB = 64 up to K = 512 in 16-bit.
TRANSPOSED_CHUNK_BYTES = 8192
# ... but each chunk's load waits for the dot before it (one L2 round trip per chunk, ~0.44 us: run 4's steps of
# 2.46 / 2.90 / 3.78 us at 1 / 2 / 4 chunks), so a single layer whose whole h tile takes this much per 4 warps loads
# it as one chunk: compile-only sm_90, no spills (4 warps: 252 registers at 16-bit K = 512 and fp32 K = 256; 8 warps:
# 240-243 at 16-bit K = 1024, where 4 warps spill 864-912 bytes); a stack's two dots spill 476-632 bytes with it
# (perf/NOTES.md v0.31, v0.64).
TRANSPOSED_ONE_CHUNK_BYTES = 16384


def transposed_chunk(config, esize: int, stack: bool = False, half_h: bool = False) -> int:
    """KC of a transposed config (and a placeholder 16 for the others): with W streamed, its K chunk. half_h: h
    comes in float16 (HALF_H), so the one-chunk case holds twice float32's K (at BB = 16, K = 512: 251 registers,
    no spills); in several chunks it keeps float32's KC, as 2-byte chunks of 256 spill 500 bytes with the next
    chunk's load issued before the dot (compile-only sm_90, perf/NOTES.md v0.63)."""
    if not config.transposed:
        return 16
    if not config.w_resident:
        return config.block_k
    one_chunk = TRANSPOSED_ONE_CHUNK_BYTES * max(1, config.num_warps // 4)
    if not stack and config.block_b * config.block_k * (2 if half_h else esize) <= one_chunk:
        return config.block_k
    return max(16, min(config.block_k, TRANSPOSED_CHUNK_BYTES // (config.block_b * esize)))


def _barrier_state(config, grid, device, stack: bool = False) -> tuple[torch.Tensor, dict]:
    """The zeroed barrier counters of a launch, one per barrier (per direction and batch group; a stack's spans
    its layers), and the kernels' CLUSTER constexpr."""
    words, cluster = _barrier_layout(config, grid, stack)
    return torch.zeros(words, device=device, dtype=torch.int32), cluster


def _barrier_layout(config, grid, stack: bool = False) -> tuple[int, dict]:
    """_barrier_state's int32 words and constexprs."""
    P, Q, Z = grid
    barriers = Q if stack else Q * Z
    cluster = config.clustered
    if cluster and (stack or not cluster_size_ok(P)):
        raise ValueError(f"config: exchange={config.exchange!r} needs a single layer's launch of at most "
                         f"{MAX_PORTABLE_CLUSTER} programs a barrier, or exactly {MAX_CLUSTER} (the cluster sizes "
                         f"Triton's launcher can launch), got {'a stack' if stack else f'{P} programs'}")
    return barriers, dict(CLUSTER=cluster)


# The scales' exponents stay within +-HALF_W_MAX_SHIFT, so that a product of two is a normal float32: magnitudes
# up to 2^75 (2^-60 * 2^75 = 2^15, within float16) and down to 2^-45 keep every bit float16 holds.
HALF_W_MAX_SHIFT: tl.constexpr = tl.constexpr(60)
HALF_BLOCK = 2048  # elements of W a program of half_operands_kernel scales


@triton.jit
def _exp2_bits(k):
    """2^k as float32, exactly (int32 k in the normal range), from its exponent bits."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _scale_exp(AMAX, i):
    """_exp_below_half_max's k for AMAX[i] clamped to +-HALF_W_MAX_SHIFT, and whether it was out of that range with
    AMAX[i] finite. Clamped, zero scales by 2^60 and inf by 2^-60, and both stay what they are."""
    k, e = _exp_below_half_max(tl.load(AMAX + i))
    return tl.minimum(tl.maximum(k, -HALF_W_MAX_SHIFT), HALF_W_MAX_SHIFT), (k < -HALF_W_MAX_SHIFT) & (e != 255)


@triton.jit
def half_operands_kernel(W_HH, W_IH, AMAX, W16, WIH16, SCALES, ERR, ERR_HOST, H0, H016, N, NUMEL, NUMEL_H0,
                         K_REC: tl.constexpr, STACK: tl.constexpr, HAS_DROP: tl.constexpr, HAS_H016: tl.constexpr,
                         BLOCK: tl.constexpr, BN: tl.constexpr):
    # Program (c, l, 0) scales elements c * BLOCK.. of layer l's W_hh into float16 (and, HAS_H016, of direction l's
    # h0 [B, H] into H016, times h0's multiplier), (c, l, 1) those of layer l + 1's W_ih (a stack's); program
    # (0, 0, 0) also writes the [N, 5] scales. AMAX: the magnitudes of W_hh (N), h0 (N), and a stack's W_ih (N - 1)
    # and dropout scale (N - 1), as _half_weights lays them out.
    i_c = tl.program_id(0)
    i_l = tl.program_id(1)
    o = i_c.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < NUMEL
    o_l = i_l.to(tl.int64) * NUMEL + o
    if tl.program_id(2) == 0:
        k, _ = _scale_exp(AMAX, i_l)
        w = tl.load(W_HH + o_l, mask=m)
        tl.store(W16 + o_l, (w * _exp2_bits(k)).to(tl.float16), mask=m)
        if HAS_H016:
            k_h0, _ = _scale_exp(AMAX, N + i_l)
            m_h = o < NUMEL_H0
            o_h = i_l.to(tl.int64) * NUMEL_H0 + o
            tl.store(H016 + o_h, (tl.load(H0 + o_h, mask=m_h) * _exp2_bits(k_h0)).to(tl.float16), mask=m_h)
    else:
        m = m & (i_l < N - 1)
        k, _ = _scale_exp(AMAX, 2 * N + i_l)
        w = tl.load(W_IH + o_l, mask=m)
        tl.store(WIH16 + o_l, (w * _exp2_bits(k)).to(tl.float16), mask=m)
    if (i_c == 0) & (i_l == 0) & (tl.program_id(2) == 0):
        o_n = tl.arange(0, BN)
        m_n = o_n < N
        i_n = tl.where(m_n, o_n, 0)
        k_w, out_w = _scale_exp(AMAX, i_n)
        k_h0, out_h0 = _scale_exp(AMAX, N + i_n)
        beyond = (out_w | out_h0) & m_n
        if STACK:  # layer 0 has no in-loop input dot; the layer below's output is h (within +-1) times its dropout
            above = m_n & (o_n > 0)
            below = tl.where(above, o_n - 1, 0)
            k_ih, out_ih = _scale_exp(AMAX, 2 * N + below)
            if HAS_DROP:
                k_x, out_x = _scale_exp(AMAX, 3 * N - 1 + below)
                beyond = beyond | (out_x & above)
            else:
                k_x = tl.full([BN], 14, tl.int32)  # 141 - 127: a magnitude of 1
            beyond = beyond | (out_ih & above)
            k_ih = tl.where(above, k_ih, 0)
            k_x = tl.where(above, k_x, K_REC)
        else:
            k_ih = tl.zeros([BN], tl.int32)
            k_x = tl.zeros([BN], tl.int32)
        p = SCALES + o_n * 5
        tl.store(p, _exp2_bits(k_h0), mask=m_n)
        tl.store(p + 1, _exp2_bits(-(k_w + k_h0)), mask=m_n)
        tl.store(p + 2, _exp2_bits(-(k_w + K_REC)), mask=m_n)
        tl.store(p + 3, _exp2_bits(k_x), mask=m_n)
        tl.store(p + 4, _exp2_bits(-(k_ih + k_x)), mask=m_n)
        if tl.max(beyond.to(tl.int32), axis=0) > 0:
            tl.store(ERR, tl.maximum(tl.load(ERR), 2))  # BarrierErrors.RANGE
            tl.store(ERR_HOST, 2)


def _half_weights(w_hh, h0, w_ih=None, drop=None, h0_out=None):
    """The float16 operands of a HALF_W launch, for float32 layers whose TF32 dots would round W and h to 10-bit
    mantissas anyway: float16 holds the same mantissa, so W scaled by a power of two into its range (per direction
    or layer) loses nothing TF32 keeps; the kernel scales h0, h_{t-1} and the layer below's output likewise. Returns
    W_hh (and a stack's W_ih) in float16 and the [N, 5] scales the kernel reads: h0's multiplier, the
    accumulator's at the first step (1 / (h0's scale * W_hh's)) and at the others (1 / (REC_MUL * W_hh's)), the
    layer below's output's multiplier and its accumulator's (1 / (that * W_ih's)). On the device without a sync,
    in 3-5 launches: ATen's max-magnitude reductions, then half_operands_kernel for the rest (in ATen's ops it was
    ~30 launches, perf/NOTES.md v0.35). A finite magnitude beyond 2^75 sets the device's error flag
    (BarrierErrors.RANGE): the launch's outputs are NaN and the host raises, as after a failed barrier. Inf and NaN
    go through, and propagate as in torch. h0_out ([D, B, H] float16, a single layer's): h0 times its multiplier,
    as the kernel's first step reads it with HALF_H."""
    dev = w_hh.device
    if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):  # Triton launches on the current device
            return _half_weights(w_hh, h0, w_ih, drop, h0_out)
    n, G, H = w_hh.shape
    given, stack = w_ih is not None, w_ih is not None and n > 1
    inf = float("inf")
    amax = w_hh.new_empty((4 * n - 2 if drop is not None else 3 * n - 1) if stack else 2 * n)
    torch.linalg.vector_norm(w_hh, inf, dim=(1, 2), out=amax[:n])
    torch.linalg.vector_norm(h0, inf, dim=(1, 2), out=amax[n:2 * n])
    if stack:
        torch.linalg.vector_norm(w_ih, inf, dim=(1, 2), out=amax[2 * n:3 * n - 1])
        if drop is not None:
            torch.linalg.vector_norm(drop, inf, dim=(1, 2, 3), out=amax[3 * n - 1:])
    w_hh = w_hh.contiguous()
    w_ih = w_ih.contiguous() if stack else w_hh
    w16 = torch.empty(w_hh.shape, dtype=torch.float16, device=dev)
    wih16 = torch.empty(w_ih.shape, dtype=torch.float16, device=dev) if stack else w16
    scales = torch.empty((n, 5), dtype=torch.float32, device=dev)
    numel = G * H
    numel_h0 = h0.shape[1] * h0.shape[2]
    if h0_out is not None:
        if stack or h0_out.shape != h0.shape or h0_out.dtype != torch.float16 or not h0_out.is_contiguous():
            raise ValueError(f"_half_weights: h0_out must be a contiguous float16 {tuple(h0.shape)} of a single "
                             f"layer, got {h0_out.dtype} {tuple(h0_out.shape)}")
        h0 = h0.contiguous()
    grid = (cdiv(max(numel, numel_h0) if h0_out is not None else numel, HALF_BLOCK), n, 2 if stack else 1)
    args = (w_hh, w_ih, amax, w16, wih16, scales, *barrier_errors.flags(dev), h0,
            h0_out if h0_out is not None else w16, n, numel, numel_h0)
    meta = dict(K_REC=int(math.log2(REC_MUL.value)), STACK=stack, HAS_DROP=drop is not None,
                HAS_H016=h0_out is not None, BLOCK=HALF_BLOCK, BN=next_power_of_2(n))
    launch_or_compile(half_operands_kernel, grid, args, **meta)
    return w16, wih16 if given else None, scales


def _bias_args(bias, bias_hh, dummy) -> tuple:
    """(BIAS, BIAS_HH, HAS_BIAS, TWO_BIASES) of a launch from its two optional biases, which the kernel adds in
    float32."""
    if bias is None:
        bias, bias_hh = bias_hh, None
    if bias is None:
        return dummy, dummy, False, False
    return bias.contiguous(), dummy if bias_hh is None else bias_hh.contiguous(), True, bias_hh is not None


def lstm_forward(gx, w_hh, bias, h0, c_ws, last, *, reverse: bool, store_gates: bool, config, gates_out=None,
                 bias_hh=None):
    """Runs the recurrence of D directions (D = w_hh.shape[0]; direction 1 in reverse) over gx = x @ W_ih^T
    [T, B, D*4H] (read only, unless it is gates_out). w_hh [D, 4H, H], bias [D, 4H] (any float dtype) or None, and
    bias_hh likewise (nn.LSTM's second bias, added to bias in float32), h0
    [D, B, H], c_ws [D, B, H] float32 holding c0 (updated in place). h0 or c_ws None: zeros (from the barrier
    counters' memset, no launch of their own). reverse runs a D = 1 launch backwards.
    Returns y [T, B, D*H], h_n, c_n [D, B, H] and, when store_gates, the activated gates [T, B, D*4H] (in
    gates_out when given, which may be gx itself: each program overwrites only the gx elements it has read;
    without lengths, as positions past a row's end are not written) and c_all [T, B, D*H] float32 (else None,
    None)."""
    T, B, _ = gx.shape
    D, G, H = w_hh.shape
    dt, dev = gx.dtype, gx.device
    lengths = last is not None
    has_bias, two = bias is not None or bias_hh is not None, bias is not None and bias_hh is not None
    bulk = BULK_H and (BULK_EMULATED if interpreting() else dev.type == "cuda")
    config, grid, words, constexprs = _forward_plan(config, dt, B, H, D, store_gates, has_bias, two, lengths,
                                                    _dot_precision(dt), HALF_H, PREFETCH_AS_LOADED, ARRIVE_EARLY, bulk)
    _check_residency(config, H, D, dev)
    y = _per_step((T, B, D * H), dt, dev, lengths)
    hn = _alloc((D, B, H), dt, dev)
    cn = _alloc((D, B, H), dt, dev)
    if gates_out is not None and (not store_gates or lengths):
        raise ValueError("lstm_forward: gates_out needs store_gates=True and no lengths")
    gates = gates_out if gates_out is not None else _per_step((T, B, D * G), dt, dev, lengths) if store_gates else gx
    sync, h0, c_ws = _zeroed_states(dev, words, (D, B, H), dt, h0, c_ws)
    b1, b2, _, _ = _bias_args(bias, bias_hh, c_ws)
    c_all = _per_step((T, B, D * H), torch.float32, dev, lengths) if store_gates else c_ws
    h16 = torch.empty((2, D, B, H), dtype=torch.float16, device=dev) if constexprs["HALF_H"] else None
    w_dot, _, wscale = _half_weights(w_hh, h0, h0_out=None if h16 is None else h16[1]) if constexprs["HALF_W"] \
        else (w_hh, None, c_ws)
    codes = bulk_codes(config.block_b, config.block_h, config.block_k, H, dev) if constexprs["BULK"] else sync
    if codes is None:
        constexprs = dict(constexprs, BULK=False)
        codes = sync
    ring = sync
    if constexprs["BULK"] and interpreting():
        extra = bulk_bytes(config.block_b, config.block_h, config.block_k)
        ring = torch.zeros(grid[0] * grid[1] * grid[2] * (extra + 32) // 4, dtype=torch.int32, device=dev)
    args = (gx, gates, w_dot, w_dot, y, y, b1, b2, h0, c_ws, y, hn, cn, c_all, last if last is not None else sync,
            sync, *barrier_errors.flags(dev), wscale, h16 if h16 is not None else sync, codes, ring, T, B, H,
            int(reverse))
    _run(lstm_fwd_kernel, grid, T, config, dev, args, constexprs, sync)
    return (y, hn, cn, gates, c_all) if store_gates else (y, hn, cn, None, None)


# A single layer's HALF_W forward exchanges h_{t-1} in float16 (kernel's HALF_H, perf/NOTES.md v0.63);
# TRITONLSTM_HALF_H=0 reads it from y in float32 and rounds it in the dot's loop instead, as before (for the A/B).
HALF_H = os.environ.get("TRITONLSTM_HALF_H", "1") != "0"


def half_h_applies(config, esize: int, kernel: str) -> bool:
    """Whether a `kernel` launch of `config` reads h_{t-1} in float16 (HALF_H) where TF32 is allowed: a float32 single
    layer's half_w forward, with the flag on. What the compile-only check and the shared-memory estimate size; a
    launch decides by _half_w as well (PyTorch's precision setting), in _forward_plan."""
    return HALF_H and kernel == "fwd" and config.half_w and esize == 4


# A single layer's HALF_W backward on the 2-D grid reads dG_{t+1} in float16 as its producers scaled it (kernel's
# HALF_G, perf/NOTES.md v0.65); off until a GPU has timed it (not bit for bit the float32 read, unlike HALF_H):
# TRITONLSTM_HALF_G=1 turns it on.
HALF_G = os.environ.get("TRITONLSTM_HALF_G", "0") == "1"


# What a launch's shapes and config decide, checked and built once per key: made on every launch, the checks and
# the constexprs' dict were ~10 us of a host-bound call's host time (perf/NOTES.md v0.49). The dot precision is
# in the key, as _half_w and DOT_PRECISION follow PyTorch's RNN precision setting.
# A prefetching cluster launch's 16-bit next-step tiles cross the barrier as they were loaded, widened to float32 at
# their use after the wait (kernels' CARRY, _load_carried, perf/NOTES.md v0.68): widened at the load, or split there
# into 16-bit values where a thread loads two in a word, they waited for the loads before the barrier. Bit for bit
# the same; TRITONLSTM_PREFETCH_AS_LOADED=0 widens at the load (for the A/B).
PREFETCH_AS_LOADED = os.environ.get("TRITONLSTM_PREFETCH_AS_LOADED", "1") != "0"
# A prefetching launch with one batch tile a program arrives at its barrier (the cluster's or the counter's) right
# after its exchange's stores and waits at the step's end (kernels' ARRIVE_EARLY, perf/NOTES.md v0.68). Off until a
# GPU has run it: a cluster barrier cannot time out, so an arrival missed would hang. TRITONLSTM_ARRIVE_EARLY=1
# turns it on.
ARRIVE_EARLY = os.environ.get("TRITONLSTM_ARRIVE_EARLY", "0") == "1"
# A forward cluster launch of 16-bit one-chunk transposed tiles, one batch tile a program, exchanges h_{t-1} through the
# cluster's shared memory by bulk copies, with no barrier a step (kernels' BULK, perf/NOTES.md v0.69). Off until a GPU
# has run it; CUDA only (the interpreter has no shared memory between programs). TRITONLSTM_BULK_H=1 turns it on.
BULK_H = os.environ.get("TRITONLSTM_BULK_H", "0") == "1"
# ... and on the interpreter only where a test runs the programs at once (tests/concurrency.py): run one after another,
# the first would wait for copies from programs that have not started.
BULK_EMULATED = False


def bulk_applies(config, esize: int, kc: int, prefetch: bool, one_tile_each: bool) -> bool:
    """Whether a single layer's forward launch of `config` (dtype of `esize` bytes, transposed chunk kc) can take
    BULK: a cluster's 16-bit transposed tiles with W resident in one chunk, prefetching with one batch tile a program,
    whole 16-byte reads within a producer's units (block_h % 8 == 0), and the slots in shared memory beside the
    kernel's own (configs.shared_bytes' estimate)."""
    if not (config.clustered and config.transposed and config.w_resident and esize == 2 and prefetch
            and one_tile_each and kc == config.block_k and config.block_h % 8 == 0 and not config.half_w):
        return False
    own = shared_bytes(config, "fwd", config.block_k, esize)
    return cdiv(own, 16) * 16 + bulk_bytes(config.block_b, config.block_h, config.block_k) <= SM90_SHARED


def step_constexprs(config, esize: int, prefetch: bool, one_tile_each: bool, as_loaded: bool = True,
                    arrive_early: bool = False) -> dict:
    """A single layer's PREFETCH, CARRY and ARRIVE_EARLY (forward or backward) for `config` in a dtype of `esize`
    bytes: prefetch (LSTMConfig.prefetches at the launch's shape), one_tile_each (every batch group has a
    tile: as many tiles as groups), and the two switches as given (the module's PREFETCH_AS_LOADED and ARRIVE_EARLY
    at a launch). CARRY is for a cluster's 16-bit tiles (float32 ones cross the barrier as loaded anyway): words (2)
    where a [block_b, block_h] tile gives each thread two or more values, else the values (1). Not on the grid
    barrier: in the split-K backward at 16-bit H = 512 (255 registers) the words took dG_{t+1}'s loads from 2 rounds
    to 3 (compile-only), a round trip on the step's critical path for one taken off it. Early arrival takes one
    arrival a step from every program (the cluster barrier cannot time out): one batch tile each, exactly (a
    program without one runs no step body, where it would arrive)."""
    early = arrive_early and prefetch and one_tile_each
    carry = 0
    if as_loaded and prefetch and esize == 2 and config.clustered:
        carry = 2 if config.block_b * config.block_h >= 2 * 32 * config.num_warps else 1
    return dict(PREFETCH=prefetch, CARRY=carry, ARRIVE_EARLY=early)


def _step_constexprs_at(config, esize: int, batch: int, hidden: int, as_loaded: bool, arrive_early: bool) -> dict:
    """step_constexprs for a launch of `batch` rows of `hidden` units."""
    return step_constexprs(config, esize, config.prefetches(batch, hidden),
                           cdiv(batch, config.block_b) == config.batch_groups, as_loaded, arrive_early)


@functools.lru_cache(maxsize=1024)
def _forward_plan(config, dtype: torch.dtype, B: int, H: int, D: int, store_gates: bool, has_bias: bool,
                  two_biases: bool, has_lengths: bool, precision: str, half_h: bool = True, as_loaded: bool = True,
                  arrive_early: bool = False, bulk: bool = False):
    """(config as the forward runs it, grid, barrier words, the kernel's constexprs) of an lstm_forward launch;
    half_h, as_loaded, arrive_early, bulk: the module's switches at the call (in the key, so that switching them takes
    effect; bulk: BULK_H where it can run, a CUDA launch)."""
    config = for_kernel(config, "fwd")
    _check_tiles(config, H)
    grid = (cdiv(H, config.block_h), config.batch_groups, D)
    words, cluster = _barrier_layout(config, grid)
    half_w = _half_w(config, dtype)
    half_h = half_h and half_w
    constexprs = dict(D=D, HAS_BIAS=has_bias, TWO_BIASES=two_biases, HAS_LENGTHS=has_lengths, STACK=False,
                      HAS_DROPOUT=False, STORE_GATES=store_gates, DOT_PRECISION=precision, MERGED=config.merged_gates,
                      TRANSPOSED=config.transposed,
                      KC=transposed_chunk(config, dtype.itemsize, half_h=half_h), HALF_W=half_w, HALF_H=half_h,
                      **_step_constexprs_at(config, dtype.itemsize, B, H, as_loaded, arrive_early), **cluster)
    constexprs["BULK"] = bulk and cluster["CLUSTER"] and bulk_applies(config, dtype.itemsize, constexprs["KC"],
                                                                      constexprs["PREFETCH"],
                                                                      cdiv(B, config.block_b) == config.batch_groups)
    if constexprs["BULK"]:
        constexprs["ARRIVE_EARLY"] = False  # no barrier a step to arrive at
    return config, grid, words, constexprs


def lstm_stack_forward(gx, w_ih, w_hh, bias, h0, c_ws, last, *, store_gates: bool, config, drop=None,
                       bias_hh=None):
    """A unidirectional stack of L layers of equal width in one launch, as a wavefront: layer l runs its step t
    at global step t + l, so the stack takes T + L - 1 steps instead of L * T. gx = x @ W_ih^T of the first
    layer [T, B, 4H]; w_ih [L-1, 4H, H] of the layers above; w_hh [L, 4H, H]; bias and bias_hh as lstm_forward's,
    [L, 4H]; h0 [L, B, H]; c_ws [L, B, H] float32 holding c0 (updated in place); h0 or c_ws None: zeros, with the
    barrier counters from one memset (as lstm_forward's); drop [L-1, T, B, H] or None: the
    dropout scale (0 or 1/(1-p)) applied to each layer's output before the layer above takes it as input.
    Returns every layer's output y [L, T, B, H], h_n and c_n [L, B, H], when store_gates every layer's
    activated gates [L, T, B, 4H] and c_t [L, T, B, H] float32 for the backward (else None, None), and the
    dropped outputs [L-1, T, B, H] that the layers above took as input (None without drop)."""
    T, B, _ = gx.shape
    L, G, H = w_hh.shape
    config = for_kernel(config, "stack")
    _check_tiles(config, H)
    _check_residency(config, H, L, gx.device)
    dt, dev = gx.dtype, gx.device
    lengths = last is not None
    y = _per_step((L, T, B, H), dt, dev, lengths)
    xd = _per_step((max(L - 1, 1), T, B, H), dt, dev, lengths) if drop is not None else None
    hn = _alloc((L, B, H), dt, dev)
    cn = _alloc((L, B, H), dt, dev)
    gates = _per_step((L, T, B, G), dt, dev, lengths) if store_gates else gx
    grid = (cdiv(H, config.block_h), config.batch_groups, L)
    words, cluster = _barrier_layout(config, grid, stack=True)
    sync, h0, c_ws = _zeroed_states(dev, words, (L, B, H), dt, h0, c_ws)
    c_all = _per_step((L, T, B, H), torch.float32, dev, lengths) if store_gates else c_ws
    half = _half_w(config, dt)
    w_ih = w_ih if L > 1 else w_hh
    w_dot, w_ih_dot, wscale = _half_weights(w_hh, h0, w_ih, drop) if half else (w_hh, w_ih, c_ws)
    b1, b2, has_bias, two = _bias_args(bias, bias_hh, c_ws)
    args = (gx, gates, w_dot, w_ih_dot, drop if drop is not None else y, xd if xd is not None else y, b1, b2, h0,
            c_ws, y, hn, cn, c_all, last if last is not None else sync, sync, *barrier_errors.flags(dev), wscale, sync,
            sync, sync, T, B, H, 0)
    _run(lstm_fwd_kernel, grid, T + L - 1, config, dev, args,
         dict(D=1, HAS_BIAS=has_bias, TWO_BIASES=two, HAS_LENGTHS=last is not None, STACK=True,
              HAS_DROPOUT=drop is not None, MERGED=False, TRANSPOSED=config.transposed,
              KC=transposed_chunk(config, dt.itemsize, stack=True), PREFETCH=False, HALF_W=half, **cluster,
              STORE_GATES=store_gates, DOT_PRECISION=_dot_precision(dt)), sync)
    if not store_gates:
        gates = c_all = None
    return y, hn, cn, gates, c_all, xd


def lstm_backward(gates, c_all, c0, w_hh, dy, dhn, dcn, last, *, reverse: bool, config, into_gates: bool = False,
                  bias_sums: tuple | None = None):
    """The reverse recurrence of D directions, shapes as lstm_forward's (c0 [D, B, H] float32, dy [T, B, D*H],
    dhn and dcn [D, B, H]; c0, dhn or dcn None: zeros, from one memset with the launch's own workspaces). Returns
    dG [T, B, D*4H] (gradient of the gate pre-activations, in the gates' dtype), dh0 and dc0 [D, B, H].
    into_gates: dG is written over `gates` (which must come from lstm_forward: zeros past each row's end) instead
    of a new buffer. bias_sums (dtype, copies, after): a fourth value, dG's column sums [copies, D*4H] in dtype (the
    bias gradients): summed by the launch itself where bias_sums_in_kernel allows, else with `after` by
    kernels.reduce after it, its counters and partials from this launch's memset (v0.74), else None."""
    T, B, _ = gates.shape
    D, G, H = w_hh.shape
    _check_tiles(config, H)
    _check_residency(config, H, D, gates.device)
    dt, dev = gates.dtype, gates.device
    dg = gates if into_gates else _per_step((T, B, D * G), dt, dev, last is not None)
    dh0 = _alloc((D, B, H), dt, dev)
    dc0 = _alloc((D, B, H), dt, dev)
    if not config.grid_2d:
        grid, words, constexprs = _backward_plan(config, dt, B, H, D, last is not None, _dot_precision(dt), dev,
                                                 SPLIT_PAIRS, PREFETCH_AS_LOADED, ARRIVE_EARLY, TRANSPOSE_IN_KERNEL)
    from tritonlstm.kernels import reduce  # (it imports this module)

    in_kernel = bias_sums is not None and not config.grid_2d and bias_sums_in_kernel(config, "bwd", H, T + 1, grid)
    after = bias_sums is not None and not in_kernel and bias_sums[2]
    # The bias sums' counters and partials (kernels.reduce, after the recurrence) from this launch's memset.
    extra = reduce.workspace_parts((T * B, D * G), dev) if after else ()
    # (The 2-D grid's barrier counters come with its own layout, _barrier_state.)
    sync, dc_ws, c0, dhn, dcn, sums_ws = _zeroed_workspace(dev, None if config.grid_2d else words, (D, B, H), dt,
                                                           c0, dhn, dcn, extra)
    dbias = None
    if config.grid_2d:
        _backward_2d(gates, c_all, c0, w_hh, dy, dhn, dcn, dg, dc_ws, dh0, dc0, last, reverse, config)
    else:
        w_t, part = _reduce_scatter_state(config, w_hh, B, sync, constexprs["WT_FROM_W"])
        amax, rmax = _half_grad_state(w_hh, (2, D, grid[0], B), constexprs["HALF_W"], sync)
        if in_kernel:
            dbias = torch.empty((bias_sums[1], D * G), dtype=bias_sums[0], device=dev)  # (written by every launch)
            constexprs = {**constexprs, "BIAS_COPIES": bias_sums[1]}
        args = (gates, c_all, c0, w_hh, w_hh, dy, dy, dhn, dcn, dg, dc_ws, dh0, dc0,
                last if last is not None else sync, sync, *barrier_errors.flags(dev), w_t, part, amax, rmax,
                sync if dbias is None else dbias, T, B, H, int(reverse))
        _run(lstm_bwd_kernel, grid, T + 1, config, dev, args, constexprs, sync)
    if bias_sums is None:
        return dg, dh0, dc0
    if after:
        dbias = reduce.column_sums(dg.view(T * B, D * G), *bias_sums[:2], workspace=sums_ws or None)
    return dg, dh0, dc0, dbias


# TRITONLSTM_BIAS_IN_KERNEL=1: a single launch of one batch group sums the bias gradients in the backward kernel
# (BIAS_COPIES, perf/NOTES.md v0.73) instead of kernels.reduce's memset and launch after it. Off until a GPU A/B:
# compile-only, the accumulators moved the time loop's schedule (a load round more a step in the split backward at
# 16-bit H = 512, prefetched reads before the wait in the reduce-scatter one at H = 256).
BIAS_IN_KERNEL = os.environ.get("TRITONLSTM_BIAS_IN_KERNEL", "0") == "1"
BIAS_SUMS_MAX_HIDDEN = 512
BIAS_SUM_REGISTERS = 8


def bias_sums_in_kernel(config, kernel: str, hidden: int, n_steps: int | None = None,
                        grid: tuple | None = None) -> bool:
    """Whether a `kernel` launch of `config` at `hidden` units sums the bias gradients itself: a single layer's tiles
    (not the 2-D grid) in one persistent launch (n_steps within what _run launches at once) of one batch group, so
    that each program has every row of its units. Its four [BB, BH] float32 sums cost 4 * BB * BH / (32 * num_warps)
    registers a thread, at most BIAS_SUM_REGISTERS; and not beyond BIAS_SUMS_MAX_HIDDEN units, where the kernels
    spill in their time loop already (compile-only sm_90, shipped H200 configs: at 16-bit H = 1024 the loop's local
    loads went 11 -> 22, float32's 55 -> 78; at H <= 512 no spill in the loop, perf/NOTES.md v0.73)."""
    if not (BIAS_IN_KERNEL and kernel == "bwd" and config.persistent and not config.grid_2d
            and config.batch_groups == 1 and hidden <= BIAS_SUMS_MAX_HIDDEN
            and 4 * config.block_b * config.block_h <= BIAS_SUM_REGISTERS * 32 * config.num_warps):
        return False
    return n_steps is None or n_steps <= steps_a_launch(grid)


# A single layer's split-K backward loads dG_{t+1}'s gates two at a time (kernel's PAIRED, perf/NOTES.md v0.66): the
# same result bit for bit; TRITONLSTM_SPLIT_PAIRS=0 loads each gate inside its dot, as before (for the A/B).
SPLIT_PAIRS = os.environ.get("TRITONLSTM_SPLIT_PAIRS", "1") != "0"


def pairs_gates(config, kernel: str, hidden: int, esize: int, smem_limit: int) -> bool:
    """Whether a `kernel` launch of `config` loads dG_{t+1}'s gates two at a time (PAIRED): a single layer's split-K
    tiles with W resident, where the second gate's operand buffer fits the GPU's shared memory (`smem_limit` bytes a
    block) beside the rest (configs.shared_bytes(paired=True)): fp32 H = 1024's 64 KB of it did not (262144 bytes
    compiled). What the launch, the compile-only check and their shared-memory estimate decide by."""
    return (SPLIT_PAIRS and kernel == "bwd" and config.split_k > 1 and config.w_resident and not config.transposed
            and not config.grid_2d and shared_bytes(config, kernel, hidden, esize, paired=True) <= smem_limit)


@functools.lru_cache(maxsize=1024)
def _backward_plan(config, dtype: torch.dtype, B: int, H: int, D: int, has_lengths: bool, precision: str,
                   device: torch.device, split_pairs: bool, as_loaded: bool = True, arrive_early: bool = False,
                   transpose_in_kernel: bool = True):
    """(grid, barrier words, the kernel's constexprs) of an lstm_backward launch on tiles, as _forward_plan.
    split_pairs: SPLIT_PAIRS at the call (pairs_gates reads it), in the key so that switching it takes effect; so
    are as_loaded, arrive_early and transpose_in_kernel (PREFETCH_AS_LOADED, ARRIVE_EARLY, TRANSPOSE_IN_KERNEL)."""
    grid = (cdiv(H, config.block_h), config.batch_groups, D)
    smem = device_limits(device)[1] if device.type == "cuda" and not interpreting() else SM90_SHARED
    paired = pairs_gates(config, "bwd", H, dtype.itemsize, smem)
    words, cluster = _barrier_layout(config, grid)
    constexprs = dict(D=D, HAS_LENGTHS=has_lengths, STACK=False, HAS_DROPOUT=False, DOT_PRECISION=precision,
                      **_step_constexprs_at(config, dtype.itemsize, B, H, as_loaded, arrive_early),
                      HALF_W=_half_w(config, dtype, backward=True),
                      PAIRED=paired, **reduce_scatter_constexprs(config, H, transpose_in_kernel), **cluster)
    return grid, words, constexprs


def _half_grad_state(w_hh, rmax_shape, half: bool, dummy):
    """A HALF_W backward's max |W_hh| of each direction's columns [D, H], and the buffer of each row's largest |dG|
    (written by the gate phase before any product reads it: at the first step the product reads none). dummy where
    not half."""
    if not half:
        return dummy, dummy
    return (torch.linalg.vector_norm(w_hh, float("inf"), dim=1),
            _alloc(rmax_shape, torch.float32, w_hh.device))


def _backward_2d(gates, c_all, c0, w_hh, dy, dhn, dcn, dg, dc_ws, dh0, dc0, last, reverse: bool, config) -> None:
    """lstm_backward on lstm_bwd_2d_kernel (LSTMConfig.grid_2d): 2 (T + 1) half-steps, each ended by the barrier
    (or, stepwise, by its launch)."""
    from tritonlstm.configs import grid_2d_blocks

    T, B, _ = gates.shape
    D, _, H = w_hh.shape
    dev = gates.device
    nb = grid_2d_blocks(H, config.block_h)
    grid = (nb * nb, config.batch_groups, D)
    sync, cluster = _barrier_state(config, grid, dev)
    # Every share a gate phase reads was written by the product phase before it (zeros at the first step).
    part = _alloc((D, nb, B, H), torch.float32, dev)
    half = _half_w(config, gates.dtype, backward=True)
    amax, rmax = _half_grad_state(w_hh, (D, nb, nb, B), half, part)
    half_g = half and HALF_G
    dg16 = torch.empty((B, D * 4 * H), dtype=torch.float16, device=dev) if half_g else part
    args = (gates, c_all, c0, w_hh, dy, dhn, dcn, dg, dc_ws, dh0, dc0, last if last is not None else sync, sync,
            *barrier_errors.flags(dev), part, amax, rmax, dg16, T, B, H, int(reverse))
    _run(lstm_bwd_2d_kernel, grid, 2 * (T + 1), config, dev, args,
         dict(BU=config.block_h, NB=nb, D=D, HAS_LENGTHS=last is not None, DOT_PRECISION=_dot_precision(gates.dtype),
              HALF_W=half, HALF_G=half_g, **cluster), sync, grid_2d=True)


NO_REDUCE_SCATTER = dict(TRANSPOSED=False, KC=16, QP=1, QC=1, WT_FROM_W=False)
# A reduce-scatter backward with W resident reads W^T's tiles from W_hh (once a launch) instead of a W^T copy the
# host made before each launch: one launching op fewer a training step, 25-60 us of a host-bound step's host time on
# the GPU host (perf/NOTES.md v0.72). TRITONLSTM_TRANSPOSE_IN_KERNEL=0: the copy, as before (for the A/B).
TRANSPOSE_IN_KERNEL = os.environ.get("TRITONLSTM_TRANSPOSE_IN_KERNEL", "1") != "0"


def reduce_scatter_constexprs(config, hidden: int, transpose_in_kernel: bool | None = None) -> dict:
    """The backward kernel's TRANSPOSED, KC, QP, QC, WT_FROM_W for `config` (LSTMConfig.transposed: dh by
    reduce-scatter); transpose_in_kernel: TRANSPOSE_IN_KERNEL where None."""
    if transpose_in_kernel is None:
        transpose_in_kernel = TRANSPOSE_IN_KERNEL
    if not config.transposed:
        return NO_REDUCE_SCATTER
    if config.block_h != 16:
        raise ValueError(f"config: the backward's reduce-scatter (transposed=True) takes block_h=16, got "
                         f"{config.block_h} (block_h=32 is for the forward's transposed dots)")
    qp = next_power_of_2(cdiv(hidden, config.block_h))
    kc = min(config.block_k, REDUCE_SCATTER_CHUNK) if config.w_resident else config.block_k
    qc = 1 if qp <= REDUCE_SCATTER_IN_REGISTERS else min(qp, REDUCE_SCATTER_LOAD)
    # (W's rows read across, at an H Triton cannot prove a multiple of 16, in scalar loads: 48 bytes of spills at
    # 16-bit H = 1000, compile-only sm_90. W^T's copy then.)
    return dict(TRANSPOSED=True, KC=kc, QP=qp, QC=qc,
                WT_FROM_W=config.w_resident and transpose_in_kernel and hidden % 16 == 0)


# A reduce-scatter backward's product W^T @ dG^T in chunks of this many units (M: two warpgroups' 64 rows on
# 8 warps). Compile-only (sm_90, BB = 16, 8 warps): no spills at H <= 1024; smaller chunks, or 4 warps, spill
# (perf/NOTES.md v0.24).
REDUCE_SCATTER_CHUNK = 128
# The producers' shares summed per load ([QC, BB, BH] float32). Up to REDUCE_SCATTER_IN_REGISTERS producers, one a
# load: each thread adds its own element of every share in registers, where a [16, BB, BH] load's sum over the
# producer axis ran across lanes and warps (shuffles, shared memory and 4-8 CTA barriers on each step's critical
# path). Beyond (64 producers at H = 1024), one a load spills and takes 8 rounds of loads, 4 a load spills in the
# streamed float32 tiles, so 16 as before (compile-only sm_90, perf/NOTES.md v0.67).
REDUCE_SCATTER_IN_REGISTERS = 32
REDUCE_SCATTER_LOAD = 16


def _reduce_scatter_state(config, w_hh, batch: int, placeholder, wt_from_w: bool):
    """W_hh^T [D, H, 4H] (a placeholder where the kernel reads W_hh itself: wt_from_w) and the [2, D, P, B, H]
    float32 shares of a reduce-scatter backward (placeholders for other configs; its constexprs come with
    _backward_plan's). Every share a program reads was written at the step before (the kernel reads none at its
    first step), so the buffer needs no zeroing."""
    if not config.transposed:
        return placeholder, placeholder
    D, _, H = w_hh.shape
    w_t = placeholder if wt_from_w else w_hh.transpose(1, 2).contiguous()
    part = _alloc((2, D, cdiv(H, config.block_h), batch, H), torch.float32, w_hh.device)
    return w_t, part


def lstm_stack_backward(gates, c_all, c0, w_ih, w_hh, dy, dhn, dcn, last, *, config, drop=None,
                        into_gates: bool = False):
    """The reverse recurrence of a unidirectional stack of L layers in one launch, as a reverse wavefront: layer
    l runs its step r (time T - 1 - r) at global step r + L - 1 - l, after the layer above has produced its dG of
    that time, so the stack takes T + L steps. gates [L, T, B, 4H] and c_all [L, T, B, H] float32 from
    lstm_stack_forward, c0 [L, B, H] float32, w_ih [L-1, 4H, H] of the layers above the first, w_hh
    [L, 4H, H], dy [L, T, B, H] (the gradient of every layer's own output; the gradient arriving from the layer
    above is added inside, times the forward's dropout scale drop [L-1, T, B, H] when given), dhn and dcn
    [L, B, H]; c0, dhn or dcn None: zeros, as lstm_backward's. Returns dG [L, T, B, 4H], dh0 and dc0 [L, B, H];
    into_gates as lstm_backward's."""
    L, T, B, G = gates.shape
    H = w_hh.shape[2]
    config = for_kernel(config, "stack_bwd")
    _check_tiles(config, H)
    _check_residency(config, H, L, gates.device)
    dt, dev = gates.dtype, gates.device
    dg = gates if into_gates else _per_step((L, T, B, G), dt, dev, last is not None)
    dh0 = _alloc((L, B, H), dt, dev)
    dc0 = _alloc((L, B, H), dt, dev)
    grid = (cdiv(H, config.block_h), config.batch_groups, L)
    words, cluster = _barrier_layout(config, grid, stack=True)
    sync, dc_ws, c0, dhn, dcn, _ = _zeroed_workspace(dev, words, (L, B, H), dt, c0, dhn, dcn)
    args = (gates, c_all, c0, w_hh, w_ih if L > 1 else w_hh, drop if drop is not None else dy, dy, dhn, dcn, dg,
            dc_ws, dh0, dc0, last if last is not None else sync, sync, *barrier_errors.flags(dev), sync, sync, sync,
            sync, sync, T, B, H, 0)
    _run(lstm_bwd_kernel, grid, T + L, config, dev, args,
         dict(D=1, HAS_LENGTHS=last is not None, STACK=True, HAS_DROPOUT=drop is not None,
              DOT_PRECISION=_dot_precision(dt), PREFETCH=False, HALF_W=False,
              **NO_REDUCE_SCATTER, **cluster), sync)
    return dg, dh0, dc0
