"""kernels.reduce.column_sums, the bias gradient's sum over T*B rows (perf/NOTES.md v0.30): float32 sums of any
floating dtype, row chunks summed in a fixed order; and the layer and stack backwards take their bias gradient
from it."""

from __future__ import annotations

import pytest
import torch

from helpers import NAMES, make_problem
from tritonlstm import fused_lstm
from tritonlstm.functional import lstm_stack
from tritonlstm.kernels import reduce


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("shape", [(1, 1), (37, 300), (100, 129), (257, 4), (0, 5)])
def test_column_sums_match_float64(shape, dtype):
    m = (torch.randn(shape) * 3).to(dtype)
    got = reduce.column_sums(m)
    assert got.dtype == torch.float32 and got.shape == (shape[1],)
    torch.testing.assert_close(got.double(), m.double().sum(0), rtol=1e-6, atol=1e-5)
    assert torch.equal(got, reduce.column_sums(m))  # the same chunks, summed in the same order


def test_column_sums_of_a_strided_view():
    base = torch.randn(64, 40)
    torch.testing.assert_close(reduce.column_sums(base[:, ::2]), base[:, ::2].sum(0), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        reduce.column_sums(base[0])


def test_bias_gradients_come_from_column_sums(monkeypatch):
    calls = []
    real = reduce.column_sums
    monkeypatch.setattr(reduce, "column_sums", lambda m: calls.append(tuple(m.shape)) or real(m))
    p = {n: (t.requires_grad_() if t is not None else None) for n, t in make_problem(5, 3, 4, 8, torch.float32).items()}
    y, _ = fused_lstm(*(p[n] for n in NAMES), backend="triton")
    y.sum().backward()
    assert calls == [(15, 32)]
    calls.clear()
    ws = [tuple(t.requires_grad_() for t in (torch.randn(32, 8), torch.randn(32, 8), torch.randn(32), torch.randn(32)))
          for _ in range(2)]
    y, _ = lstm_stack(torch.randn(5, 3, 8), ws, backend="triton")
    y.sum().backward()
    assert calls == [(15, 32), (15, 32)]
    for w in ws:
        assert torch.equal(w[2].grad, w[3].grad)
