"""Column sums of tall matrices: the bias gradients, sums over T*B rows of dG [T*B, 4H] (a stack's L of them).

ATen's sum over dim 0 of such a tensor on CUDA splits the rows over many blocks and stages their partial sums in a
global buffer of 4 bytes x outputs x blocks per output x the block's width: 30-140 MB in the training steps of
run 5 (H = 256-1024, B >= 16), the part of their peak memory beyond the counted tensors (perf/NOTES.md v0.30).
Here each program sums its own chunk of rows for its columns in registers, in float32, and writes one row of
partials (a few hundred KB). The last of a column block's programs to arrive sums the block's partials, in a fixed
order (bitwise the same from run to run), and writes the result in the biases' dtype, once per bias: b_ih's and
b_hh's gradients are equal. One launch, where the partials' sum, the cast and autograd's copy for b_hh took three
more launching ops, 25-60 us of host time apiece on the GPU host (perf/NOTES.md v0.71).
"""

import torch
import triton
import triton.language as tl

from tritonlstm.configs import cdiv
from tritonlstm.kernels.lstm import _zeroed, interpreting, launch_or_compile

BLOCK_COLS = 128
BLOCK_ROWS = 32


@triton.jit
def column_sums_kernel(M, PART, COUNT, OUT, N, C, ROWS, CHUNKS, BN: tl.constexpr, BC: tl.constexpr,
                       FINISH: tl.constexpr, COPIES: tl.constexpr):
    # Program (c, s, l): columns c * BC.. of matrix l's rows s * ROWS... Without FINISH it has all the rows.
    i_c = tl.program_id(0)
    i_s = tl.program_id(1)
    i_l = tl.program_id(2)
    cols = i_c * BC + tl.arange(0, BC)
    m_c = cols < C
    start = i_s * ROWS
    end = tl.minimum(start + ROWS, N)
    M += i_l.to(tl.int64) * N * C
    acc = tl.zeros([BN, BC], dtype=tl.float32)
    for r0 in range(start, end, BN):
        rows = r0 + tl.arange(0, BN)
        tile = tl.load(M + rows[:, None].to(tl.int64) * C + cols[None, :], mask=(rows < end)[:, None] & m_c[None, :],
                       other=0.0)
        acc += tile.to(tl.float32)
    total = tl.sum(acc, axis=0)
    if FINISH:
        part = PART + i_l.to(tl.int64) * CHUNKS * C + cols
        tl.store(part + i_s.to(tl.int64) * C, total, mask=m_c)
        # As _grid_barrier's arrival (kernels/lstm.py): bar.sync orders every thread's partials before the one
        # thread's release; its acquire, broadcast with a CTA barrier, orders the finisher's loads after the
        # others' releases, and the loads skip L1 (.cg), which may hold nothing of another SM's writes.
        tl.debug_barrier()
        arrived = tl.atomic_add(COUNT + i_l * tl.num_programs(0) + i_c, 1, sem="acq_rel", scope="gpu")
        if arrived == CHUNKS - 1:
            # BN chunks' partials a load: one L2 round trip for each of them in turn took ~0.2 us apiece.
            acc = tl.zeros([BN, BC], dtype=tl.float32)
            for s0 in range(0, CHUNKS, BN):
                s = s0 + tl.arange(0, BN)
                acc += tl.load(part[None, :] + s[:, None] * C, mask=(s < CHUNKS)[:, None] & m_c[None, :], other=0.0,
                               cache_modifier=".cg")
            _store_copies(OUT, i_l, cols, m_c, C, tl.sum(acc, axis=0), COPIES)
    else:
        _store_copies(OUT, i_l, cols, m_c, C, total, COPIES)


@triton.jit
def _store_copies(OUT, i_l, cols, m_c, C, total, COPIES: tl.constexpr):
    # OUT [COPIES, L, C]
    out = OUT + i_l.to(tl.int64) * C + cols
    value = total.to(OUT.dtype.element_ty)
    tl.store(out, value, mask=m_c)
    if COPIES == 2:
        tl.store(out + tl.num_programs(2).to(tl.int64) * C, value, mask=m_c)


def _plan(N: int, C: int, L: int, device) -> tuple[int, int, int]:
    """(column blocks, row chunks, rows a chunk) of a launch over L matrices [N, C]: chunks enough for ~4 programs
    per SM (the interpreter: up to 3, so that tests cross chunks)."""
    n_c = cdiv(C, BLOCK_COLS)
    want = 3 if interpreting() else 4 * torch.cuda.get_device_properties(device).multi_processor_count
    chunks = max(1, min(cdiv(want, n_c * L), cdiv(N, BLOCK_ROWS)))
    rows = cdiv(cdiv(N, chunks), BLOCK_ROWS) * BLOCK_ROWS
    return n_c, cdiv(N, rows), rows


def workspace_parts(shape: tuple, device) -> tuple:
    """The zeroed (shape, dtype) parts a column_sums launch over m of `shape` needs (its arrival counters and
    partials), for a caller to carve from its own memset (kernels.lstm's _zeroed) and pass as `workspace`; () where
    one chunk needs none."""
    *lead, N, C = shape
    L = lead[0] if lead else 1
    if N == 0 or C == 0 or L == 0:
        return ()
    n_c, chunks, _ = _plan(N, C, L, device)
    return _parts(L, n_c, chunks, C)


def _parts(L: int, n_c: int, chunks: int, C: int) -> tuple:
    return (((L * n_c,), torch.int32), ((L, chunks, C), torch.float32)) if chunks > 1 else ()


def column_sums(m: torch.Tensor, dtype: torch.dtype = torch.float32, copies: int = 1,
                workspace: tuple | None = None) -> torch.Tensor:
    """m [N, C] or [L, N, C] (any floating dtype) summed over its rows in float32, as a new [copies, C] or
    [copies, L, C] tensor in `dtype`: `copies` (1 or 2) equal copies of the sums, in one launch. workspace: zeroed
    tensors of workspace_parts(m.shape) (from the caller's memset), else this call zeroes its own."""
    if m.dim() not in (2, 3):
        raise ValueError(f"column_sums: m must be [N, C] or [L, N, C], got {tuple(m.shape)}")
    if copies not in (1, 2):
        raise ValueError(f"column_sums: copies must be 1 or 2, got {copies}")
    if m.device.type == "cuda" and m.device.index is not None and m.device.index != torch.cuda.current_device():
        with torch.cuda.device(m.device):  # Triton launches on the current device
            return column_sums(m, dtype, copies, workspace)
    m = m.contiguous()
    *lead, N, C = m.shape
    L = lead[0] if lead else 1
    out = torch.empty((copies, *lead, C), dtype=dtype, device=m.device)
    if N == 0 or C == 0 or L == 0:
        return out.zero_()
    n_c, chunks, rows = _plan(N, C, L, m.device)
    if chunks > 1:  # the arrival counters and the partials, zeroed: the caller's or from one memset
        count, part = workspace if workspace else _zeroed(m.device, *_parts(L, n_c, chunks, C))
    else:
        count = part = out  # (unused)
    args = (m, part, count, out, N, C, rows, chunks)
    launch_or_compile(column_sums_kernel, (n_c, chunks, L), args, BN=BLOCK_ROWS, BC=BLOCK_COLS, FINISH=chunks > 1,
                      COPIES=copies)
    return out
