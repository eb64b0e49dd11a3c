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
    """Compile-only (sm_90): each tile config in each of the layers' operand layouts, as launched, and the
    restaging copy. K-major operands (x @ W^T, and restaged chunks) reach shared memory in 16-byte copies; the
    layouts that restaging replaces are gathered 4 bytes at a time (v0.37's reason), and the copy itself loads and
    stores 16 bytes wide on both sides."""
    import json

    out = tmp_path / "mm.json"
    proc = run_python("-m", "tritonlstm.compilecheck", "--matmul", "--json", str(out), timeout=600)
    rows = json.loads(out.read_text())
    gemms, (copy,) = rows[:-1], rows[-1:]
    assert proc.returncode == 0 and len(gemms) == 12, proc.stdout + proc.stderr[-2000:]
    assert all(r["error"] is None and r["spill_bytes"] == 0 and r["wgmma"] for r in gemms), gemms
    for r in gemms:
        assert (r["narrow_copies"] == 0) == (r["layout"] in ("x @ W^T", "restaged")), r
    assert copy["layout"] == "restage" and copy["spill_bytes"] == 0, copy
    assert copy["wide_loads"] > 0 and copy["wide_stores"] > 0 and copy["narrow_loads"] == 0, copy


@pytest.mark.parametrize("layout", ["a M-major", "b N-major", "both", "K-major"])
def test_matmul_restages_gathered_operands_k_major_in_chunks(monkeypatch, layout):
    """v0.37: an operand whose unit stride is not along K is copied K-major in chunks of K (the last one partial),
    each chunk's product accumulated into C; K-major operands go straight to the GEMM. Thresholds lowered so the
    interpreter's small problem takes the GPU's path for large ones."""
    monkeypatch.setattr(mm, "RESTAGE_MIN_FLOPS", 0)
    monkeypatch.setattr(mm, "RESTAGE_WHOLE_BYTES", 0)
    monkeypatch.setattr(mm, "RESTAGE_MIN_BYTES", 0)
    restaged = []
    real = mm._restage
    monkeypatch.setattr(mm, "_restage", lambda x, y: restaged.append(tuple(x.shape)) or real(x, y))
    M, K, N = 40, 300, 24
    g = torch.Generator().manual_seed(7)
    a = torch.randn(K, M, generator=g).t() if layout in ("a M-major", "both") else torch.randn(M, K, generator=g)
    b = torch.randn(K, N, generator=g) if layout in ("b N-major", "both") else torch.randn(N, K, generator=g).t()
    torch.testing.assert_close(mm.matmul(a, b), a @ b, rtol=1e-5, atol=1e-4)  # (sums over K = 300)
    chunks = [32] * 9 + [12]  # K / RESTAGE_CHUNKS, rounded up to the GEMM's BK multiple (32)
    want = {"a M-major": [(M, k) for k in chunks], "b N-major": [(k, N) for k in chunks],
            "both": [s for k in chunks for s in ((M, k), (k, N))], "K-major": []}[layout]
    assert restaged == want


def test_matmul_restages_a_small_operand_whole(monkeypatch):
    """dG @ W: the weight (under RESTAGE_WHOLE_BYTES) restaged in one piece, so the product runs once over dG."""
    monkeypatch.setattr(mm, "RESTAGE_MIN_FLOPS", 0)
    restaged = []
    monkeypatch.setattr(mm, "_restage", lambda x, y, real=mm._restage: restaged.append(tuple(x.shape)) or real(x, y))
    g = torch.Generator().manual_seed(8)
    dg, w = torch.randn(50, 64, generator=g), torch.randn(64, 16, generator=g)  # w [K = 4H, N = H], N-major
    torch.testing.assert_close(mm.matmul(dg, w), dg @ w, rtol=1e-5, atol=1e-5)
    assert restaged == [(64, 16)]


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


def test_projected_layer_through_the_tf32_gemms(forced):
    _check_layer(make_problem(5, 3, 6, 8, torch.float32, proj=4), forced, reverse=True)
    assert len(forced) >= 8  # both projections, forward and backward, and dW_hh


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
