"""The float32 GEMMs on TF32 (kernels/matmul.py, functional._tf32_gemms): the kernel against torch, when the
layers take it, and a layer, a bidirectional layer, a projected layer and a stack through it against the
float64 reference (on the CPU interpreter, forced: on a GPU it is the float32 default)."""

from __future__ import annotations

import pytest
import torch

import tritonlstm.functional as F
from helpers import NAMES, RESOLUTION, call_kwargs, leaf, loss_of, make_problem, reference, rel_err, run_python
from tritonlstm import fused_lstm
from tritonlstm.kernels import matmul as mm


@pytest.mark.parametrize("M,K,N", [(5, 7, 3), (33, 17, 40), (64, 64, 64), (1, 300, 2)])
def test_matmul_matches_torch_with_any_strides(M, K, N):
    g = torch.Generator().manual_seed(M * K * N)
    a, b = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)
    torch.testing.assert_close(mm.matmul(a, b), a @ b, rtol=1e-5, atol=1e-5)
    at, bt = a.t().contiguous(), b.t().contiguous()
    torch.testing.assert_close(mm.matmul(at.t(), bt.t()), a @ b, rtol=1e-5, atol=1e-5)  # transposed views
    torch.testing.assert_close(mm.matmul(b.t(), a.t()), (a @ b).t(), rtol=1e-5, atol=1e-5)


def test_matmul_compiles_for_sm90_onto_warpgroup_mma(tmp_path):
    """Compile-only (sm_90): each tile config in each of the layers' operand layouts, as launched (the row-scaled
    float16 operands too, v0.43), the restaging copy and the float16 rows' conversion. K-major operands (x @ W^T,
    restaged chunks, float16 rows) reach shared memory in 16-byte copies; the layouts that restaging replaces are
    gathered 4 bytes at a time (v0.37's reason); the copy loads and stores 16 bytes wide on both sides, the
    conversion loads 16 bytes wide and stores vectors."""
    import json

    out = tmp_path / "mm.json"
    proc = run_python("-m", "tritonlstm.compilecheck", "--matmul", "--json", str(out), timeout=600)
    rows = json.loads(out.read_text())
    gemms, (copy, pair, half) = rows[:-3], rows[-3:]
    assert proc.returncode == 0 and len(gemms) == 15, proc.stdout + proc.stderr[-2000:]
    assert all(r["error"] is None and r["spill_bytes"] == 0 and r["wgmma"] for r in gemms), gemms
    for r in gemms:
        assert (r["narrow_copies"] == 0) == (r["layout"] in ("x @ W^T", "restaged", "half")), r
        assert r["layout"] not in ("x @ W^T", "dG @ W", "dG^T @ x", "half") or r["wide_loads"] == 0, r
        assert r["tiles"]["BK"] == (64 if r["layout"] == "half" else 32), r
    assert copy["layout"] == "restage" and copy["spill_bytes"] == 0, copy
    assert copy["wide_loads"] > 0 and copy["wide_stores"] > 0 and copy["narrow_loads"] == 0, copy
    assert pair["layout"] == "restage pair" and pair["spill_bytes"] == 0, pair
    assert pair["wide_loads"] >= 2 * copy["wide_loads"] and pair["wide_stores"] >= 2 * copy["wide_stores"], pair
    assert pair["narrow_loads"] == 0, pair
    assert half["layout"] == "half rows" and half["spill_bytes"] == 0, half
    assert half["wide_loads"] > 0 and half["wide_stores"] > 0 and half["narrow_loads"] == 0, half


@pytest.mark.parametrize("layout", ["a M-major", "b N-major", "both", "K-major"])
def test_matmul_restages_gathered_operands_k_major_in_chunks(monkeypatch, layout):
    """v0.37: an operand whose unit stride is not along K is copied K-major in chunks of K (the last one partial),
    each chunk's product accumulated into C; K-major operands go straight to the GEMM. Thresholds lowered so the
    interpreter's small problem takes the GPU's path for large ones."""
    monkeypatch.setattr(mm, "RESTAGE_MIN_FLOPS", 0)
    monkeypatch.setattr(mm, "RESTAGE_WHOLE_BYTES", 0)
    monkeypatch.setattr(mm, "RESTAGE_MIN_BYTES", 0)
    restaged, launches = [], []
    real, real_pair = mm._restage, mm._restage_pair
    monkeypatch.setattr(mm, "_restage",
                        lambda x, y: launches.append(1) or restaged.append(tuple(x.shape)) or real(x, y))
    monkeypatch.setattr(mm, "_restage_pair", lambda x1, y1, x2, y2: launches.append(2) or restaged.extend(
        [tuple(x1.shape), tuple(x2.shape)]) or real_pair(x1, y1, x2, y2))
    M, K, N = 40, 300, 24
    g = torch.Generator().manual_seed(7)
    a = torch.randn(K, M, generator=g).t() if layout in ("a M-major", "both") else torch.randn(M, K, generator=g)
    b = torch.randn(K, N, generator=g) if layout in ("b N-major", "both") else torch.randn(N, K, generator=g).t()
    torch.testing.assert_close(mm.matmul(a, b), a @ b, rtol=1e-5, atol=1e-4)  # (sums over K = 300)
    chunks = [32] * 9 + [12]  # K / RESTAGE_CHUNKS, rounded up to the GEMM's BK multiple (32)
    want = {"a M-major": [(M, k) for k in chunks], "b N-major": [(k, N) for k in chunks],
            "both": [s for k in chunks for s in ((M, k), (k, N))], "K-major": []}[layout]
    assert restaged == want
    # Both operands of a chunk in one launch (session 18: the host's launches bounded the weight gradients).
    assert launches == {"both": [2] * len(chunks), "K-major": []}.get(layout, [1] * len(chunks))


def test_matmul_restages_a_small_operand_whole(monkeypatch):
    """dG @ W: the weight (under RESTAGE_WHOLE_BYTES) restaged in one piece, so the product runs once over dG."""
    monkeypatch.setattr(mm, "RESTAGE_MIN_FLOPS", 0)
    restaged = []
    monkeypatch.setattr(mm, "_restage", lambda x, y, real=mm._restage: restaged.append(tuple(x.shape)) or real(x, y))
    g = torch.Generator().manual_seed(8)
    dg, w = torch.randn(50, 64, generator=g), torch.randn(64, 16, generator=g)  # w [K = 4H, N = H], N-major
    torch.testing.assert_close(mm.matmul(dg, w), dg @ w, rtol=1e-5, atol=1e-5)
    assert restaged == [(64, 16)]


def _spread_rows(g, rows, cols, span):
    """[rows, cols] float32 whose rows lie 10^span apart from one another (-span/2 .. span/2)."""
    return torch.randn(rows, cols, generator=g) * torch.logspace(-span / 2, span / 2, rows)[:, None]


@pytest.mark.parametrize("b_layout", ["K-major", "N-major"])
def test_matmul_on_row_scaled_float16_operands(monkeypatch, b_layout):
    """v0.43: a's rows and b's columns each scaled by their own power of two into float16 (rows 1e30 apart, columns
    1e20 apart: no one scale spans them), the product scaled back: every row and column as precise as TF32 makes it,
    each judged on its own scale; zero rows give zeros, inf and NaN go through as in float32. Below HALF_MIN_FLOPS,
    the TF32 path."""
    monkeypatch.setattr(mm, "HALF_MIN_FLOPS", 0)
    converted = []
    real = mm._half_rows
    monkeypatch.setattr(mm, "_half_rows", lambda x, y, e: converted.append(tuple(x.shape)) or real(x, y, e))
    M, K, N = 40, 70, 24
    g = torch.Generator().manual_seed(11)
    a = _spread_rows(g, M, K, 30)
    b = _spread_rows(g, N, K, 20).t()  # columns 1e20 apart
    if b_layout == "N-major":
        b = b.contiguous()
    a[3] = 0.0
    ref = a.double() @ b.double()
    out = mm.matmul(a, b, half=True)
    assert converted == [(N, K), (M, K)]
    rows = [(out[m] - ref[m]).norm() / ref[m].norm() for m in range(M) if m != 3]
    cols = [(out[:, n] - ref[:, n]).norm() / ref[:, n].norm() for n in range(N)]
    # TF32's 11 significant bits: ~5e-4 relative a product, more where a row or column cancels
    assert max(rows) < 5e-3 and max(cols) < 5e-3 and sum(rows) / len(rows) < 1e-3, (max(rows), max(cols))
    assert torch.equal(out[3], torch.zeros(N))
    a[5, 2], a[6, 4] = float("inf"), float("nan")
    out = mm.matmul(a, b, half=True)
    ref = a.double() @ b.double()
    assert torch.equal(out[5].isinf(), ref[5].isinf()) and out[6].isnan().all() and ref[6].isnan().all()
    assert torch.isfinite(out[7:]).all()
    monkeypatch.setattr(mm, "HALF_MIN_FLOPS", 2 * M * N * K + 1)
    converted.clear()
    torch.testing.assert_close(mm.matmul(a[7:], b, half=True), mm.matmul(a[7:], b), rtol=0, atol=0)  # TF32
    assert converted == []


def test_matmul_on_float16_operands_in_row_chunks(monkeypatch):
    """The rows of a converted a chunk at a time (the staging of the input gradient's dG): the same result, bit for
    bit, as at once, in ceil(M / chunk) conversions."""
    monkeypatch.setattr(mm, "HALF_MIN_FLOPS", 0)
    g = torch.Generator().manual_seed(12)
    a, b = _spread_rows(g, 50, 33, 20), torch.randn(33, 17, generator=g)
    whole = mm.matmul(a, b, half=True, row_chunk=50)
    converted = []
    real = mm._half_rows
    monkeypatch.setattr(mm, "_half_rows", lambda x, y, e: converted.append(tuple(x.shape)) or real(x, y, e))
    assert torch.equal(mm.matmul(a, b, half=True, row_chunk=16), whole)
    assert converted == [(17, 33), (16, 33), (16, 33), (16, 33), (2, 33)]
    assert mm.staging_chunk(1000, 2 * 33) == 1000  # small: at once
    monkeypatch.setattr(mm, "RESTAGE_WHOLE_BYTES", 0)
    monkeypatch.setattr(mm, "RESTAGE_MIN_BYTES", 0)
    assert mm.staging_chunk(1000, 2 * 33) == 64  # a sixteenth, rounded up to 32


def test_weight_gradient_on_column_scaled_float16_operands(monkeypatch):
    """v0.61 (HALF_GRADS): dG^T @ x with both operands as the layers pass them (MN-major views), dG's columns
    1e30 apart and x's 1e20 apart (no one scale spans them), each converted with its own power of two, the product
    (emulated off the GPU) scaled back: every row and column of the result as precise as TF32 makes it, with no
    restaging and no TF32 launch; a zero column of dG gives a zero row, inf and NaN go through. Off, the TF32 path."""
    monkeypatch.setattr(mm, "HALF_MIN_FLOPS", 0)
    monkeypatch.setattr(mm, "HALF_GRADS", True)
    converted, launched = [], []
    real_cols, real_launch = mm._half_columns, mm.launch_or_compile
    monkeypatch.setattr(mm, "_half_columns", lambda x: converted.append(tuple(x.shape)) or real_cols(x))
    monkeypatch.setattr(mm, "launch_or_compile", lambda k, *a, **kw: launched.append(k.fn.__name__) or real_launch(
        k, *a, **kw))
    K, M, N = 90, 40, 24
    g = torch.Generator().manual_seed(13)
    dg = _spread_rows(g, M, K, 30).t().contiguous()  # [K, M]: column m of dG at 10^(-15 .. 15)
    x = _spread_rows(g, N, K, 20).t().contiguous()  # [K, N]
    dg[:, 3] = 0.0
    ref = dg.double().t() @ x.double()
    out = mm.matmul(dg.t(), x)
    assert converted == [(K, M), (K, N)]
    assert launched == ["column_amax_kernel", "half_columns_kernel"] * 2
    rows = [(out[m] - ref[m]).norm() / ref[m].norm() for m in range(M) if m != 3]
    cols = [(out[:, n] - ref[:, n]).norm() / ref[:, n].norm() for n in range(N)]
    assert max(rows) < 5e-3 and max(cols) < 5e-3 and sum(rows) / len(rows) < 1e-3, (max(rows), max(cols))
    assert torch.equal(out[3], torch.zeros(N))
    dg[2, 5], dg[4, 6] = float("inf"), float("nan")
    out = mm.matmul(dg.t(), x)
    ref = dg.double().t() @ x.double()
    assert torch.equal(out[5].isinf(), ref[5].isinf()) and out[6].isnan().all() and ref[6].isnan().all()
    assert torch.isfinite(out[7:]).all()
    monkeypatch.setattr(mm, "HALF_GRADS", False)
    converted.clear()
    launched.clear()
    mm.matmul(dg.t(), x)
    assert converted == [] and "matmul_kernel" in launched


def test_column_conversion_scales_each_column_below_float16s_largest():
    """half_columns_kernel with column_amax_kernel's maxima, over tiles of 64 rows (R = 150: three row programs per
    column, each adding its tile's maximum): each column times 2^e lands in [2^14, 2^15) at its largest, exactly a
    power of two apart from the float32 values; a zero column scales by 2^126 and stays zero."""
    g = torch.Generator().manual_seed(14)
    x = torch.randn(150, 70, generator=g) * torch.logspace(-20, 20, 70)[None, :]
    x[:, 9] = 0.0
    y, e = mm._half_columns(x.t().contiguous().t())  # a column-major view: any strides
    assert y.dtype == torch.float16 and y.shape == x.shape and y.is_contiguous()
    top = y.float().abs().amax(0)
    live = torch.arange(70) != 9
    assert ((top[live] >= 2 ** 14) & (top[live] < 2 ** 15)).all(), top
    torch.testing.assert_close(y.float() * mm._exp2(-e)[None, :], x, rtol=1e-3, atol=0)
    assert e[9] == 126 and torch.equal(y[:, 9], torch.zeros(150, dtype=torch.float16))


HALF_COLUMNS_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tritonlstm.compilecheck import _ptxas_report
from tritonlstm.kernels import matmul as mm
for fn, sig in ((mm.column_amax_kernel, dict(X="*fp32", A="*i32")),
                (mm.half_columns_kernel, dict(X="*fp32", Y="*fp16", A="*i32", E="*i32"))):
    sig = sig | dict(R="i32", C="i32", s_xr="i32", s_xc="constexpr", BR="constexpr", BC="constexpr")
    aligned = [i for i, n in enumerate(sig) if n not in ("R", "s_xc", "BR", "BC")]  # as a launch specialises them
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=dict(s_xc=1, BR=64, BC=64),
                                 attrs={(i,): [["tt.divisibility", 16]] for i in aligned}),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    ptx = c.asm["ptx"]
    print(fn.__name__, _ptxas_report(ptx)[1], "atom.global" in ptx and ".max" in ptx, ptx.count("ld.global.v4"))
"""


def test_column_conversion_kernels_compile_for_sm90():
    """v0.61's two passes over dG (and x), compiled for sm_90 as _half_columns launches them on a row-major operand:
    no spills, the maxima by atomic max, 16-byte loads (a [64, 64] tile over 128 threads: 8 each)."""
    proc = run_python("-c", HALF_COLUMNS_SM90, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    amax, half = (line.split() for line in proc.stdout.splitlines())
    assert amax == ["column_amax_kernel", "0", "True", "8"], proc.stdout
    assert half[:2] == ["half_columns_kernel", "0"] and int(half[3]) >= 8, proc.stdout


def _spread_gradient_step(problem):
    """A layer's forward and backward through fused_lstm and through the float64 reference, under a loss whose
    gradient's batch rows lie 1e16 apart (and so dG's). Returns (params, reference params, outputs, reference
    outputs), the params with their gradients."""
    B = problem["x"].shape[1]
    p = leaf(problem)
    y, (hn, cn) = fused_lstm(*(p[n] for n in NAMES), backend="triton")
    weights = tuple(torch.randn(t.shape, dtype=torch.float64) * torch.logspace(-8, 8, B, dtype=torch.float64)[:, None]
                    for t in (y, hn, cn))
    loss_of(y, hn, cn, weights).backward()
    ref_p, ref_out = reference(problem)
    loss_of(*ref_out, weights).backward()
    return p, ref_p, (y, hn, cn), ref_out


def test_layer_with_float16_gradients(forced, monkeypatch):
    """v0.61-v0.62 at every size (HALF_MIN_FLOPS lowered, HALF_GRADS on): dW_ih and dW_hh on column-scaled float16
    operands, dx on row-scaled ones with the product on cuBLAS (emulated here), against the float64 reference at
    the GPU's float32 (TF32) tolerance, the gradient's batch rows 1e16 apart and each batch row's dx judged on its
    own scale."""
    from helpers import RESOLUTION_GPU

    monkeypatch.setattr(mm, "HALF_MIN_FLOPS", 0)
    monkeypatch.setattr(mm, "HALF_GRADS", True)
    columns, rows = [], []
    real_cols, real_rows = mm._half_columns, mm._half_rows
    monkeypatch.setattr(mm, "_half_columns", lambda x: columns.append(tuple(x.shape)) or real_cols(x))
    monkeypatch.setattr(mm, "_half_rows", lambda x, y, e: rows.append(tuple(x.shape)) or real_rows(x, y, e))
    T, B, I, H = 16, 5, 7, 12
    p, ref_p, _, _ = _spread_gradient_step(make_problem(T, B, I, H, torch.float32))
    tol = RESOLUTION_GPU[torch.float32]
    for n in ("weight_ih", "weight_hh", "x", "bias_ih"):
        assert rel_err(p[n].grad, ref_p[n].grad) <= tol, n
    for b in range(B):
        assert rel_err(p["x"].grad[:, b], ref_p["x"].grad[:, b], floor=0) <= tol, b
    # dW_hh's first step (dG[0] and h0) and later steps (dG[1:] and y[:-1]), then dW_ih's (dG and x)
    assert columns == [(B, 4 * H), (B, H), ((T - 1) * B, 4 * H), ((T - 1) * B, H), (T * B, 4 * H), (T * B, I)]
    # the forward's projection (W_ih's columns, x's rows), then dx's (W_ih^T's columns, dG's rows)
    assert rows == [(4 * H, I), (T * B, I), (I, 4 * H), (T * B, 4 * H)], rows


def test_input_gradient_product_on_cublas(monkeypatch):
    """v0.62: matmul(half=True, cublas=True), the input gradient's layouts (a = dG K-major, b = W_ih N-major), rows
    of a 1e30 apart and columns of b 1e20 apart, in row chunks: every row and column as precise as TF32 makes it,
    each row within 1e-5 of matmul_kernel's epilogue on the same operands (the order of summation apart), and no
    matmul_kernel launch."""
    monkeypatch.setattr(mm, "HALF_MIN_FLOPS", 0)
    g = torch.Generator().manual_seed(15)
    M, K, N = 50, 48, 20
    a = _spread_rows(g, M, K, 30)
    b = _spread_rows(g, N, K, 20).t().contiguous()  # [K, N], N-major
    ref = a.double() @ b.double()
    launched = []
    real = mm.launch_or_compile
    monkeypatch.setattr(mm, "launch_or_compile",
                        lambda k, *x, **kw: launched.append(k.fn.__name__) or real(k, *x, **kw))
    out = mm.matmul(a, b, half=True, row_chunk=16, cublas=True)
    assert "matmul_kernel" not in launched and launched.count("half_rows_kernel") == 1 + 4
    rows = [(out[m] - ref[m]).norm() / ref[m].norm() for m in range(M)]
    cols = [(out[:, n] - ref[:, n]).norm() / ref[:, n].norm() for n in range(N)]
    # TF32's 11 significant bits: ~5e-4 relative a product, more where a row or column cancels
    assert max(rows) < 5e-3 and max(cols) < 1e-2 and sum(rows) / len(rows) < 1e-3, (max(rows), max(cols))
    other = mm.matmul(a, b, half=True, row_chunk=16)  # the same operands through matmul_kernel's epilogue
    assert ((out - other).norm(dim=1) / other.norm(dim=1)).max() < 1e-5


def test_weight_gradients_restage_in_chunks_of_at_least_32_mb():
    """v0.45: each chunk of a restaged weight gradient costs the host three launches (~140 us, run 7), so chunks of
    8 MB made dG^T @ x launch-bound (16 chunks at T*B = 16384, H = 512: 1.41 ms against 0.36 in 2). Now at least
    32 MB a chunk: 5 chunks there, 10 at H = 1024; the largest keep their sixteenths (memory)."""
    def chunks(rows, hidden):  # dG^T [4H, T*B] @ x [T*B, H], both restaged: 4 (4H + H) bytes per row
        return -(-rows // mm.staging_chunk(rows, 4 * (4 * hidden + hidden)))

    assert chunks(256 * 64, 512) == 5 and chunks(256 * 64, 1024) == 10
    assert chunks(256 * 256, 512) == 16 and chunks(256 * 256, 1024) == 16
    assert mm.staging_chunk(256 * 256, 4 * 5 * 1024) * 4 * 5 * 1024 <= (256 * 256 * 4 * 5 * 1024) / 16 + 2 ** 20


def test_matmul_empty_and_refusals():
    assert torch.equal(mm.matmul(torch.ones(3, 0), torch.ones(0, 2)), torch.zeros(3, 2))
    assert mm.matmul(torch.ones(0, 4), torch.ones(4, 2)).shape == (0, 2)
    with pytest.raises(TypeError, match="float32"):
        mm.matmul(torch.ones(2, 2, dtype=torch.float16), torch.ones(2, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"\[M, K\] and b \[K, N\]"):
        mm.matmul(torch.ones(2, 3), torch.ones(2, 3))


@pytest.fixture
def forced(monkeypatch):
    """The TF32 GEMM path on the interpreter's float32 tensors, and a count of its calls."""
    monkeypatch.setattr(F, "_TF32_GEMMS_ON_CPU", True)
    calls = []
    real = mm.matmul

    def spy(a, b, **kw):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b, **kw)

    monkeypatch.setattr(mm, "matmul", spy)
    return calls


def test_which_calls_take_the_tf32_gemms(monkeypatch):
    x = torch.ones(2, 2)
    assert not F._tf32_gemms(x)  # CPU float32: torch's GEMMs
    monkeypatch.setattr(F, "_TF32_GEMMS_ON_CPU", True)
    assert F._tf32_gemms(x) and not F._tf32_gemms(x.half())
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        assert not F._tf32_gemms(x)  # the RNN precision says full float32: nn.LSTM's cuDNN path would too


def _check_layer(problem, calls, **kw):
    p = leaf(problem)
    y, (hn, cn) = fused_lstm(*(p[n] for n in NAMES), backend="triton", **call_kwargs(p), **kw)
    weights = tuple(torch.randn(t.shape, dtype=torch.float64) for t in (y, hn, cn))
    loss_of(y, hn, cn, weights).backward()
    ref_p, ref_out = reference(problem, reverse=kw.get("reverse", False))
    loss_of(*ref_out, weights).backward()
    for out, ref in zip((y, hn, cn), ref_out):
        assert rel_err(out, ref) <= RESOLUTION[torch.float32] * 5
    for n in p:
        if p[n] is not None:
            assert rel_err(p[n].grad, ref_p[n].grad) <= RESOLUTION[torch.float32] * 5, n


def test_layer_forward_and_backward_through_the_tf32_gemms(forced):
    T, B, I, H = 6, 5, 7, 12
    _check_layer(make_problem(T, B, I, H, torch.float32), forced)
    # The input projection, its two gradients, and dW_hh's two products (the first step's with h0, the rest).
    assert (T * B, I) in [a for a, _ in forced] and len(forced) == 5, forced


def test_layer_through_the_float16_gemms(forced, monkeypatch):
    """v0.43 at every size (HALF_MIN_FLOPS lowered): the input projection on row-scaled float16 operands, the
    gradients on TF32 (the input gradient's float16 path lost at every shape of run 7), against the float64
    reference at the GPU's float32 (TF32) tolerance."""
    from helpers import RESOLUTION_GPU

    monkeypatch.setattr(mm, "HALF_MIN_FLOPS", 0)
    monkeypatch.setattr(mm, "RESTAGE_WHOLE_BYTES", 0)
    monkeypatch.setattr(mm, "RESTAGE_MIN_BYTES", 0)
    converted = []
    real = mm._half_rows
    monkeypatch.setattr(mm, "_half_rows", lambda x, y, e: converted.append(tuple(x.shape)) or real(x, y, e))
    T, B, I, H = 16, 5, 7, 12
    problem = make_problem(T, B, I, H, torch.float32)
    problem["x"] = problem["x"] * torch.logspace(-6, 0, B)[None, :, None]  # x's rows 1e6 apart
    p, ref_p, outs, ref_out = _spread_gradient_step(problem)
    tol = RESOLUTION_GPU[torch.float32]
    for out, ref in zip(outs, ref_out):
        assert rel_err(out, ref) <= tol
    for b in range(B):  # each batch row's input gradient on its own scale
        assert rel_err(p["x"].grad[:, b], ref_p["x"].grad[:, b], floor=0) <= tol, b
    for n in p:
        if p[n] is not None:
            assert rel_err(p[n].grad, ref_p[n].grad) <= 2 * tol, n
    # x's rows at once and W_ih's columns; nothing in the backward.
    assert converted == [(4 * H, I), (T * B, I)], converted


def test_projected_layer_through_the_tf32_gemms(forced):
    _check_layer(make_problem(5, 3, 6, 8, torch.float32, proj=4), forced, reverse=True)
    # Both projections, forward and backward, and dW_hh: one product, as the recurrence runs from a zero state (h0
    # enters through gx's first step).
    assert len(forced) >= 7


def test_bidirectional_layer_and_stack_match_nn_lstm(forced):
    torch.manual_seed(0)
    for layers, bidirectional in ((1, True), (3, False)):
        ref = torch.nn.LSTM(6, 8, num_layers=layers, bidirectional=bidirectional).double()
        from tritonlstm import LSTM

        ours = LSTM(6, 8, num_layers=layers, bidirectional=bidirectional, backend="triton")
        ours.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
        x = torch.randn(5, 3, 6, dtype=torch.float64)
        xs = [x.clone().requires_grad_(), x.float().requires_grad_()]
        outs = [m(xi)[0] for m, xi in zip((ref, ours), xs)]
        g = torch.randn(outs[0].shape, dtype=torch.float64)
        for out in outs:
            (out.double() * g).sum().backward()
        assert rel_err(outs[1], outs[0]) <= 1e-4 and rel_err(xs[1].grad, xs[0].grad) <= 1e-4
        for a, b in zip(ours.parameters(), ref.parameters()):
            assert rel_err(a.grad, b.grad) <= 1e-4
    assert any(a[0] == 8 * 4 for a, _ in forced)  # the stack's W_ih gradients of the layers above


def test_matmul_under_compile_only_launches_nothing(monkeypatch):
    """kernels.lstm.compile_only (the bench's and tuner's parallel warm-up): the GEMM compiles and leaves its
    output unwritten, like the recurrence kernels."""
    from tritonlstm.kernels import lstm as kernels

    launched = []
    monkeypatch.setattr(mm.matmul_kernel, "warmup", lambda *a, **k: launched.append("warmup"))
    with kernels.compile_only():
        mm.matmul(torch.ones(4, 3), torch.ones(3, 2))
    assert launched == ["warmup"]


def test_probe_tiles_reach_every_product(monkeypatch):
    """kernels.matmul.TILES (perf/gemm_probe.py --tiles) replaces _config's choice on the GPU, BK from the operand
    width unless given; the interpreter keeps its own small tiles."""
    monkeypatch.setattr(mm, "TILES", dict(BM=128, BN=256, num_warps=8, num_stages=4))
    assert mm._config(4096, 4096, False) == dict(BM=128, BN=256, BK=32, GROUP_M=8, num_warps=8, num_stages=4)
    assert mm._config(4096, 4096, False, esize=2)["BK"] == 64
    assert mm._config(4096, 4096, True)["BM"] == 16
