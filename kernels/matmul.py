"""The LSTM's float32 GEMMs on TF32 tensor cores: C = A @ B.

nn.LSTM's cuDNN path runs float32 with TF32 wherever PyTorch's RNN precision allows it (the default), its input
projection and weight-gradient GEMMs included; torch.mm follows the separate matmul precision (full float32 by
default), 5-8x slower on an H100. The layers' float32 GEMMs come here instead when the RNN precision allows
TF32 (tritonlstm.functional decides), so that a float32 LSTM runs the arithmetic nn.LSTM runs. No global flag
is touched: PyTorch's precision flags are process-wide, and flipping them around a call would change other
threads' matmuls and, mixing its legacy and new APIs, make PyTorch raise.

TF32 warpgroup MMAs read both operands K-major (K the unit stride) from shared memory. Given an operand whose unit
stride is along M or N, Triton gathers it there with 4-byte cp.async, one row of global memory a thread: run 6's
probe (H100) had the weight gradients dG^T @ x at 23-48 TFLOP/s and dG @ W at 75-80, against 217-232 for the
K-major x @ W^T. Such operands are restaged K-major first by `restage_kernel` (coalesced on both sides), in chunks
of K so that the staging stays a fraction of the operand (perf/NOTES.md v0.37).

A product can also run on float16 operands at twice the rate (`half=True`, v0.43): each row of A and each column of
B scaled by its own power of two into float16's range (`half_rows_kernel`), which keeps what TF32 keeps (11
significant bits) and loses only values 2^29 below their row's largest; the product scaled back exactly in the
epilogue, since a row's (a column's) scale is one factor of every term of its outputs. The input projection
x @ W_ih^T takes it (the input gradient dG @ W_ih did, and lost at every shape of run 7). A weight gradient dG^T @ x
may too, on cuBLAS's float16 GEMM, its operands' columns scaled, and the input gradient on cuBLAS (`HALF_GRADS`,
v0.61-v0.62, off until a GPU has timed them).
"""

import os

import torch
import triton
import triton.language as tl

from tritonlstm.kernels.lstm import _exp2_bits, _half_exp, launch_or_compile


@triton.jit
def _k_tiles(a_rows, b_cols, k0, rk, rm, rn, M, N, k_hi, s_ak, s_bk):
    # The [BM, BK] tile of A and the [BK, BN] tile of B at K offset k0 (zeros past M, N and k_hi).
    kk = (k0 + rk).to(tl.int64)
    a = tl.load(a_rows + kk[None, :] * s_ak, mask=(rm[:, None] < M) & (kk[None, :] < k_hi), other=0.0)
    b = tl.load(b_cols + kk[:, None] * s_bk, mask=(kk[:, None] < k_hi) & (rn[None, :] < N), other=0.0)
    return a, b


@triton.jit
def matmul_kernel(A, B, C, EA, EB, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
                  PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr, SCALED: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # SCALED: A's rows and B's columns were scaled by 2^EA[m] and 2^EB[n] (half_rows_kernel); C gets them back.
    # Tiles of GROUP_M rows of C share their B columns in L2 before the next group starts.
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    rows_in_group = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % rows_in_group
    pid_n = (pid % (GROUP_M * grid_n)) // rows_in_group
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # 64-bit offsets: a weight gradient's operand is a [4H, T*B] view of dG, T*B*4H elements past 2^31 at long T.
    a_rows = A + rm[:, None].to(tl.int64) * s_am
    b_cols = B + rn[None, :].to(tl.int64) * s_bn
    for k0 in range(0, K, BK):
        a, b = _k_tiles(a_rows, b_cols, k0, rk, rm, rn, M, N, K, s_ak, s_bk)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if SCALED:
        # In two halves of the exponent, so that no partial scale leaves float32's normal range where C does not.
        k_all = tl.load(EA + rm, mask=rm < M, other=0)[:, None] + tl.load(EB + rn, mask=rn < N, other=0)[None, :]
        k_one = k_all // 2
        acc = acc * _exp2_bits(-k_one) * _exp2_bits(k_one - k_all)
    c = C + rm[:, None].to(tl.int64) * s_cm + rn[None, :].to(tl.int64) * s_cn
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if ACCUMULATE:  # C += A @ B: the chunks of K after the first
        acc += tl.load(c, mask=c_mask, other=0.0)
    tl.store(c, acc, mask=c_mask)


@triton.jit
def _restage_tile(X, Y, R, C, s_xr, s_xc, s_yr, s_yc, tile_r, tile_c, BR: tl.constexpr, BC: tl.constexpr):
    # Y[r, c] = X[r, c] over one [BR, BC] tile of two layouts of one [R, C] matrix; Triton coalesces the load along
    # X's unit stride and the store along Y's, exchanging the tile through shared memory.
    r = tile_r * BR + tl.arange(0, BR)
    c = tile_c * BC + tl.arange(0, BC)
    mask = (r[:, None] < R) & (c[None, :] < C)
    r64, c64 = r.to(tl.int64), c.to(tl.int64)
    v = tl.load(X + r64[:, None] * s_xr + c64[None, :] * s_xc, mask=mask)
    tl.store(Y + r64[:, None] * s_yr + c64[None, :] * s_yc, v, mask=mask)


@triton.jit
def restage_kernel(X, Y, R, C, s_xr, s_xc, s_yr, s_yc, BR: tl.constexpr, BC: tl.constexpr):
    _restage_tile(X, Y, R, C, s_xr, s_xc, s_yr, s_yc, tl.program_id(0), tl.program_id(1), BR, BC)


@triton.jit
def restage_pair_kernel(X1, Y1, R1, C1, s_x1r, s_x1c, s_y1r, s_y1c, X2, Y2, R2, C2, s_x2r, s_x2c, s_y2r, s_y2c,
                        BR: tl.constexpr, BC: tl.constexpr):
    # Two restagings in one launch (a chunk's two MN-major operands: one launch less per chunk, whose host cost
    # bounded the weight gradients in run 7): the first cdiv(R1, BR) * cdiv(C1, BC) programs copy the first.
    pid = tl.program_id(0)
    cols1 = tl.cdiv(C1, BC)
    tiles1 = tl.cdiv(R1, BR) * cols1
    if pid < tiles1:
        _restage_tile(X1, Y1, R1, C1, s_x1r, s_x1c, s_y1r, s_y1c, pid // cols1, pid % cols1, BR, BC)
    else:
        cols2 = tl.cdiv(C2, BC)
        _restage_tile(X2, Y2, R2, C2, s_x2r, s_x2c, s_y2r, s_y2c, (pid - tiles1) // cols2, (pid - tiles1) % cols2,
                      BR, BC)


@triton.jit
def half_rows_kernel(X, Y, E, R, C, s_xr, s_xc, BR: tl.constexpr, BC: tl.constexpr):
    # Row r of X [R, C] (any strides) into row r of Y [R, C] (row-major, float16) times 2^E[r], E[r] the exponent
    # that takes the row's largest magnitude below 2^15 (kernels.lstm._half_exp: zero rows and float32 subnormals
    # by 2^126, inf and NaN by 2^-114, both staying what they are). Two passes over the row: its magnitude, then
    # the values.
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    m_r = r < R
    p_x = X + r.to(tl.int64)[:, None] * s_xr
    amax = tl.zeros([BR], dtype=tl.float32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        v = tl.load(p_x + c.to(tl.int64)[None, :] * s_xc, mask=m_r[:, None] & (c < C)[None, :], other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(v), axis=1))
    k = _half_exp(amax)
    scale = _exp2_bits(k)[:, None]
    p_y = Y + r.to(tl.int64)[:, None] * C
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        m = m_r[:, None] & (c < C)[None, :]
        v = tl.load(p_x + c.to(tl.int64)[None, :] * s_xc, mask=m, other=0.0)
        tl.store(p_y + c[None, :], (v * scale).to(tl.float16), mask=m)
    tl.store(E + r, k, mask=m_r)


@triton.jit
def column_amax_kernel(X, A, R, C, s_xr, s_xc, BR: tl.constexpr, BC: tl.constexpr):
    # A[c] = max(A[c], the largest |X[r, c]| of this program's [BR, BC] tile), as int32 bits: non-negative floats
    # order as their bits, so an atomic integer max gives every column's largest magnitude in any order.
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    m = (r < R)[:, None] & (c < C)[None, :]
    v = tl.load(X + r.to(tl.int64)[:, None] * s_xr + c.to(tl.int64)[None, :] * s_xc, mask=m, other=0.0)
    tl.atomic_max(A + c, tl.max(tl.abs(v), axis=0).to(tl.int32, bitcast=True), mask=c < C, sem="relaxed")


@triton.jit
def half_columns_kernel(X, Y, A, E, R, C, s_xr, s_xc, BR: tl.constexpr, BC: tl.constexpr):
    # Column c of X [R, C] (any strides) into column c of Y [R, C] (row-major, float16) times 2^E[c], E[c] the
    # exponent that takes A[c] (the column's largest magnitude, column_amax_kernel's bits) below 2^15, as
    # half_rows_kernel does for rows. The first row of programs stores E.
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    m_c = c < C
    m = (r < R)[:, None] & m_c[None, :]
    k = _half_exp(tl.load(A + c, mask=m_c, other=0).to(tl.float32, bitcast=True))
    v = tl.load(X + r.to(tl.int64)[:, None] * s_xr + c.to(tl.int64)[None, :] * s_xc, mask=m, other=0.0)
    tl.store(Y + r.to(tl.int64)[:, None] * C + c[None, :], (v * _exp2_bits(k)[None, :]).to(tl.float16), mask=m)
    tl.store(E + c, k, mask=m_c & (tl.program_id(0) == 0))


# Tiles for every product where set (perf/gemm_probe.py --tiles: an A/B of tile shapes against cuBLAS), as
# dict(BM=, BN=, BK=, num_warps=, num_stages=); None: _config's choice.
TILES: dict | None = None


def _config(M: int, N: int, interpreting: bool, esize: int = 4) -> dict:
    from tritonlstm.configs import cdiv

    if interpreting:
        return dict(BM=16, BN=16, BK=16, GROUP_M=4, num_warps=4, num_stages=1)
    if TILES is not None:
        return dict(GROUP_M=8, BK=128 // esize) | TILES
    # 128 x 128 tiles where they give an H100's 132 SMs about a wave, 128 x 64 where those do (a weight gradient
    # at H = 512: 64 tiles of 128 x 128 left half the SMs idle through K = T*B), 64 x 64 below that. K steps of
    # 128 bytes: 32 in float32, 64 on float16 operands.
    bk = 128 // esize
    if cdiv(M, 128) * cdiv(N, 128) >= 128:
        return dict(BM=128, BN=128, BK=bk, GROUP_M=8, num_warps=8, num_stages=3)
    if cdiv(M, 128) * cdiv(N, 64) >= 64:
        return dict(BM=128, BN=64, BK=bk, GROUP_M=8, num_warps=4, num_stages=3)
    return dict(BM=64, BN=64, BK=bk, GROUP_M=8, num_warps=4, num_stages=3)


# Restaging (see the module's docstring): only where the product is worth a few more launches. Operands of up to
# RESTAGE_WHOLE_BYTES (a weight, for dG @ W) are restaged whole; larger ones in chunks of K of 1 / RESTAGE_CHUNKS
# of them (at least RESTAGE_MIN_BYTES), so a weight gradient over T*B rows adds a sixteenth of dG and x to the
# training step's peak (1.3 bytes per T*B*H in float32; an eighth took the step past the 36 bytes the memory test
# allows, in a CPU emulation: perf/NOTES.md v0.37), not a second dG. Each chunk costs the host three launches,
# ~140 us in all (run 7's GEMM probe): chunks of 8 MB made the weight gradient launch-bound (16 chunks: 1.4 ms at
# H = 512 B = 64, 0.36 with 2), hence at least 32 MB (v0.45), a constant that the memory test's margin between two
# lengths does not see.
RESTAGE_MIN_FLOPS = 2 ** 33
RESTAGE_WHOLE_BYTES = 32 * 2 ** 20
RESTAGE_CHUNKS = 16
RESTAGE_MIN_BYTES = 32 * 2 ** 20
# An MN-major operand (a weight gradient's dG^T and x) is copied K-major in chunks first. (Loading its tiles through
# registers instead, num_stages=1, with or without K split over more programs, ran at 30-48 TFLOP/s against
# restaging's 71-167 on an H200 and was removed: perf/NOTES.md v0.46, v0.60.)
# The float16 path (half=True) from this many flops: below, its two conversions cost more than the product saves.
HALF_MIN_FLOPS = 2 ** 33
# The gradients' GEMMs on float16 operands and cuBLAS's float16 GEMM with a float32 output (torch.mm's out_dtype;
# 630-790 TFLOP/s on run 8's H200 against restaged TF32's 70-250), v0.61-v0.62, not yet timed: on by
# TRITONLSTM_HALF_GRADS=1. A weight gradient (both operands MN-major) instead of restaging for TF32: dG's columns and
# x's (or h's) columns each scaled by their own power of two into float16's range (column_amax_kernel,
# half_columns_kernel), then scaled back exactly (a column's scale is one factor of every term of its outputs).
# Within a column the values keep float16's 11 significant bits, as TF32 does, down to 2^-29 of the column's largest
# (then subnormal, then zero): what is lost is a step whose gradient is 2^29 below the unit's largest, a term under
# float32's resolution of the sum unless the others cancel. The input gradient dG @ W_ih (functional's
# _TF32Projection) on v0.43's row-scaled operands, the product on cuBLAS (`cublas=True`) and scaled back after it.
HALF_GRADS = os.environ.get("TRITONLSTM_HALF_GRADS", "0") == "1"


def staging_chunk(total: int, per_unit: int) -> int:
    """How many units (of K, or of rows) a staging buffer takes at a time, per_unit bytes each: all of them up to
    RESTAGE_WHOLE_BYTES, else a RESTAGE_CHUNKS-th, at least RESTAGE_MIN_BYTES' worth, a multiple of 32."""
    from tritonlstm.configs import cdiv

    if per_unit * total <= RESTAGE_WHOLE_BYTES:
        return total
    chunk = max(cdiv(total, RESTAGE_CHUNKS), RESTAGE_MIN_BYTES // per_unit)
    return min(total, cdiv(chunk, 32) * 32)


def _half_rows(x: torch.Tensor, y: torch.Tensor, e: torch.Tensor) -> None:
    """y [R, C] float16 (row-major) = the rows of x [R, C] (float32, any strides) scaled into float16's range, their
    exponents in e [R] int32 (half_rows_kernel)."""
    from tritonlstm.configs import cdiv

    R, C = x.shape
    launch_or_compile(half_rows_kernel, (cdiv(R, 16),), (x, y, e, R, C, x.stride(0), x.stride(1)), BR=16, BC=128,
                      num_warps=4)


def _half_columns(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [R, C] float16 row-major, e [C] int32): the columns of x [R, C] (float32, any strides) scaled into
    float16's range by 2^e (column_amax_kernel, then half_columns_kernel)."""
    from tritonlstm.configs import cdiv

    R, C = x.shape
    amax = torch.zeros(C, dtype=torch.int32, device=x.device)
    y = torch.empty((R, C), dtype=torch.float16, device=x.device)
    e = torch.empty(C, dtype=torch.int32, device=x.device)
    grid = (cdiv(R, 64), cdiv(C, 64))
    launch_or_compile(column_amax_kernel, grid, (x, amax, R, C, x.stride(0), x.stride(1)), BR=64, BC=64, num_warps=4)
    launch_or_compile(half_columns_kernel, grid, (x, y, amax, e, R, C, x.stride(0), x.stride(1)), BR=64, BC=64,
                      num_warps=4)
    return y, e


def _mm_half_to_float(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of float16 operands into float32: cuBLAS's float16 GEMM with a float32 output on a GPU; elsewhere (the
    interpreter's tests, where ATen has no such kernel) the same values multiplied in float32, which is what that
    GEMM computes up to its order of summation."""
    if a.device.type == "cuda":
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _exp2(k: torch.Tensor) -> torch.Tensor:
    """2^k (k int32, |k| <= 126) as float32, exactly."""
    return torch.ldexp(torch.ones(k.shape, dtype=torch.float32, device=k.device), k)


def _scaled_back_product(a16: torch.Tensor, b16: torch.Tensor, ea: torch.Tensor, eb: torch.Tensor,
                         out: torch.Tensor) -> None:
    """out = (a16 @ b16) * 2^-ea[m] * 2^-eb[n]: the product of operands whose rows of a and columns of b were scaled
    by 2^ea, 2^eb (_mm_half_to_float), scaled back in two factors, as matmul_kernel's epilogue: neither partial scale
    leaves float32's normal range where the result does not."""
    torch.mul(_mm_half_to_float(a16, b16), _exp2(-ea)[:, None], out=out)
    out.mul_(_exp2(-eb)[None, :])


def _matmul_half_weight_grad(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out = a [M, K] @ b [K, N] for a weight gradient's layouts (a = dG^T, b = x, both MN-major) on float16
    operands, a's rows (dG's columns) and b's columns scaled (HALF_GRADS)."""
    a16t, ea = _half_columns(a.t())
    b16, eb = _half_columns(b)
    _scaled_back_product(a16t.t(), b16, ea, eb, out)


def _matmul_half(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, row_chunk: int | None,
                 cublas: bool = False) -> None:
    """out = a @ b on float16 operands, rows of a and columns of b scaled (the module's docstring), a's rows
    converted row_chunk at a time (None: a staging of at most staging_chunk's bytes); each chunk's product on
    matmul_kernel, its epilogue scaling back, or on cuBLAS, then scaled back in two passes over the chunk."""
    from tritonlstm.configs import cdiv
    from tritonlstm.kernels.lstm import interpreting

    M, K = a.shape
    N = b.shape[1]
    dev = a.device
    bt = torch.empty((N, K), dtype=torch.float16, device=dev)  # b's columns as K-major rows
    eb = torch.empty(N, dtype=torch.int32, device=dev)
    _half_rows(b.t(), bt, eb)
    rows = row_chunk or staging_chunk(M, 2 * K)
    stage = torch.empty((min(rows, M), K), dtype=torch.float16, device=dev)
    ea = torch.empty(min(rows, M), dtype=torch.int32, device=dev)
    for m0 in range(0, M, rows):
        n = min(rows, M - m0)
        _half_rows(a[m0:m0 + n], stage[:n], ea[:n])
        c = out[m0:m0 + n]
        if cublas:
            _scaled_back_product(stage[:n], bt.t(), ea[:n], eb, c)
            continue
        cfg = _config(n, N, interpreting(), esize=2)
        grid = (cdiv(n, cfg["BM"]) * cdiv(N, cfg["BN"]),)
        launch_or_compile(matmul_kernel, grid,
                          (stage, bt, c, ea, eb, n, N, K, K, 1, 1, K, c.stride(0), c.stride(1)),
                          PRECISION="tf32", ACCUMULATE=False, SCALED=True, **cfg)


def _restage(x: torch.Tensor, y: torch.Tensor) -> None:
    """y[:] = x for two [R, C] views of different layouts, float32."""
    from tritonlstm.configs import cdiv

    R, C = x.shape
    launch_or_compile(restage_kernel, (cdiv(R, 64), cdiv(C, 64)),
                      (x, y, R, C, x.stride(0), x.stride(1), y.stride(0), y.stride(1)), BR=64, BC=64, num_warps=4)


def _restage_pair(x1: torch.Tensor, y1: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor) -> None:
    """_restage(x1, y1) and _restage(x2, y2) in one launch."""
    from tritonlstm.configs import cdiv

    (r1, c1), (r2, c2) = x1.shape, x2.shape
    launch_or_compile(restage_pair_kernel, (cdiv(r1, 64) * cdiv(c1, 64) + cdiv(r2, 64) * cdiv(c2, 64),),
                      (x1, y1, r1, c1, x1.stride(0), x1.stride(1), y1.stride(0), y1.stride(1),
                       x2, y2, r2, c2, x2.stride(0), x2.stride(1), y2.stride(0), y2.stride(1)),
                      BR=64, BC=64, num_warps=4)


def matmul(a: torch.Tensor, b: torch.Tensor, *, precision: str = "tf32", half: bool = False,
           row_chunk: int | None = None, cublas: bool = False) -> torch.Tensor:
    """a [M, K] @ b [K, N] -> a new [M, N], float32, any strides (transposed views included). precision: "tf32"
    or "ieee" (tl.dot's input_precision). half: with "tf32", on row-scaled float16 operands where the product
    has HALF_MIN_FLOPS (the module's docstring), a's rows converted row_chunk at a time (None: staging_chunk's);
    cublas: that product on cuBLAS's float16 GEMM, scaled back after it (v0.62), instead of matmul_kernel."""
    from tritonlstm.configs import cdiv
    from tritonlstm.kernels.lstm import interpreting

    if a.dtype != torch.float32 or b.dtype != torch.float32:
        raise TypeError(f"matmul: float32 operands only, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: a [M, K] and b [K, N], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device.type == "cuda" and a.device.index is not None and a.device.index != torch.cuda.current_device():
        with torch.cuda.device(a.device):  # Triton launches on the current device
            return matmul(a, b, precision=precision, half=half, row_chunk=row_chunk, cublas=cublas)
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0 or K == 0:
        return torch.zeros((M, N), dtype=torch.float32, device=a.device)
    restage_a, restage_b = a.stride(1) != 1 and K > 1, b.stride(0) != 1 and K > 1
    out = torch.empty((M, N), dtype=torch.float32, device=a.device)
    if HALF_GRADS and precision == "tf32" and restage_a and restage_b and 2 * M * N * K >= HALF_MIN_FLOPS:
        _matmul_half_weight_grad(a, b, out)
        return out
    if half and precision == "tf32" and 2 * M * N * K >= HALF_MIN_FLOPS:
        _matmul_half(a, b, out, row_chunk, cublas)
        return out
    cfg = _config(M, N, interpreting())
    grid = (cdiv(M, cfg["BM"]) * cdiv(N, cfg["BN"]),)

    def launch(a, b, accumulate):
        args = (a, b, out, out, out, M, N, a.shape[1], a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                out.stride(0), out.stride(1))
        launch_or_compile(matmul_kernel, grid, args, PRECISION=precision, ACCUMULATE=accumulate, SCALED=False, **cfg)

    if precision != "tf32" or not (restage_a or restage_b) or 2 * M * N * K < RESTAGE_MIN_FLOPS:
        launch(a, b, False)
        return out
    chunk = staging_chunk(K, 4 * (M * restage_a + N * restage_b))  # staging bytes per unit of K
    # Staging stored [M, chunk] and [N, chunk] row-major: both K-major as the kernel reads them.
    stage_a = torch.empty((M, chunk), dtype=torch.float32, device=a.device) if restage_a else None
    stage_b = torch.empty((N, chunk), dtype=torch.float32, device=a.device) if restage_b else None
    for k0 in range(0, K, chunk):
        n = min(chunk, K - k0)
        a_k, b_k = a[:, k0:k0 + n], b[k0:k0 + n]
        if restage_a and restage_b:
            _restage_pair(a_k, stage_a[:, :n], b_k, stage_b[:, :n].t())
        elif restage_a:
            _restage(a_k, stage_a[:, :n])
        elif restage_b:
            _restage(b_k, stage_b[:, :n].t())
        if restage_a:
            a_k = stage_a[:, :n]
        if restage_b:
            b_k = stage_b[:, :n].t()
        launch(a_k, b_k, k0 > 0)
    return out
