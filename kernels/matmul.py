"""The LSTM's float32 GEMMs on TF32 tensor cores: C = A @ B.

nn.LSTM's cuDNN path runs float32 with TF32 wherever PyTorch's RNN precision allows it (the default), its input
projection and weight-gradient GEMMs included; torch.mm follows the separate matmul precision (full float32 by
default), 5-8x slower on an H100. The layers' float32 GEMMs come here instead when the RNN precision allows
TF32 (tritonlstm.functional decides), so that a float32 LSTM runs the arithmetic nn.LSTM runs. No global flag
is touched: PyTorch's precision flags are process-wide, and flipping them around a call would change other
threads' matmuls and, mixing its legacy and new APIs, make PyTorch raise.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def matmul_kernel(A, B, C, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
                  PRECISION: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
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
        kk = (k0 + rk).to(tl.int64)
        a = tl.load(a_rows + kk[None, :] * s_ak, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_cols + kk[:, None] * s_bk, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    c = C + rm[:, None].to(tl.int64) * s_cm + rn[None, :].to(tl.int64) * s_cn
    tl.store(c, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def _config(M: int, N: int, interpreting: bool) -> dict:
    from tritonlstm.configs import cdiv

    if interpreting:
        return dict(BM=16, BN=16, BK=16, GROUP_M=4, num_warps=4, num_stages=1)
    # 128 x 128 tiles while they still give the GPU's SMs work (an H100 has 132), 64 x 64 below that.
    if cdiv(M, 128) * cdiv(N, 128) >= 64:
        return dict(BM=128, BN=128, BK=32, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BM=64, BN=64, BK=32, GROUP_M=8, num_warps=4, num_stages=3)


def matmul(a: torch.Tensor, b: torch.Tensor, *, precision: str = "tf32") -> torch.Tensor:
    """a [M, K] @ b [K, N] -> a new [M, N], float32, any strides (transposed views included). precision: "tf32"
    or "ieee" (tl.dot's input_precision)."""
    from tritonlstm.configs import cdiv
    from tritonlstm.kernels.lstm import _compiling_only, interpreting

    if a.dtype != torch.float32 or b.dtype != torch.float32:
        raise TypeError(f"matmul: float32 operands only, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: a [M, K] and b [K, N], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device.type == "cuda" and a.device.index is not None and a.device.index != torch.cuda.current_device():
        with torch.cuda.device(a.device):  # Triton launches on the current device
            return matmul(a, b, precision=precision)
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0 or K == 0:
        return torch.zeros((M, N), dtype=torch.float32, device=a.device)
    out = torch.empty((M, N), dtype=torch.float32, device=a.device)
    cfg = _config(M, N, interpreting())
    grid = (cdiv(M, cfg["BM"]) * cdiv(N, cfg["BN"]),)
    args = (a, b, out, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1))
    if _compiling_only.get():  # kernels.lstm.compile_only: compile what would launch, launch nothing
        matmul_kernel.warmup(*args, grid=grid, PRECISION=precision, **cfg)
        return out
    matmul_kernel[grid](*args, PRECISION=precision, **cfg)
    return out
