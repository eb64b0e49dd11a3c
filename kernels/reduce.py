"""Column sums of a tall matrix in float32: the bias gradient, sum over T*B rows of dG [T*B, 4H].

ATen's sum over dim 0 of such a tensor on CUDA splits the rows over many blocks and stages their partial sums in a
global buffer of 4 bytes x outputs x blocks per output x the block's width: 30-140 MB in the training steps of
run 5 (H = 256-1024, B >= 16), the part of their peak memory beyond the counted tensors (perf/NOTES.md v0.30).
Here each program sums its own chunk of rows for its columns in registers and writes one float32 row of partials:
a few hundred KB, summed after in a fixed order (bitwise the same from run to run).
"""

import torch
import triton
import triton.language as tl

BLOCK_COLS = 128
BLOCK_ROWS = 32


@triton.jit
def column_sums_kernel(M, PART, N, C, ROWS, BN: tl.constexpr, BC: tl.constexpr):
    # Program (c, s): columns c * BC.. of rows s * ROWS.., into PART[s].
    i_c = tl.program_id(0)
    i_s = tl.program_id(1)
    cols = i_c * BC + tl.arange(0, BC)
    m_c = cols < C
    start = i_s * ROWS
    end = tl.minimum(start + ROWS, N)
    acc = tl.zeros([BN, BC], dtype=tl.float32)
    for r0 in range(start, end, BN):
        rows = r0 + tl.arange(0, BN)
        tile = tl.load(M + rows[:, None].to(tl.int64) * C + cols[None, :], mask=(rows < end)[:, None] & m_c[None, :],
                       other=0.0)
        acc += tile.to(tl.float32)
    tl.store(PART + i_s.to(tl.int64) * C + cols, tl.sum(acc, axis=0), mask=m_c)


def column_sums(m: torch.Tensor) -> torch.Tensor:
    """m [N, C] (any floating dtype) summed over its rows, as a new float32 [C]."""
    from tritonlstm.configs import cdiv
    from tritonlstm.kernels.lstm import interpreting, launch_or_compile

    if m.dim() != 2:
        raise ValueError(f"column_sums: m must be [N, C], got {tuple(m.shape)}")
    if m.device.type == "cuda" and m.device.index is not None and m.device.index != torch.cuda.current_device():
        with torch.cuda.device(m.device):  # Triton launches on the current device
            return column_sums(m)
    m = m.contiguous()
    N, C = m.shape
    if N == 0 or C == 0:
        return torch.zeros(C, dtype=torch.float32, device=m.device)
    n_c = cdiv(C, BLOCK_COLS)
    # Row chunks enough for ~4 programs per SM (the interpreter: up to 3, so that tests cross chunks).
    want = 3 if interpreting() else 4 * torch.cuda.get_device_properties(m.device).multi_processor_count
    chunks = max(1, min(cdiv(want, n_c), cdiv(N, BLOCK_ROWS)))
    rows = cdiv(cdiv(N, chunks), BLOCK_ROWS) * BLOCK_ROWS
    chunks = cdiv(N, rows)
    part = torch.empty((chunks, C), dtype=torch.float32, device=m.device)
    args = (m, part, N, C, rows)
    if not launch_or_compile(column_sums_kernel, (n_c, chunks), args, BN=BLOCK_ROWS, BC=BLOCK_COLS):
        return part[0]
    # Few rows of partials: ATen sums them without a staging buffer (its split needs >= 256 values per thread).
    return part[0] if chunks == 1 else part.sum(0)
