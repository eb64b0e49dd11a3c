"""kernels.reduce.column_sums, the bias gradients' sums over T*B rows (perf/NOTES.md v0.30, v0.71): float32 sums of
any floating dtype, row chunks summed in a fixed order by the last program to arrive, written in the biases' dtype
once per bias; and the layer and stack backwards take their bias gradients from it, one launch a backward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import NAMES, make_problem
from tritonlstm import fused_lstm
from tritonlstm.functional import lstm_layer, lstm_stack
from tritonlstm.kernels import reduce

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
IDS = ["fp16", "bf16", "fp32"]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", [(1, 1), (37, 300), (100, 129), (257, 4), (0, 5)])
def test_column_sums_match_float64(shape, dtype):
    m = (torch.randn(shape) * 3).to(dtype)
    got = reduce.column_sums(m)
    assert got.dtype == torch.float32 and got.shape == (1, shape[1])
    torch.testing.assert_close(got[0].double(), m.double().sum(0), rtol=1e-6, atol=1e-5)
    assert torch.equal(got, reduce.column_sums(m))  # the same chunks, summed in the same order


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", [(3, 100, 129), (2, 257, 4), (1, 5, 300)])
def test_stacked_sums_in_the_biases_dtype_twice(shape, dtype):
    """L matrices at once (a stack's layers), the sums rounded once to `dtype` from float32 (as the cast of
    the float32 sums would round them), in two separate equal copies."""
    m = (torch.randn(shape) * 3).to(dtype)
    got = reduce.column_sums(m, dtype, copies=2)
    assert got.dtype == dtype and got.shape == (2, shape[0], shape[2])
    assert torch.equal(got[0], got[1])
    # One rounding from float32: within one unit in the last place of the float64 sum's.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got[0].double(), m.double().sum(1), rtol=max(eps, 1e-6), atol=1e-4)
    assert torch.equal(got, reduce.column_sums(m, dtype, copies=2))


def test_column_sums_of_a_strided_view_and_bad_arguments():
    base = torch.randn(64, 40)
    torch.testing.assert_close(reduce.column_sums(base[:, ::2])[0], base[:, ::2].sum(0), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[N, C\] or \[L, N, C\], got \(40,\)"):
        reduce.column_sums(base[0])
    with pytest.raises(ValueError, match="copies must be 1 or 2, got 3"):
        reduce.column_sums(base, copies=3)


def test_every_chunk_is_summed_once_by_one_finisher(monkeypatch):
    """With more chunks than one, the counters end at the number of chunks (every program arrived once) and the
    finisher's sum is the partials' in chunk order."""
    seen = []
    zeroed = reduce._zeroed
    monkeypatch.setattr(reduce, "_zeroed", lambda *a: seen.append(zeroed(*a)) or seen[-1])
    for shape, chunks in (((200, 40), 3), ((2, 200, 40), 2)):
        m = torch.randn(shape)
        got = reduce.column_sums(m)
        count, part = seen.pop()
        part = part.view(-1, chunks, 40)
        assert part.shape[0] == count.numel() and count.tolist() == [chunks] * count.numel()
        want = part[:, 0]
        for s in range(1, chunks):
            want = want + part[:, s]
        torch.testing.assert_close(got[0], want.view(got.shape[1:]), rtol=1e-6, atol=1e-5)  # (in its own order)


def test_bias_gradients_come_from_one_launch(monkeypatch):
    """Where the backward's launch does not sum them itself (BIAS_IN_KERNEL off, its default; a stack's always)."""
    calls = []
    real = reduce.column_sums
    monkeypatch.setattr(reduce, "column_sums", lambda m, *a, **kw: calls.append(
        (tuple(m.shape), *a, kw.get("workspace") is not None)) or real(m, *a, **kw))
    problem = make_problem(25, 3, 4, 8, torch.float32)
    p = {n: (t.requires_grad_() if t is not None else None) for n, t in problem.items()}
    y, _ = fused_lstm(*(p[n] for n in NAMES), backend="triton")
    y.sum().backward()
    # (A layer's, after its recurrence in lstm_backward, the counters and partials of its 3 chunks from that
    # launch's memset: v0.74.)
    assert calls == [((75, 32), torch.float32, 2, True)]
    assert p["bias_ih"].grad.data_ptr() != p["bias_hh"].grad.data_ptr()
    assert torch.equal(p["bias_ih"].grad, p["bias_hh"].grad)
    calls.clear()
    ws = [tuple(t.requires_grad_() for t in (torch.randn(32, 8), torch.randn(32, 8), torch.randn(32), torch.randn(32)))
          for _ in range(3)]
    y, _ = lstm_stack(torch.randn(5, 3, 8), ws, backend="triton")
    y.sum().backward()
    assert calls == [((3, 15, 32), torch.float32, 2, False)]
    for w in ws:
        assert torch.equal(w[2].grad, w[3].grad)
    want = [w[2].grad.clone() for w in ws]
    ws[0][2].grad.mul_(2)  # (clip_grad_norm_ and the like update .grad in place)
    assert torch.equal(ws[0][3].grad, want[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_one_bias_or_two_directions(dtype):
    """Only b_hh given (bias_ih None), a frozen b_ih, two directions: each gradient where it is needed, in the
    parameter's dtype and shape, equal to the float32 column sums of dG rounded once."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, dtype=dtype)
    ref = {}
    for case in ("hh only", "ih frozen", "two directions"):
        D = 2 if case == "two directions" else 1
        weights = []
        for _ in range(D):
            w_ih, w_hh = (torch.randn(32, 8, dtype=dtype) * 0.3).requires_grad_(), \
                (torch.randn(32, 8, dtype=dtype) * 0.3).requires_grad_()
            b_ih = None if case == "hh only" else torch.randn(32, dtype=dtype).requires_grad_(case != "ih frozen")
            weights.append((w_ih, w_hh, b_ih, torch.randn(32, dtype=dtype).requires_grad_(), None))
        y, _ = lstm_layer(x, weights, backend="triton")
        y.float().square().sum().backward()
        for d, (_, _, b_ih, b_hh, _) in enumerate(weights):
            assert b_hh.grad.dtype == dtype and b_hh.grad.shape == (32,)
            if case == "two directions":
                assert torch.equal(b_ih.grad, b_hh.grad) and b_ih.grad.data_ptr() != b_hh.grad.data_ptr()
            elif b_ih is not None:
                assert b_ih.grad is None
        ref[case] = weights
    # Against the plain PyTorch ops' gradients.
    for case, weights in ref.items():
        again = [tuple(None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in w)
                 for w in weights]
        y, _ = lstm_layer(x, again, backend="torch")
        y.float().square().sum().backward()
        for w, v in zip(weights, again):
            torch.testing.assert_close(w[3].grad.float(), v[3].grad.float(),
                                       rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=5e-2 if
                                       dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("case", ["fp32", "bf16-reverse-lengths", "fp32-only-b_hh"])
def test_the_backward_launch_sums_the_bias_gradients_itself(case, monkeypatch):
    """v0.73: a persistent backward of one batch group (here 1 program: 16 units, 10 rows in 3 tiles) adds each
    step's dG into registers and writes the bias gradients at its end; no column-sum launch, no memset for it. The
    same within float32 rounding as kernels.reduce's sums (in another order; from the float32 dG, not the stored
    one), every other gradient bit for bit."""
    from tritonlstm import LSTMConfig, use_config
    from tritonlstm.kernels import lstm as kernels

    monkeypatch.setattr(kernels, "BIAS_IN_KERNEL", True)
    dtype = torch.bfloat16 if case.startswith("bf16") else torch.float32
    reverse = "reverse" in case
    config = LSTMConfig(block_h=16, block_b=4, block_k=16, w_resident=True, batch_groups=1, persistent=True)
    assert kernels.bias_sums_in_kernel(config, "bwd", 16)
    lengths = torch.tensor([7, 2, 5, 1, 7, 3, 4, 7, 6, 2]) if "lengths" in case else None
    problem = make_problem(7, 10, 6, 16, dtype)
    if case.endswith("only-b_hh"):
        problem["bias_ih"] = None
    calls = []
    real = reduce.column_sums
    monkeypatch.setattr(reduce, "column_sums", lambda m, *a, **kw: calls.append(a) or real(m, *a, **kw))
    grads = {}
    for in_kernel in (True, False):
        monkeypatch.setattr(kernels, "BIAS_IN_KERNEL", in_kernel)
        p = {n: (t.detach().clone().requires_grad_() if t is not None else None) for n, t in problem.items()}
        with use_config(config, "bwd"):
            y, (hn, cn) = fused_lstm(*(p[n] for n in NAMES), lengths=lengths, reverse=reverse, backend="triton")
            (y.float().square().sum() + hn.float().sum() + cn.float().sum()).backward()
        grads[in_kernel] = {n: t.grad for n, t in p.items() if t is not None}
        assert len(calls) == (0 if in_kernel else 1), calls
        calls.clear()
    on, off = grads[True], grads[False]
    assert on.keys() == off.keys() and ("bias_ih" in on) == (not case.endswith("only-b_hh"))
    for n in on:
        assert on[n].dtype == off[n].dtype and on[n].shape == off[n].shape
        if n.startswith("bias"):
            tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
            torch.testing.assert_close(on[n], off[n], **tol)
        else:
            assert torch.equal(on[n], off[n]), n
    if "bias_ih" in on:
        assert torch.equal(on["bias_ih"], on["bias_hh"]) and on["bias_ih"].data_ptr() != on["bias_hh"].data_ptr()


def test_which_backward_launches_sum_the_bias_gradients(monkeypatch):
    from tritonlstm import LSTMConfig
    from tritonlstm.kernels import lstm as kernels

    monkeypatch.setattr(kernels, "BIAS_IN_KERNEL", True)

    one = LSTMConfig(block_h=16, block_b=16, block_k=64, w_resident=True, batch_groups=1, persistent=True,
                     num_warps=8)
    assert kernels.bias_sums_in_kernel(one, "bwd", 512, 257, (32, 1, 1))
    assert not kernels.bias_sums_in_kernel(one, "bwd", 256, kernels.RELEASED.value, (16, 1, 2))  # split launches
    assert not kernels.bias_sums_in_kernel(one, "bwd", 1024)  # its loop spills already
    assert not kernels.bias_sums_in_kernel(one, "stack_bwd", 256)
    for other in (dict(batch_groups=2), dict(persistent=False), dict(grid_2d=True), dict(block_b=64, block_h=32)):
        assert not kernels.bias_sums_in_kernel(dataclasses.replace(one, **other), "bwd", 256), other
    monkeypatch.setattr(kernels, "BIAS_IN_KERNEL", False)
    assert not kernels.bias_sums_in_kernel(one, "bwd", 256)
